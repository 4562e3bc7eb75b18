"""route and layer paths: routed ONNX graphs against torch models whose layer lists repeat, skip or reorder layers."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from cp_onnx.models.generate import CachedDecoder
from cp_onnx.models.runner import Runner, pad_batch
from graph_passes import GraphPassError, discover, expose, graph_io
from graph_passes.layer_path import check_path, duplicate, format_path, parse_path, parse_spec
from graph_passes.metadata import KV_SLOTS_KEY, PATH_KEY, routed_path
from graph_passes.route import route
from support import rel_err, repeated_layers, token_batch, torch_logits

# Paths for the 3-layer tiny models: each kind of routing once.
PATHS = {
    "duplicate": [0, 1, 2, 1, 2],  # duplicate(1, 3, 3)
    "skip_first": [1, 2],  # layer 0 computes the shared rotary tables in Optimum's Llama export
    "skip_middle": [0, 2],
    "reorder": [2, 0, 1],
}
REL = 1e-3  # the brief's tolerance; measured: below 1e-6 on every tiny family and path


@pytest.fixture(scope="module")
def graphs(tiny_model):
    """family -> (torch model, ONNX graph, its layer map), discovered once."""
    found = {}

    def get(family: str):
        if family not in found:
            hf, onnx_path = tiny_model(family)
            model = graph_io.load(onnx_path)
            found[family] = (hf, model, discover(model))
        return found[family]

    return get


# ---- layer paths -----------------------------------------------------------------------------------------


def test_parse_path_reads_the_community_syntax():
    assert parse_path("0..14,12,13,14,15..39", 40) == list(range(15)) + [12, 13, 14] + list(range(15, 40))
    assert parse_path(" 0..2 , 1 ,2", 3) == [0, 1, 2, 1, 2]
    assert parse_path("3..3", 4) == [3]


def test_duplicate_runs_the_block_twice():
    path = duplicate(12, 15, 30)
    assert len(path) == 33
    assert path[:15] == list(range(15)) and path[15:18] == [12, 13, 14] and path[18:] == list(range(15, 30))
    assert duplicate(0, 3, 3) == [0, 1, 2, 0, 1, 2]
    assert duplicate(29, 30, 30)[-2:] == [29, 29]
    assert parse_spec("12:15", 30) == path and parse_spec(" 12 : 15 ", 30) == path
    assert parse_spec("0..2,1..2", 3) == PATHS["duplicate"]


def test_format_path_is_compact_and_reads_back():
    assert format_path(duplicate(12, 15, 30)) == "0..14,12..29"
    assert format_path([2, 0, 1]) == "2,0..1"
    assert format_path([5]) == "5"
    assert format_path([0, 2, 2, 3]) == "0,2,2..3"
    for path in [*PATHS.values(), duplicate(12, 15, 30), [3, 3, 3], [4, 3, 2, 1]]:
        assert parse_path(format_path(path), 30) == path


@pytest.mark.parametrize(
    "text, message",
    [
        ("0..14,x,15..29", "layer path '0..14,x,15..29': 'x' is not a layer number or a..b range"),
        ("a..b", "'a..b' is not a layer number or a..b range"),
        ("0..3,-1", "'-1' is not a layer number or a..b range"),
        ("0..2.5", "'0..2.5' is not a layer number"),
        ("9..3", "'9..3' is a reversed range"),
        ("0..29,30", "'30' is out of range, the model has 30 layers (0..29)"),
        ("0..30", "'0..30' is out of range"),
        ("0..3,", "has an empty entry (a stray comma)"),
        ("0,,1", "has an empty entry"),
        ("", "is empty"),
        ("  ", "is empty"),
        ("12:9", "cannot duplicate block 12:9"),
        ("12:31", "cannot duplicate block 12:31: need 0 <= i < j <= 30"),
    ],
)
def test_bad_paths_name_the_bad_token(text, message):
    with pytest.raises(GraphPassError) as caught:
        parse_spec(text, 30)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("path, bad", [([], "empty"), ([0, 3], "entry 3 is not a layer"), ([0, -1], "entry -1"), ([0, 1.0], "entry 1.0"), ([True], "entry True")])
def test_check_path_refuses_what_is_not_a_layer(path, bad):
    with pytest.raises(GraphPassError, match=bad):
        check_path(path, 3)
    assert check_path([np.int64(2), 0], 3) == (2, 0)


# ---- routing no-cache graphs -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_routed_logits_match_torch_with_the_same_layer_list(graphs, family, kind):
    hf, model, layer_map = graphs(family)
    path = PATHS[kind]
    routed = route(model, layer_map, path)
    onnx.checker.check_model(routed)
    assert routed_path(routed) == path and routed_path(model) is None
    runner = Runner(routed, threads=1)
    ids, mask = token_batch("right")
    feeds = runner.feeds(ids, mask)
    got = runner.run(ids, mask, ["logits"])["logits"]
    with repeated_layers(hf, family, path):
        expected = torch_logits(hf, feeds)
    real = mask.astype(bool)  # padded positions are not compared
    assert rel_err(got[real], expected[real]) < REL
    # And the routing is not a no-op: the original model gives other logits.
    original = Runner(model, threads=1).run(ids, mask, ["logits"])["logits"]
    assert rel_err(original[real], expected[real]) > 1e-2


@pytest.mark.parametrize("family, kind", [("llama", "duplicate"), ("gpt2", "reorder")])
def test_discovery_of_a_routed_graph_finds_every_occurrence(graphs, family, kind):
    """discover() on a routed graph sees one layer per path position, whose inputs are torch's hidden states."""
    import torch

    hf, model, layer_map = graphs(family)
    path = PATHS[kind]
    routed = route(model, layer_map, path)
    found = discover(routed)
    assert found.num_layers == len(path) and found.family == "structural"
    names = found.names(("resid_in",))
    runner = Runner(expose(routed, found, names), threads=1)
    ids, mask = token_batch("right")
    got = runner.run(ids, mask, names)
    with repeated_layers(hf, family, path), torch.no_grad():
        hidden = hf(**{k: torch.from_numpy(v) for k, v in runner.feeds(ids, mask).items()}, output_hidden_states=True, use_cache=False).hidden_states
    real = mask.astype(bool)
    for k, name in enumerate(names):
        assert rel_err(got[name][real], hidden[k].numpy()[real]) < 1e-4, name


def test_duplication_shares_the_weights(graphs, tmp_path):
    _, model, layer_map = graphs("llama")
    routed = route(model, layer_map, PATHS["duplicate"])
    assert [t.name for t in routed.graph.initializer] == [t.name for t in model.graph.initializer]
    cloned = [node for i in (1, 2) for node in model.graph.node if node.name in set(layer_map.layers[i].nodes)]
    assert len(routed.graph.node) == len(model.graph.node) + len(cloned)
    assert sum(n.name.endswith("/dup1") for n in routed.graph.node) == len(cloned)
    before = graph_io.save(model, tmp_path / "model.onnx").stat().st_size
    after = graph_io.save(routed, tmp_path / "routed.onnx").stat().st_size
    # The file grows by the cloned nodes (renamed, so a little longer) and nothing else.
    assert 0 < after - before < 1.2 * sum(node.ByteSize() for node in cloned) + 1024


def test_skipping_drops_exactly_the_weights_only_the_omitted_layer_used(graphs):
    _, model, layer_map = graphs("llama")
    routed = route(model, layer_map, PATHS["skip_middle"])
    layer_1 = set(layer_map.layers[1].nodes)
    read_by = lambda nodes: {name for node in nodes for name in node.input}  # noqa: E731
    only_layer_1 = read_by(n for n in model.graph.node if n.name in layer_1) - read_by(n for n in model.graph.node if n.name not in layer_1)
    dropped = {t.name for t in model.graph.initializer} - {t.name for t in routed.graph.initializer}
    assert dropped == only_layer_1 & {t.name for t in model.graph.initializer} and dropped
    assert not any(node.name in layer_1 for node in routed.graph.node)


def test_value_info_follows_the_clones(graphs):
    """A shape-inferred graph keeps typed intermediate tensors: each clone gets its own, full shape inference agrees."""
    _, model, _ = graphs("llama")
    inferred = onnx.shape_inference.infer_shapes(model)
    assert len(inferred.graph.value_info) > 500
    routed = route(inferred, discover(inferred), PATHS["duplicate"])
    onnx.checker.check_model(routed, full_check=True)
    names = {v.name for v in routed.graph.value_info}
    assert sum(name.endswith("/dup1") for name in names) > 100
    assert names <= {out for node in routed.graph.node for out in node.output}
    ids, mask = token_batch("right")
    plain = route(model, discover(model), PATHS["duplicate"])
    np.testing.assert_allclose(Runner(routed, threads=1).run(ids, mask)["logits"], Runner(plain, threads=1).run(ids, mask)["logits"], rtol=1e-6, atol=1e-6)


def test_route_refuses_what_it_cannot_route(graphs):
    _, llama, llama_map = graphs("llama")
    _, gpt2, _ = graphs("gpt2")
    with pytest.raises(GraphPassError, match="discovered on another graph; run discover on this one"):
        route(gpt2, llama_map, [0, 1])
    with pytest.raises(GraphPassError, match=r"entry 3 is not a layer of this model, which has 3 layers \(0..2\)"):
        route(llama, llama_map, [0, 3])
    routed = route(llama, llama_map, [0, 1])
    with pytest.raises(GraphPassError, match=r"already routed \(layer path 0..1\); route the original model"):
        route(routed, llama_map, [0])
    exposed = expose(llama, llama_map, ["blocks.0.resid_mid"])
    with pytest.raises(GraphPassError, match=r"reads '/model/layers.0/Add_output_0' from inside layer 0, so the layers cannot be routed; route the model as exported"):
        route(exposed, llama_map, [0, 1, 2])


# ---- routing a graph with a KV cache ---------------------------------------------------------------------


# Graph inputs of the with-past exports around the KV-cache slots, as Optimum orders them.
INPUTS_AROUND_CACHE = {
    "gpt2": (["input_ids"], ["attention_mask", "position_ids"]),  # discovered by topology: /transformer/Add is not the embedding here
    "gemma3": (["input_ids", "attention_mask"], []),  # no position_ids: positions come from the cache length
}


@pytest.fixture(scope="module")
def with_past(tiny_model, tmp_path_factory):
    """family -> the tiny model's text-generation-with-past export (same weights as ``tiny_model``)."""
    from exporters.optimum_export import export_hf_folder

    def get(family: str) -> onnx.ModelProto:
        _, onnx_path = tiny_model(family)
        return graph_io.load(export_hf_folder(onnx_path.parent.parent / "hf", tmp_path_factory.mktemp(f"{family}_past"), with_past=True))

    return get


@pytest.mark.parametrize("family", INPUTS_AROUND_CACHE)
def test_with_past_slots_follow_the_path(with_past, graphs, tmp_path, family):
    """Slot k is the k-th occurrence: the cached decoder's step logits equal the routed no-cache graph's."""
    model = with_past(family)
    path = PATHS["duplicate"]
    routed = route(model, discover(model), path)
    onnx.checker.check_model(routed)
    inputs = [v.name for v in routed.graph.input]
    slots = [f"past_key_values.{k}.{kind}" for k in range(len(path)) for kind in ("key", "value")]
    before, after = INPUTS_AROUND_CACHE[family]
    assert inputs == before + slots + after  # the export's order, one slot per occurrence
    assert [v.name for v in routed.graph.output] == ["logits"] + [s.replace("past_key_values", "present") for s in slots]
    metadata = {p.key: p.value for p in routed.metadata_props}
    assert metadata[PATH_KEY] == "0..2,1..2" and metadata[KV_SLOTS_KEY] == "[0, 1, 2, 1, 2]"
    skipped = route(model, discover(model), [2, 0])
    assert [v.name for v in skipped.graph.input if v.name.startswith("past")] == slots[:4]

    _, plain, plain_map = graphs(family)
    for layers, graph in ((path, routed), ([2, 0], skipped)):
        graph_io.save(graph, tmp_path / "past.onnx")
        decoder = CachedDecoder(Runner(tmp_path / "past.onnx", threads=1), {})
        tokens = [5, 17, 99, 3, 42, 42, 7]
        steps = [decoder.start(tokens[:4])] + [decoder.step(t) for t in tokens[4:]]
        ids = np.array([tokens], dtype=np.int64)
        full = Runner(route(plain, plain_map, layers), threads=1).run(ids, np.ones_like(ids))["logits"][0]
        for position, logits in zip(range(3, len(tokens)), steps):
            assert rel_err(logits, full[position]) < 1e-5


# ---- the real SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_duplicated_block_matches_torch(smollm2_dir, smollm2_torch, tmp_path):
    source = Path(smollm2_dir) / "model.onnx"
    model = graph_io.load(source)
    start = time.perf_counter()
    layer_map = discover(model)
    path = duplicate(12, 15, layer_map.num_layers)
    routed = route(model, layer_map, path)
    seconds = time.perf_counter() - start
    written = graph_io.save(routed, tmp_path / "model.onnx")
    onnx.checker.check_model(str(written))
    assert written.stat().st_size - source.stat().st_size < 1e-3 * source.stat().st_size
    ids, mask = pad_batch([[1, 504, 3575, 282, 4649, 314], [1, 30, 45, 80, 250, 1000, 2000, 3000]], side="right")
    runner = Runner(written)
    got = runner.run(ids, mask, ["logits"])["logits"]
    with repeated_layers(smollm2_torch, "llama", path):
        expected = torch_logits(smollm2_torch, runner.feeds(ids, mask))
    real = mask.astype(bool)
    assert rel_err(got[real], expected[real]) < REL
    print(f"SmolLM2 discover + route: {seconds:.1f} s; logits relative error {rel_err(got[real], expected[real]):.1e}")
