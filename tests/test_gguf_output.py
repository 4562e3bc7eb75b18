"""GGUF outputs of apply and prune: written along a layer path from tiny Llama and Qwen2 GGUFs (float32 and Q8_0), read
back by transformers' own GGUF loader, whose logits must equal cp-onnx's routed ONNX model of the same source; the
file's tensors and keys checked against the source with the gguf package's reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf")

import gguf  # noqa: E402

from cp_onnx.cli import main  # noqa: E402
from cp_onnx.errors import CpOnnxError  # noqa: E402
from cp_onnx.models.runner import Runner  # noqa: E402
from cp_onnx.outputs.gguf_file import PATH_KEY, write_gguf_path  # noqa: E402
from exporters import export  # noqa: E402
from exporters.hf_gguf import write_gguf  # noqa: E402
from graph_passes import discover, graph_io  # noqa: E402
from graph_passes.route import route  # noqa: E402
from support import build_hf_model, quiet, save_bpe_tokenizer  # noqa: E402

FAMILIES = ("llama", "qwen2")
DUPLICATE = [0, 1, 2, 1, 2]  # block 1:3 of the 3-layer tiny models run twice
SKIP = [0, 2]
IDS = [1, 40, 41, 42, 7, 80, 99, 12, 150, 3]
TOL = 1e-4


def _quantize_q8_0(source: Path, out: Path) -> Path:
    """A copy of a float32 GGUF with every 2-D weight in Q8_0 (what llama-quantize writes; norms stay float32)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if data.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``sources(family, quant) -> (GGUF file, cp-onnx folder exported from it)``, quant "F32" or "Q8_0"."""
    made: dict = {}

    def get(family: str, quant: str = "F32"):
        if (family, quant) not in made:
            import torch

            root = tmp_path_factory.mktemp(f"gguf-{family}-{quant}")
            hf = build_hf_model(family, root / "hf")
            with torch.no_grad():  # Qwen2 initialises its q/k/v biases to zero: make them count
                for name, parameter in hf.named_parameters():
                    if name.endswith("_proj.bias"):
                        parameter.normal_(0, 0.5)
            hf.save_pretrained(root / "hf")
            save_bpe_tokenizer(root / "hf")
            path = write_gguf(root / "hf", root / f"tiny-{family}.F32.gguf", add_bos=True)
            if quant == "Q8_0":
                path = _quantize_q8_0(path, root / f"tiny-{family}.Q8_0.gguf")
            made[family, quant] = (path, export(path, cache_dir=root / "cache", log=quiet))
        return made[family, quant]

    return get


def transformers_logits(path: Path) -> np.ndarray:
    """Logits of the GGUF as transformers loads it (dequantized to float32), independently of cp-onnx."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def routed_onnx_logits(folder: Path, path: list[int]) -> np.ndarray:
    proto = graph_io.load(folder / "model.onnx")
    ids = np.array([IDS], dtype=np.int64)
    return Runner(route(proto, discover(proto), path)).run(ids, np.ones_like(ids), ["logits"])["logits"][0]


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("operation", ["apply", "prune"])
def test_written_gguf_loads_in_transformers_with_the_routed_models_logits(sources, family, operation, tmp_path):
    source, folder = sources(family)
    out = tmp_path / f"{operation}.gguf"
    args = ["--duplicate", "1:3"] if operation == "apply" else ["--skip", "1:2"]
    assert main([operation, str(source), *args, "--out", str(out)]) == 0
    path = DUPLICATE if operation == "apply" else SKIP
    difference = np.abs(transformers_logits(out) - routed_onnx_logits(folder, path)).max()
    assert difference < TOL
    assert np.abs(transformers_logits(source) - routed_onnx_logits(folder, path)).max() > 100 * TOL  # the path changes the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_are_renumbered_and_stored_per_occurrence_keys_copied(sources, family, tmp_path):
    source, _ = sources(family)
    out = write_gguf_path(source, DUPLICATE, tmp_path / "dup.gguf", log=quiet)
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    layer_tensors = [name[len("blk.0."):] for name in old if name.startswith("blk.0.")]
    expected = {name for name in old if not name.startswith("blk.")} | {f"blk.{k}.{rest}" for k in range(5) for rest in layer_tensors}
    assert set(new) == expected
    for name, tensor in new.items():
        origin = name if not name.startswith("blk.") else f"blk.{DUPLICATE[int(name.split('.')[1])]}.{name.split('.', 2)[2]}"
        assert tensor.tensor_type == old[origin].tensor_type and bytes(tensor.data) == bytes(old[origin].data), name
    arch = fields(source)["general.architecture"]
    assert fields(out) == {**fields(source), f"{arch}.block_count": 5, PATH_KEY: "0..2,1..2"}  # tokenizer arrays and all
    # GGUF cannot alias tensors (llama.cpp requires contiguous data): the two repeated layers are stored again.
    repeated = sum(old[f"blk.{layer}.{rest}"].n_bytes for layer in (1, 2) for rest in layer_tensors)
    assert 0 <= out.stat().st_size - source.stat().st_size - repeated < 64 * len(new) + 1024  # alignment padding and the new key


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_gguf_keeps_its_bytes_and_matches_the_routed_model(sources, family, tmp_path):
    source, folder = sources(family, "Q8_0")
    out = tmp_path / "dup.Q8_0.gguf"
    assert main(["apply", str(source), "--duplicate", "1:3", "--out", str(out)]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.4.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0 and types["blk.4.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # The same dequantized weights on both sides: equal to the float tolerance. Against the float32 model: Q8_0's error.
    assert np.abs(transformers_logits(out) - routed_onnx_logits(folder, DUPLICATE)).max() < TOL
    _, float_folder = sources(family)
    quantization_error = np.abs(transformers_logits(out) - routed_onnx_logits(float_folder, DUPLICATE)).max()
    assert TOL < quantization_error < 0.05


def test_a_folder_exported_from_a_gguf_writes_from_that_gguf(sources, tmp_path):
    source, folder = sources("llama")
    direct = write_gguf_path(source, DUPLICATE, tmp_path / "direct.gguf", log=quiet)
    assert main(["apply", str(folder), "--duplicate", "1:3", "--out", str(tmp_path / "from_folder.gguf")]) == 0
    assert (tmp_path / "from_folder.gguf").read_bytes() == direct.read_bytes()
    assert main(["prune", str(folder), "--skip", "1:2", "--out", str(tmp_path / "pruned.gguf")]) == 0
    assert fields(tmp_path / "pruned.gguf")[PATH_KEY] == "0,2"


def test_bad_gguf_requests_fail_in_one_line_and_leave_nothing(sources, tmp_path, capsys):
    source, folder = sources("llama")
    dup = write_gguf_path(source, DUPLICATE, tmp_path / "dup.gguf", log=quiet)
    with pytest.raises(CpOnnxError, match=r"already routed \(layer path 0..2,1..2\)"):
        write_gguf_path(dup, [0, 1], tmp_path / "again.gguf", log=quiet)
    with pytest.raises(CpOnnxError, match="is the source file"):
        write_gguf_path(source, DUPLICATE, source, log=quiet)
    hf_folder = export(source.parent / "hf", cache_dir=tmp_path / "cache", log=quiet)
    cases = [
        (["apply", str(hf_folder), "--duplicate", "1:3", "--out", str(tmp_path / "x.gguf")], "exported from a hf source, not a GGUF file"),
        (["apply", str(source), "--duplicate", "1:4", "--out", str(tmp_path / "x.gguf")], "cannot duplicate block 1:4"),
        (["prune", str(source), "--heads", "1", "--out", str(tmp_path / "x.gguf")], "removes whole layers only"),
        (["apply", str(tmp_path / "missing.gguf"), "--duplicate", "1:3", "--out", str(tmp_path / "x.gguf")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("cp-onnx: error:") and message in error, error
    assert not list(tmp_path.glob("x.gguf")) and not list(tmp_path.glob(".*partial"))


def test_architectures_that_place_layer_kinds_by_position_are_refused(tmp_path):
    """Gemma 3 makes every sixth layer global by its position: a renumbered layer would change kind."""
    path = tmp_path / "gemma3.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(2)
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CpOnnxError, match="gemma3 runtimes give each layer its attention kind by its position"):
        write_gguf_path(path, [0, 1, 1], tmp_path / "out.gguf", log=quiet)


@pytest.mark.slow
def test_smollm2_gguf_with_the_zero_shot_block_duplicated(smollm2_dir, tmp_path):
    """The packaged Q4_1 SmolLM2 with [2, 5) run twice: transformers on the written file against the routed ONNX export."""
    out = tmp_path / "smollm2-dup-2-5.Q4_1.gguf"
    assert main(["apply", "smollm2", "--duplicate", "2:5", "--out", str(out)]) == 0
    print(f"SmolLM2 Q4_1: {out.stat().st_size} bytes with [2, 5) duplicated")
    expected = routed_onnx_logits(smollm2_dir, [*range(5), 2, 3, 4, *range(5, 30)])
    got = transformers_logits(out)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert len(gguf.GGUFReader(str(out)).tensors) == 272 + 3 * 9  # 9 tensors per layer, three layers again
