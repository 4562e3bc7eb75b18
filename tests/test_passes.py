"""The pass contract: calling a pass leaves its input alone; run_passes on one copy gives what the passes called one by
one give, rediscovering the layers where a pass moved them."""
from __future__ import annotations

import onnx
import pytest

from graph_passes import GraphPassError, discover, run_passes
from graph_passes.ablate import Ablate
from graph_passes.expose import Expose, expose
from graph_passes.last_position import LastPosition, last_position
from graph_passes.perturb import Perturb, perturb
from graph_passes.prune_heads import PruneHeads, prune_heads
from graph_passes.rewrite import include_inserted
from graph_passes.route import Route, route

PATH = [0, 1, 1, 2]


def test_calling_a_pass_copies_and_leaves_the_input_alone(llama):
    model, layer_map = llama
    before = model.SerializeToString()
    for graph_pass in (Expose(["blocks.1.resid_out"]), Perturb([1], [2]), Ablate({0: [1]}), Route(PATH), PruneHeads({2: [0]}), LastPosition()):
        result = graph_pass(model, layer_map)
        assert result is not model and result.SerializeToString() != before, type(graph_pass).__name__
    assert model.SerializeToString() == before


def test_prune_heads_then_route_on_one_copy_equals_the_passes_one_by_one(llama):
    model, layer_map = llama
    pruned = prune_heads(model, layer_map, {0: [1], 2: [0, 3]})
    expected = route(pruned, discover(pruned), PATH)  # what cp-onnx prune does: rediscover the pruned graph, then route
    before = model.SerializeToString()
    result = run_passes(model, layer_map, [PruneHeads({0: [1], 2: [0, 3]}), Route(PATH)])
    assert result.SerializeToString() == expected.SerializeToString()
    assert model.SerializeToString() == before


def test_perturb_then_route_carries_the_inserted_nodes_in_the_layer_map(llama):
    model, layer_map = llama
    perturbed = perturb(model, layer_map, layers=[1], heads=[2])
    expected = route(perturbed, include_inserted(layer_map, perturbed), PATH)
    result = run_passes(model, layer_map, [Perturb(layers=[1], heads=[2]), Route(PATH)])
    assert result.SerializeToString() == expected.SerializeToString()


def test_run_passes_discovers_a_missing_layer_map_and_runs_map_free_passes(llama):
    model, layer_map = llama
    expected = last_position(expose(route(model, layer_map, PATH), discover(route(model, layer_map, PATH)), ["blocks.3.resid_out"]))
    result = run_passes(model, None, [Route(PATH), Expose(["blocks.3.resid_out"]), LastPosition()])
    assert result.SerializeToString() == expected.SerializeToString()
    assert [value.name for value in result.graph.output][-1] == "blocks.3.resid_out"


def test_refusals_are_one_line_and_come_before_any_change(llama):
    model, layer_map = llama
    before = model.SerializeToString()
    cases = [
        (lambda: Route(PATH)(model), "Route needs the model's layer map"),
        (lambda: Route([0, 7])(model, layer_map), "not a layer of this model"),
        (lambda: run_passes(model, layer_map, [Route(PATH), Route(PATH)]), "already routed"),
        (lambda: run_passes(model, layer_map, [PruneHeads({0: [1]}), PruneHeads({1: [1]})]), "already pruned"),
        (lambda: LastPosition("absent")(model), "no output 'absent'"),
    ]
    for call, message in cases:
        with pytest.raises(GraphPassError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert model.SerializeToString() == before


def test_a_graph_without_an_lm_head_is_refused_by_apply_and_left_as_it_is():
    # logits = Softmax(x): declared [batch, seq, vocab], but no weight matmul makes them.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", ["x"], ["logits"], name="softmax")], "toy",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 5])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", 5])])
    model = onnx.helper.make_model(graph)
    before = model.SerializeToString()
    with pytest.raises(GraphPassError, match="no weight matmul makes 'logits'"):
        LastPosition()(model)
    assert last_position(model) is None and model.SerializeToString() == before
