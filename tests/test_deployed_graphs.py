"""Deployed graphs: onnxruntime-genai builds (fp32, int4) and onnxruntime-optimizer fused graphs of tiny Llama and Qwen2,
discovered, read, routed and applied, against the Optimum export of the same weights and against transformers."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cp_onnx.analysis.activations import ActivationReader
from cp_onnx.analyze import collect_statistics
from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.apply import apply
from cp_onnx.models.generate import generate_ids
from cp_onnx.models.model import open_model
from graph_passes.edit import Edit
from cp_onnx.models.runner import Runner, pad_batch
from graph_passes import GraphPassError, discover, expose, graph_io
from graph_passes.route import route
from support import DEPLOYED_TEXTS, build_hf_model, quiet, repeated_layers, save_bpe_tokenizer, torch_logits

FAMILIES = ("llama", "qwen2")
STREAM = ["embed", "final_norm", *(f"blocks.{l}.{role}" for l in range(3) for role in ("resid_in", "resid_mid", "resid_out"))]
TOL = 1e-4


def _needs_genai() -> None:
    for module in ("onnxruntime_genai", "onnx_ir"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install onnxruntime-genai==0.15.2 onnx-ir): the genai model builder needs it")


def _special_ids(folder: Path) -> None:
    """BOS/EOS ids in config.json as the tokenizer has them (Qwen2's config has none: genai cannot parse a null EOS)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(bos_token_id=1, eos_token_id=2)
    path.write_text(json.dumps(config))


def _build(hf: Path, out: Path, precision: str) -> Path:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu",
               "-c", str(out.parent / "builder_cache")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the genai builder failed: {done.stderr[-2000:]}"
    return out


@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """``deployed(family) -> dict``: torch model, HF folder, genai fp32 and int4 folders, Optimum export, its fused graph."""
    _needs_genai()
    built: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in built:
            from exporters.optimum_export import export_hf_folder
            from onnxruntime.transformers.optimizer import optimize_model

            root = tmp_path_factory.mktemp(f"deployed-{family}")
            hf = build_hf_model(family, root / "hf")
            save_bpe_tokenizer(root / "hf")
            _special_ids(root / "hf")
            optimum = Path(export_hf_folder(root / "hf", root / "optimum", kind="decoder"))
            fused = optimize_model(str(optimum), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0)
            fused.save_model_to_file(str(root / "fused.onnx"))
            built[family] = {"torch": hf, "hf": root / "hf", "optimum": optimum, "fused": root / "fused.onnx",
                             **{precision: _build(root / "hf", root / precision, precision) for precision in ("fp32", "int4")}}
        return built[family]

    return get


def _batch(model) -> tuple[np.ndarray, np.ndarray]:
    return pad_batch(model.encode(DEPLOYED_TEXTS)[0])  # right-padded, as genai's GroupQueryAttention needs


def _stream(onnx_path: Path, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    return Runner(expose(proto, layer_map, [*STREAM, "logits"])).run(ids, mask, [*STREAM, "logits"])


def _close(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    """Largest difference over the real (unpadded) tokens, relative to the largest expected value."""
    real = mask.astype(bool)
    return float(np.abs(actual[real] - expected[real]).max() / np.abs(expected[real]).max())


# ---- discovery and reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_build_is_discovered_with_fused_attention(deployed, family, precision):
    proto = graph_io.load(deployed(family)[precision] / "model.onnx", weights=False)
    ops = {node.op_type for node in proto.graph.node}
    assert "GroupQueryAttention" in ops and "SkipSimplifiedLayerNormalization" in ops and ("MatMulNBits" in ops) == (precision == "int4")
    layer_map = discover(proto)
    assert layer_map.num_layers == 3 and layer_map.attention_op == "GroupQueryAttention"
    assert (layer_map.num_heads, layer_map.head_dim, layer_map.hidden_size) == (4, 16, 64)
    assert all(layer.head_ctx is None and layer.pattern is None and layer.resid_mid for layer in layer_map.layers)
    # The final norm declared only its normed output: discovery gave the residual sum a tensor of its own.
    produced = {name for node in proto.graph.node for name in node.output}
    assert layer_map.layers[-1].resid_out in produced and layer_map.final_norm in produced
    past = next(value for value in proto.graph.input if value.name == "past_key_values.0.key")
    assert [d.dim_value for d in past.type.tensor_type.shape.dim][1::2] == [2, 16]  # kv heads and head size pinned


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_build_stream_equals_optimum_export(deployed, family):
    models = deployed(family)
    folder = open_model(models["fp32"])
    ids, mask = _batch(folder)
    genai, optimum = _stream(models["fp32"] / "model.onnx", ids, mask), _stream(models["optimum"], ids, mask)
    for name in [*STREAM, "logits"]:
        assert _close(genai[name], optimum[name], mask) < TOL, name
    assert np.array_equal(genai["blocks.1.resid_in"], genai["blocks.0.resid_out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_build_statistics_equal_optimum_export(deployed, family):
    models = deployed(family)
    genai = open_model(models["fp32"])
    optimum = open_model(models["optimum"], tokenizer_dir=models["fp32"])
    tokens = genai.encode(DEPLOYED_TEXTS)[0]
    ours = collect_statistics(ActivationReader(genai), tokens, batch_size=2)
    theirs = collect_statistics(ActivationReader(optimum), tokens, batch_size=2)
    assert np.isnan(ours.pop("attention_entropy")).all() and np.isfinite(theirs.pop("attention_entropy")).all()  # no patterns in GQA
    for name, values in theirs.items():
        np.testing.assert_allclose(ours[name], values, rtol=TOL, atol=TOL, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_single_texts_and_left_padding_is_not_used(deployed, family):
    folder = open_model(deployed(family)["fp32"])
    runner = Runner(folder.onnx_path)
    tokens = folder.encode(DEPLOYED_TEXTS)[0]
    ids, mask = pad_batch(tokens)
    padded = runner.run(ids, mask, ["logits"])["logits"]
    for row, text in enumerate(tokens):
        alone = runner.run(np.array([text]), np.ones((1, len(text)), np.int64), ["logits"])["logits"][0]
        assert np.abs(padded[row, : len(text)] - alone).max() < 1e-5
    # GroupQueryAttention reads each row's length from the mask and assumes the pads at the end: no left padding.
    assert not runner.pads_left_safely
    left = next(runner.run_texts(tokens, side="left", outputs=["logits"]))[1]
    assert np.array_equal(left, mask)


def test_fused_optimizer_graph_stream_equals_unfused_export(deployed):
    models = deployed("llama")
    proto = graph_io.load(models["fused"], weights=False)
    assert sum(node.op_type == "SkipSimplifiedLayerNormalization" for node in proto.graph.node) == 6
    assert not any(node.name.startswith("/model/layers.") and node.op_type.startswith("Skip") for node in proto.graph.node)  # generic names
    ids, mask = _batch(open_model(models["fp32"]))
    fused, unfused = _stream(models["fused"], ids, mask), _stream(models["optimum"], ids, mask)
    for name in [*STREAM, "logits"]:
        assert _close(fused[name], unfused[name], mask) < TOL, name
    layer_map = discover(graph_io.load(models["fused"], weights=False))
    assert layer_map.layers[0].resid_out == "/model/layers.0/Add_1_output_0"  # the fused node's sum output, as Optimum named it


# ---- routing, applying, generating --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", [[0, 1, 2, 1, 2], [0, 1, 1, 2], [0, 2]], ids=["duplicate", "repeat", "skip"])
def test_routed_genai_build_equals_torch_with_repeated_layers(deployed, family, path):
    models = deployed(family)
    ids, mask = _batch(open_model(models["fp32"]))
    proto = graph_io.load(models["fp32"] / "model.onnx")
    routed = route(proto, discover(proto), path)
    slots = [value.name for value in routed.graph.input if value.name.startswith("past_key_values.")]
    assert len(slots) == 2 * len(path)  # one cache slot per routed copy of a layer
    logits = Runner(routed).run(ids, mask, ["logits"])["logits"]
    with repeated_layers(models["torch"], family, path) as hf:
        expected = torch_logits(hf, {"input_ids": ids, "attention_mask": mask})
    assert _close(logits, expected, mask) < TOL


@pytest.fixture(scope="module")
def applied(deployed, tmp_path_factory):
    """``applied(family, precision) -> folder``: the genai build with block 1:3 duplicated, through cp_onnx.models.apply."""
    made = {}

    def get(family: str, precision: str) -> Path:
        if (family, precision) not in made:
            source = open_model(deployed(family)[precision])
            made[family, precision] = apply(source, Edit.parse("1:3"), tmp_path_factory.mktemp("applied") / f"{family}-{precision}", log=quiet)
        return made[family, precision]

    return get


def _torch_greedy(hf, family: str, ids: list[int], path: list[int], new_tokens: int) -> list[int]:
    import torch

    with repeated_layers(hf, family, path), torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new_tokens,
                          do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _genai_greedy(folder: Path, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai itself, reading the folder's genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids):]


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_fp32_build_generates_as_torch_and_as_genai(deployed, applied, family):
    models = deployed(family)
    folder = open_model(applied(family, "fp32"))
    assert folder.manifest["layer_path"] == "0..2,1..2" and folder.manifest["num_layers"] == 5
    prompt = folder.encode(["12 + 35 ="])[0][0]
    cached = generate_ids(folder, prompt, 10, log=quiet)
    expected = _torch_greedy(models["torch"], family, prompt, [0, 1, 2, 1, 2], 10)
    assert cached == expected[: len(cached)] and generate_ids(folder, prompt, 10, use_cache=False, log=quiet) == cached
    # genai_config.json follows the routed layer count, so the runtime the model was built for runs it too.
    assert _genai_greedy(folder.path, prompt, len(cached)) == cached
    # apply hard-links the shared weights file; onnx.load refuses such files, graph_io.load reads them itself.
    assert (folder.path / "model.onnx.data").stat().st_nlink > 1
    source, routed = (graph_io.load(path / "model.onnx") for path in (models["fp32"], folder.path))
    weights = {t.name: t.raw_data for t in source.graph.initializer}
    assert all(weights[t.name] == t.raw_data for t in routed.graph.initializer) and len(weights["lm_head.MatMul.weight"]) == 64 * 256 * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_build_is_analysed_predicted_applied_and_generates(deployed, applied, family):
    from cp_onnx.analysis.predict import predict
    from cp_onnx.calibration import load_calibration

    source = open_model(deployed(family)["int4"])
    stats = collect_statistics(ActivationReader(source), source.encode(DEPLOYED_TEXTS)[0], batch_size=2)
    assert all(np.isfinite(values).all() for name, values in stats.items() if name != "attention_entropy")
    questions = [(f"What is {a} plus {a}?", str(2 * a), "arithmetic") for a in range(1, 9)]  # within the tiny build's context
    found = predict(source, load_calibration(None, n=10), load_calibration("general", n=4), questions=questions, block_sizes=(1, 2), max_length=48)
    assert list(found) == ["zero_shot", "few_shot"]
    for prediction in found.values():  # both regimes
        assert prediction.decision in ("help", "abstain") and len(prediction.blocks) == 5  # blocks of sizes 1 and 2 of 3 layers
        assert all(np.isfinite(block.score) for block in prediction.blocks)
    folder = open_model(applied(family, "int4"))
    prompt = folder.encode(["The capital of"])[0][0]
    cached = generate_ids(folder, prompt, 10, log=quiet)
    assert cached == generate_ids(folder, prompt, 10, use_cache=False, log=quiet) == _genai_greedy(folder.path, prompt, len(cached))


def test_int4_sweep_reuse_equals_routed_models_run_from_scratch(deployed, tmp_path):
    """The sweep's segment path (layer by layer, an empty cache per layer) against each routed graph run whole."""
    from cp_onnx.groundtruth import probes
    from cp_onnx.groundtruth.sweep import sweep

    folder = open_model(deployed("qwen2")["int4"])
    items, general = probes.probe_suite(0)[:6], probes.general_texts()[:2]
    configs = [Edit.duplicate(0, 1), Edit.duplicate(1, 3)]
    rows = {mode: sweep(folder, configs, items, general=general, out=tmp_path / f"{mode}.jsonl", mode=mode, max_length=64, log=quiet)
            for mode in ("reuse", "naive")}
    for reuse, naive in zip(rows["reuse"], rows["naive"]):
        assert reuse["path"] == naive["path"] and list(reuse["regimes"]) == list(naive["regimes"]) == ["zero_shot", "few_shot"]
        for regime, metrics in naive["regimes"].items():
            for key, value in metrics.items():
                if isinstance(value, float):
                    assert reuse["regimes"][regime][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (regime, key)


# ---- head-level analysis -----------------------------------------------------------------------------------


def test_heads_on_fused_attention_fail_in_one_line(deployed, tmp_path, capsys):
    from cp_onnx.analysis.circuit import circuit_analysis

    folder = deployed("llama")["fp32"]
    code = main(["analyze", str(folder / "model.onnx"), "--heads", "-n", "4", "--block-sizes", "1,2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not (tmp_path / "report.json").exists()
    assert "fused (GroupQueryAttention): per-head tensors do not exist" in err and "cp-onnx export" in err
    with pytest.raises(GraphPassError, match="fused \\(GroupQueryAttention\\)"):
        circuit_analysis(folder, DEPLOYED_TEXTS, with_heads=True)
    from cp_onnx.analysis.heads import head_means
    from cp_onnx.analysis.perturbation import base_activations

    proto = graph_io.load(folder / "model.onnx")
    layer_map = discover(proto)
    with pytest.raises(CpOnnxError, match="attention is fused .*per-head tensors do not exist"):
        head_means(base_activations(proto, layer_map, open_model(folder).encode(DEPLOYED_TEXTS)[0]))


def test_layer_level_circuit_analysis_equals_optimum_export(deployed):
    """Jacobians and anomaly scores (perturbed segment runs, an empty cache per layer) on the genai build equal the Optimum export's."""
    from cp_onnx.analysis.circuit import circuit_analysis

    models = deployed("llama")
    kwargs = dict(with_heads=False, num_probes=2, neurons_per_layer=2, block_sizes=(1, 2))
    ours = circuit_analysis(open_model(models["fp32"]), DEPLOYED_TEXTS, **kwargs)
    theirs = circuit_analysis(open_model(models["optimum"], tokenizer_dir=models["fp32"]), DEPLOYED_TEXTS, **kwargs)
    for mine, other in zip(ours["jacobian"]["layers"], theirs["jacobian"]["layers"]):
        for key, value in other.items():
            assert mine[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


def test_runner_without_graph_sizes_says_how_to_get_them():
    from cp_onnx.models.runner import cache_feeds

    class Input:  # the fields of an onnxruntime NodeArg that cache_feeds reads
        name, type, shape = "past_key_values.0.key", "tensor(float)", ["batch", 2, "past", "kv_cache_dim"]

    with pytest.raises(CpOnnxError, match="cannot tell the KV-cache size of past_key_values.0.key.*run graph_passes.discover"):
        cache_feeds([Input()], 1)
    assert cache_feeds([Input()], 3, {"past_key_values.0.key": (2, 16)})["past_key_values.0.key"].shape == (3, 2, 0, 16)


# ---- onnxruntime-genai's runtime on applied and pruned builds -------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("operation", ["apply", "prune"])
def test_genai_runtime_generates_what_cp_onnx_generates_on_applied_and_pruned_builds(deployed, family, operation, tmp_path):
    source = deployed(family)["int4"]
    out = tmp_path / operation
    args = ["--duplicate", "1:3"] if operation == "apply" else ["--skip", "1:2"]
    assert main([operation, str(source), *args, "--out", str(out)]) == 0
    folder = open_model(out)
    layers = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    assert layers == folder.manifest["num_layers"] == (5 if operation == "apply" else 2)
    for prompt in ("The capital of", "12 + 35 ="):
        ids = folder.encode([prompt])[0][0]
        ours = generate_ids(folder, ids, 12, log=quiet)
        assert _genai_greedy(out, ids, len(ours)) == ours and len(ours) > 1
    original = open_model(source)
    ids = folder.encode(["The capital of"])[0][0]
    assert generate_ids(original, ids, 12, log=quiet) != generate_ids(folder, ids, 12, log=quiet)  # the edit shows in the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_genai_build_stores_its_weights_once(deployed, applied, family):
    source, out = deployed(family)["int4"], applied(family, "int4")
    graph_growth = (out / "model.onnx").stat().st_size - (source / "model.onnx").stat().st_size
    growth = _folder_bytes(out) - _folder_bytes(source)
    assert 0 < graph_growth and growth - graph_growth <= 0.01 * _folder_bytes(source)  # <= 1% plus the graph
    assert (out / "model.onnx.data").stat().st_ino == (source / "model.onnx.data").stat().st_ino  # the same weights file
    before, after = (graph_io.load(path / "model.onnx", weights=False) for path in (source, out))
    assert sorted(t.name for t in after.graph.initializer) == sorted(t.name for t in before.graph.initializer)
    print(f"{family} int4 genai build: {_folder_bytes(source)} -> {_folder_bytes(out)} bytes with block 1:3 duplicated "
          f"(graph {graph_growth:+d})")
