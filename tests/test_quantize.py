"""export --precision int8|int4 (onnxruntime's MatMulNBits) and --format genai (onnxruntime-genai's builder).

Expectations: the float32 export of the same weights (which test_export checks against torch), the
transformers model itself for the genai graph, the weight MatMuls counted in the float32 graph, and
the cache-key formula of exports made before precision existed. Tolerances are a few times what was
measured on these random models (stated at each bound).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import onnx
import pytest

from cp_onnx import analyze
from cp_onnx.analysis.predict import predict
from cp_onnx.cli import main
from cp_onnx.models.model import open_model
from exporters import ExportError, export, graph_format_of, precision_of, read_manifest
from exporters.manifest import MANIFEST_NAME
from exporters.pipeline import EXPORT_VERSION
from exporters.sources import resolve_source
from exporters.hf_gguf import write_gguf
from support import EXPORT_TEXTS, assert_close, build_hf_model, onnx_logits, plain_ids, save_tokenizer, tiny_tokenizer, torch_ids_logits

PRECISIONS = ("fp32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
# Max |logit - fp32 logit| over max |fp32 logit| (about 0.7 on these random models), measured on the tiny
# llama / qwen2: int8 1.5e-2 / 1.6e-2, int4 0.25 / 0.17. Bounds about 3x.
LOGIT_BOUND = {"int8": 5e-2, "int4": 0.8}
needs_genai = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                 reason="optional: pip install onnxruntime-genai==0.15.2 for --format genai")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (HF folder with a tokenizer, torch model) for the tiny llama and qwen2."""
    built = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(family)
        model = build_hf_model(family, folder)
        save_tokenizer(folder, tiny_tokenizer())
        built[family] = folder, model
    return built


@pytest.fixture(scope="module")
def exports(sources, cache):
    """(family, precision) -> export folder; the llama's also holds the graph with past."""
    return {(family, precision): export(sources[family][0], precision=precision, with_past=family == "llama",
                                        cache_dir=cache, log=lambda line: None)
            for family in sources for precision in PRECISIONS}


def weight_matmuls(path) -> int:
    """MatMul nodes whose second input is an initializer (the weights a weight-only quantizer rewrites)."""
    graph = onnx.load(str(path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    return sum(node.op_type == "MatMul" and node.input[1] in weights for node in graph.node)


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_every_weight_matmul_becomes_matmulnbits(exports, family, precision):
    graphs = ["model.onnx", "with_past/model.onnx"] if family == "llama" else ["model.onnx"]
    for graph in graphs:
        expected = weight_matmuls(exports[family, "fp32"] / graph)
        nodes = onnx.load(str(exports[family, precision] / graph)).graph.node
        nbits = [node for node in nodes if node.op_type == "MatMulNBits"]
        assert expected >= 7 * 3 and len(nbits) == expected, graph  # q, k, v, o, gate, up, down per layer (+ head)
        assert weight_matmuls(exports[family, precision] / graph) == 0
        for node in nbits:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == (BITS[precision], 32, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_stay_within_the_stated_bound_of_fp32(exports, family):
    differences = {}
    for precision in ("int8", "int4"):
        differences[precision] = max(
            relative_difference(onnx_logits(exports[family, precision], ids), onnx_logits(exports[family, "fp32"], ids))
            for ids in (plain_ids(exports[family, "fp32"], text) for text in EXPORT_TEXTS))
        assert 0 < differences[precision] < LOGIT_BOUND[precision], precision
    assert differences["int8"] < differences["int4"] / 4  # 8-bit weights are much closer than 4-bit ones


def test_with_past_graph_is_quantized_and_close(exports):
    folder, ids = exports["llama", "int8"], plain_ids(exports["llama", "int8"], EXPORT_TEXTS[1])
    plain, cached = onnx_logits(folder, ids), cached_logits(folder, ids, "with_past/model.onnx")
    assert relative_difference(cached, onnx_logits(exports["llama", "fp32"], ids)) < LOGIT_BOUND["int8"]
    assert relative_difference(cached, plain) < 1e-5  # the two graphs quantize the same weights the same way


def test_quantized_files_are_smaller(exports):
    sizes = {p: (exports["llama", p] / "model.onnx").stat().st_size for p in PRECISIONS}
    # The tiny model's embedding (256 x 64) stays float32, so int4 saves less than the 8x of its matrices.
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] * 0.6


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantizing_one_weight_at_a_time_equals_onnxruntimes_whole_model_quantizer(exports, tmp_path, precision, external):
    """quantize_graph (mapped weights, one MatMul at a time) writes what MatMulNBitsQuantizer.process writes, byte for byte."""
    from exporters.quantize import QUANTIZER_LOGGER, new_quantizer, quantize_graph, quiet
    from graph_passes.graph_io import load, save

    source = exports["llama", "fp32"] / "model.onnx"
    whole = new_quantizer(load(source), BITS[precision])
    with quiet(QUANTIZER_LOGGER):
        whole.process()
    expected = whole.model.model
    save(load(source), tmp_path / "model.onnx", external_data=external)
    quantize_graph(tmp_path, "model.onnx", precision)
    actual = load(tmp_path / "model.onnx")

    def nodes(model):
        return [(n.op_type, n.domain, list(n.input), list(n.output), [onnx.helper.get_attribute_value(a) for a in n.attribute]) for n in model.graph.node]

    def weights(model):
        return {t.name: (t.data_type, onnx.numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}

    assert sum(n.op_type == "MatMulNBits" for n in actual.graph.node) == weight_matmuls(source)
    assert nodes(actual) == nodes(expected)
    assert weights(actual) == weights(expected)


def test_manifest_records_precision_and_cache_keys_differ(exports, sources, cache):
    manifests = {p: read_manifest(exports["llama", p]) for p in PRECISIONS}
    assert [manifests[p]["precision"] for p in PRECISIONS] == list(PRECISIONS)
    assert {m["graph_format"] for m in manifests.values()} == {"optimum"}
    assert len({m["cache_key"] for m in manifests.values()}) == 3
    assert len({exports["llama", p] for p in PRECISIONS}) == 3
    # fp32 keeps the key of exports made before --precision existed, so their cache entries stay valid.
    src = resolve_source(sources["llama"][0])
    extras = hashlib.sha256(b"".join(path.read_bytes() for path in src.extras)).hexdigest()
    text = f"cp-onnx-export/{EXPORT_VERSION}|{manifests['fp32']['weights_sha256']}|{extras}|with_past=True"
    assert manifests["fp32"]["cache_key"] == hashlib.sha256(text.encode()).hexdigest()[:24]
    lines = []
    assert export(sources["llama"][0], precision="int4", with_past=True, cache_dir=cache, log=lines.append) == exports["llama", "int4"]
    assert any("reusing" in line for line in lines)


def test_manifests_without_the_new_fields_read_as_fp32_optimum(exports, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exports["llama", "fp32"], old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["precision"], manifest["graph_format"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert (precision_of(read_manifest(old)), graph_format_of(read_manifest(old))) == ("fp32", "optimum")
    assert export(old, precision="fp32", log=lambda line: None) == old.resolve()


def test_an_export_folder_as_source_must_match_the_requested_settings(exports):
    folder = exports["llama", "int4"]
    assert export(folder, log=lambda line: None) == folder  # no request: taken as it is
    assert export(folder, precision="int4", log=lambda line: None) == folder
    with pytest.raises(ExportError, match="was exported with --precision int4; export .* again with --precision int8"):
        export(folder, precision="int8", log=lambda line: None)
    with pytest.raises(ExportError, match="was exported with --format optimum"):
        export(folder, graph_format="genai", log=lambda line: None)


@pytest.mark.parametrize("option, value, message", [
    ("--precision", "int3", "cp-onnx: error: unknown precision 'int3'; use one of fp32, int8, int4"),
    ("--format", "gguf", "cp-onnx: error: unknown format 'gguf'; use one of optimum, genai"),
])
def test_bad_option_values_are_one_line_errors(sources, tmp_path, capsys, option, value, message):
    assert main(["export", str(sources["llama"][0]), option, value]) == 2
    assert capsys.readouterr().err.strip() == message


def test_analysis_statistics_at_int8_are_close_to_fp32(exports):
    settings = analyze.Settings(n=10, block_sizes=(1, 2), regimes=("few_shot",))
    results = {p: analyze.analyze(open_model(exports["llama", p]), settings, log=lambda line: None) for p in PRECISIONS}
    stats = {p: {name: np.array([row[name] for row in data["layers"]], dtype=float) for name in data["layers"][0] if name != "layer"}
             for p, data in results.items()}
    worst = {}
    for precision in ("int8", "int4"):
        worst[precision] = max(relative_difference(stats[precision][name], values) for name, values in stats["fp32"].items())
    # Largest difference of the seven per-layer statistics over their largest value: measured 2.2e-3 (int8), 3.9e-2 (int4).
    assert 0 < worst["int8"] < 1e-2 and worst["int4"] < 0.12
    # The default method's block gains (nats per digit token): measured at most 4e-4 apart at int8.
    fp32_gains = {(b["start"], b["end"]): b["score"] for b in results["fp32"]["methods"]["duplication_loss"]["blocks"]}
    int8_gains = {(b["start"], b["end"]): b["score"] for b in results["int8"]["methods"]["duplication_loss"]["blocks"]}
    assert fp32_gains.keys() == int8_gains.keys() and len(fp32_gains) == 5
    assert max(abs(int8_gains[block] - gain) for block, gain in fp32_gains.items()) < 2e-3


def test_predict_runs_on_the_int4_graph(exports):
    model = open_model(exports["qwen2", "int4"])
    result = predict(model, ["If 3x + 5 = 20, then x = 5.", "2, 4, 6, 8: the next is 10."], ["The harbour was quiet."],
                     regimes=("few_shot",), block_sizes=(1,))["few_shot"]
    assert [(b.start, b.end) for b in sorted(result.blocks, key=lambda b: b.start)] == [(0, 1), (1, 2), (2, 3)]
    assert all(np.isfinite(b.score) for b in result.blocks)


def cached_logits(folder, ids: list[int], graph: str = "model.onnx") -> np.ndarray:
    """Logits of a graph with KV cache inputs (Optimum's with-past or the genai graph) for one sequence, from an empty cache."""
    import onnxruntime as ort

    manifest = read_manifest(folder)
    session = ort.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    if "position_ids" in names:  # Optimum's; the genai graph derives positions from the mask
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    empty = np.zeros((1, manifest["num_kv_heads"], 0, manifest["head_dim"]), np.float32)
    feed.update({name: empty for name in names if name.startswith("past_key_values.")})
    assert set(feed) == names
    return session.run(["logits"], feed)[0][0]


@needs_genai
def test_genai_fp32_export_equals_transformers(sources, cache):
    folder_in, model = sources["llama"]
    folder = export(folder_in, graph_format="genai", cache_dir=cache, log=lambda line: None)
    manifest = read_manifest(folder)
    assert (manifest["graph_format"], manifest["precision"]) == ("genai", "fp32")
    assert manifest["onnx"] == {"model": "model.onnx", "with_past": None, "model_data": "model.onnx.data", "with_past_data": None}
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("_") or p.name.startswith(".")) == []
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops  # the builder's fused graph, not Optimum's
    for text in EXPORT_TEXTS:
        ids = plain_ids(folder, text)
        assert_close(cached_logits(folder, ids), torch_ids_logits(model, ids), rel=1e-4)


@needs_genai
def test_genai_int4_export_holds_matmulnbits_and_its_cache_key_differs(sources, cache):
    folder_in, model = sources["llama"]
    fp32 = export(folder_in, graph_format="genai", cache_dir=cache, log=lambda line: None)
    int4 = export(folder_in, graph_format="genai", precision="int4", cache_dir=cache, log=lambda line: None)
    assert int4 != fp32 and read_manifest(int4)["precision"] == "int4"
    nodes = onnx.load(str(int4 / "model.onnx"), load_external_data=False).graph.node
    assert sum(node.op_type == "MatMulNBits" for node in nodes) >= 3 * 5  # qkv, o, gate, up, down per layer
    ids = plain_ids(int4, EXPORT_TEXTS[0])
    # Measured 0.18-0.25 of the largest logit (0.11-0.14 absolute) on EXPORT_TEXTS; fp32 builds agree to 4e-7.
    assert 0 < relative_difference(cached_logits(int4, ids), torch_ids_logits(model, ids)) < LOGIT_BOUND["int4"]


@needs_genai
def test_genai_export_of_a_gguf_gets_the_tokenizer_from_the_gguf(sources, cache, tmp_path):
    folder_in, model = sources["llama"]
    gguf_file = write_gguf(folder_in, tmp_path / "tiny.F32.gguf", add_bos=True)
    raw = tiny_tokenizer()
    folder = export(gguf_file, graph_format="genai", cache_dir=cache, log=lambda line: None)
    assert read_manifest(folder)["source_kind"] == "gguf"
    ids = plain_ids(folder, EXPORT_TEXTS[2])
    assert ids == [1] + raw.encode(EXPORT_TEXTS[2]).ids  # the GGUF's BOS, once
    assert_close(cached_logits(folder, ids), torch_ids_logits(model, ids), rel=1e-4)


def test_genai_without_onnxruntime_genai_says_what_to_install(sources, tmp_path, monkeypatch):
    import exporters.genai_build as genai_build

    real = importlib.util.find_spec
    monkeypatch.setattr(genai_build.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime_genai" else real(name, *args))
    with pytest.raises(ExportError, match=r"not installed; pip install onnxruntime-genai==0\.15\.2$") as err:
        export(sources["llama"][0], graph_format="genai", cache_dir=tmp_path / "cache", log=lambda line: None)
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "cache").glob("*"))  # nothing half-written
    with pytest.raises(ExportError, match="drop --with-past"):
        export(sources["llama"][0], graph_format="genai", with_past=True, cache_dir=tmp_path / "cache", log=lambda line: None)


def test_a_tied_embeddings_transpose_is_stored_transposed_once_its_matmul_is_quantized(tmp_path):
    """The genai builder's tied embedding: Gather(Transpose(W)) beside MatMul(h, W). After quantization W feeds
    only the Transpose, so the file stores W.T for the Gather (no Transpose runs) and the MatMul reads int4 blocks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.quantize import quantize_graph

    weight = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)  # [hidden, vocab]
    nodes = [helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
             helper.make_node("Gather", ["WT", "ids"], ["embedded"]),
             helper.make_node("MatMul", ["embedded", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("embedded", "logits")],
                              [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    quantize_graph(tmp_path, "model.onnx", "int4")
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMulNBits"]
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "W" not in stored and np.array_equal(stored["WT"], weight.T)
    ids = np.array([3, 0, 95, 17])
    embedded, logits = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    assert np.array_equal(embedded, weight.T[ids])
    assert relative_difference(logits, weight.T[ids] @ weight) < LOGIT_BOUND["int4"] / 4
