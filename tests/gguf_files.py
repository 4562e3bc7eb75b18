"""GGUF files for the tests and the fuzzer: small ones written by the gguf package, and where each field of a
file lies, found by the gguf package's own reader (independent of exporters.gguf_header, which they test)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = 24  # magic, version, tensor count (at 8), key-value count (at 16)


def small_gguf(path: Path, *, extra: dict | None = None, big_endian: bool = False, alignment: int | None = None) -> Path:
    """A two-tensor llama GGUF (one block, hidden 8, four tokens) with ``extra`` metadata (key -> value) added."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_token_list(["<s>", "a", "b", "c"])
    writer.add_uint32("test.first", 1)
    writer.add_uint32("test.other", 2)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (extra or {}).items():
        writer.add_array(key, value) if isinstance(value, list) else writer.add_string(key, value)
    for name, shape in (("token_embd.weight", (4, 8)), ("blk.0.attn_q.weight", (8, 8))):  # the writer swaps bytes for big-endian
        writer.add_tensor(name, np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@dataclass(frozen=True)
class Place:
    """Where one number of the header lies: its byte offset and struct format."""

    offset: int
    code: str


def places(path: Path) -> dict[str, list[Place]]:
    """The header's numbers by role, located with gguf.GGUFReader (little-endian files): counts, key and string
    lengths, value types, array counts and item types, scalar values, tensor dimension counts, dims, types, offsets."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    found: dict[str, list[Place]] = {"tensor_count": [Place(8, "Q")], "kv_count": [Place(16, "Q")], "version": [Place(4, "I")]}

    def add(role: str, offset: int, part) -> None:
        found.setdefault(role, []).append(Place(offset, {1: "B", 2: "H", 4: "I", 8: "Q"}[part.dtype.itemsize]))

    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        at = fld.offset
        offsets = []
        for part in fld.parts:
            offsets.append(at)
            at += part.nbytes
        add("key_length", offsets[0], fld.parts[0])
        add("value_type", offsets[2], fld.parts[2])
        main = fld.types[0]
        if main == GGUFValueType.STRING:
            add("string_length", offsets[3], fld.parts[3])
        elif main == GGUFValueType.ARRAY:
            add("array_item_type", offsets[3], fld.parts[3])
            add("array_count", offsets[4], fld.parts[4])
            if fld.types[-1] == GGUFValueType.STRING:
                add("string_length", offsets[5], fld.parts[5])
        elif fld.parts[3].dtype.itemsize in (1, 2, 4, 8) and fld.parts[3].dtype.kind in "iu":
            add("scalar", offsets[3], fld.parts[3])
    for tensor in reader.tensors:
        at = tensor.field.offset
        offsets = []
        for part in tensor.field.parts:
            offsets.append(at)
            at += part.nbytes
        name_length, _, n_dims, dims, kind, offset = zip(offsets, tensor.field.parts)
        for role, (where, part) in (("name_length", name_length), ("n_dims", n_dims), ("tensor_type", kind), ("tensor_offset", offset)):
            add(role, where, part)
        for k in range(len(dims[1])):
            found.setdefault("dim", []).append(Place(dims[0] + 8 * k, "Q"))
    return found


def put(data: bytearray, place: Place, value: int) -> None:
    """Write ``value`` (wrapped to the field's width) at ``place``."""
    bits = 8 * struct.calcsize(place.code)
    struct.pack_into("<" + place.code, data, place.offset, value % (1 << bits))


def get(data: bytes, place: Place) -> int:
    return struct.unpack_from("<" + place.code, data, place.offset)[0]
