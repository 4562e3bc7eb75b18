"""discover: family tables and the topology fallback on every tiny family, layer node sets checked by removing layers."""
from __future__ import annotations

import copy
import dataclasses
import re
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cp_onnx.models.runner import Runner
from graph_passes import GraphPassError, discover, graph_io
from graph_passes.graph_utils import name_nodes, topological_order
from support import MODULES, TINY, module, rel_err, token_batch

# What auto-detection calls each tiny model: Mistral's export is node-for-node Llama's.
DETECTED = {"mistral": "llama", "gpt_neox_sequential": "gpt_neox"}
# Optimum's scope of layer N's nodes, per detected family.
SCOPE = {
    "gpt2": "/transformer/h.{}/",
    "gpt_neox": "/gpt_neox/layers.{}/",
    "bert": "/bert/encoder/layer.{}/",
}


def opaque_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy with every tensor and node name replaced by x<number>, and the renaming (old -> new)."""
    renamed = copy.deepcopy(model)
    graph = renamed.graph
    names: dict[str, str] = {}

    def opaque(name: str) -> str:
        if name and name not in names:
            names[name] = f"x{len(names)}"
        return names.get(name, name)

    for value in (*graph.input, *graph.initializer, *graph.value_info, *graph.output):
        value.name = opaque(value.name)
    for node in graph.node:
        node.input[:] = [opaque(n) for n in node.input]
        node.output[:] = [opaque(n) for n in node.output]
    for node, original in zip(graph.node, model.graph.node):
        node.name = names[original.name] = f"x{len(names)}"
    return renamed, names


def summary(layer_map, rename=lambda name: name):
    """Everything a LayerMap says, with tensor and node names passed through ``rename``."""
    opt = lambda name: rename(name) if name is not None else None  # noqa: E731
    layers = [
        (opt(l.resid_in), opt(l.resid_mid), opt(l.resid_out), opt(l.head_ctx), opt(l.pattern), tuple(map(rename, l.nodes)))
        for l in layer_map.layers
    ]
    return dict(
        layers=layers,
        embed=opt(layer_map.embed),
        final_norm=opt(layer_map.final_norm),
        logits=opt(layer_map.logits),
        shared=tuple(map(rename, layer_map.shared_inputs)),
        sizes=(layer_map.num_heads, layer_map.head_dim, layer_map.hidden_size),
    )


@pytest.mark.parametrize("family", list(TINY))
def test_family_tables_find_every_layer_and_size(tiny_model, family):
    hf, onnx_path = tiny_model(family)
    layer_map = discover(graph_io.load(onnx_path))
    config = hf.config
    assert layer_map.family == DETECTED.get(family, family)
    assert layer_map.num_layers == config.num_hidden_layers
    assert layer_map.hidden_size == config.hidden_size
    assert layer_map.num_heads == config.num_attention_heads
    assert layer_map.head_dim == getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert layer_map.available("resid_mid") == (MODULES[family][1] is not None)
    assert all(layer.head_ctx and layer.pattern for layer in layer_map.layers)
    assert [layer.resid_in for layer in layer_map.layers] == [layer_map.embed] + [layer.resid_out for layer in layer_map.layers[:-1]]
    assert layer_map.logits == "logits"
    assert (layer_map.final_norm is None) == (family == "bert")  # post-LN BERT has no final norm


@pytest.mark.parametrize("family", list(TINY))
def test_layer_nodes_are_their_scopes_and_nothing_shared(tiny_model, family):
    """Layers i >= 1 hold every node of their Optimum scope; layer 0 all of its own except what other layers read."""
    _, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    layer_map = discover(model)
    scope = SCOPE.get(layer_map.family, "/model/layers.{}/")
    all_nodes = [node.name for node in model.graph.node]
    assert len(set(all_nodes)) == len(all_nodes)
    seen: set[str] = set()
    for layer in layer_map.layers:
        assert not seen & set(layer.nodes), "a node belongs to two layers"
        seen |= set(layer.nodes)
        assert list(layer.nodes) == [n for n in all_nodes if n in set(layer.nodes)], "nodes are not in graph order"
        for i in range(layer_map.num_layers):  # no node of another layer's scope
            if i != layer.index:
                assert not [n for n in layer.nodes if n.startswith(scope.format(i))]
        scoped = {n for n in all_nodes if n.startswith(scope.format(layer.index))}
        missing = scoped - set(layer.nodes)
        if layer.index > 0:
            assert not missing
        else:  # what layer 0 lacks of its scope is what layer 1 reads from it (rotary tables), and their inputs
            by_output = {out: node for node in model.graph.node for out in node.output}
            read_by_next = {n for node in model.graph.node if node.name.startswith(scope.format(1)) for n in node.input if by_output.get(n) and by_output[n].name in missing}
            assert read_by_next <= set(layer_map.shared_inputs)
            needed, todo = set(), list(read_by_next)
            while todo:
                node = by_output.get(todo.pop())
                if node is not None and node.name in missing and node.name not in needed:
                    needed.add(node.name)
                    todo.extend(node.input)
            assert needed == missing
    shared_producers = {n.name for n in model.graph.node for out in n.output if out in layer_map.shared_inputs}
    assert not shared_producers & seen


def without_layer(model: onnx.ModelProto, layer) -> onnx.ModelProto:
    """The graph with ``layer``'s nodes deleted and its output replaced by its input."""
    pruned = copy.deepcopy(model)
    gone = set(layer.nodes)
    inside = {out for node in pruned.graph.node if node.name in gone for out in node.output}
    kept = [node for node in pruned.graph.node if node.name not in gone]
    for node in kept:
        node.input[:] = [layer.resid_in if name == layer.resid_out else name for name in node.input]
    read_inside = {name for node in kept for name in node.input} & inside
    assert not read_inside, f"nodes outside layer {layer.index} read its tensors {sorted(read_inside)[:3]}"
    del pruned.graph.node[:]
    pruned.graph.node.extend(kept)
    return pruned


@pytest.mark.parametrize("family", list(TINY))
def test_removing_a_layers_nodes_equals_transformers_without_that_layer(tiny_model, family):
    """Layer.nodes is exactly the layer: deleting them (layer 0, whose scope holds shared rotary nodes, and
    the last) leaves a valid graph computing what transformers computes without that layer."""
    import torch

    hf, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    layer_map = discover(model)
    ids, mask = token_batch("right")
    for index in (0, layer_map.num_layers - 1):
        runner = Runner(without_layer(model, layer_map.layers[index]), threads=1)
        got = runner.run(ids, mask)["logits"]
        shorter = copy.deepcopy(hf)
        del module(shorter, MODULES[family][0])[index]
        with torch.no_grad():
            expected = shorter(**{k: torch.from_numpy(v) for k, v in runner.feeds(ids, mask).items()}).logits.numpy()
        valid = mask.astype(bool)
        assert rel_err(got[valid], expected[valid]) <= 1e-4, f"{family}: without layer {index}"
        full = Runner(model, threads=1).run(ids, mask)["logits"]
        assert rel_err(got[valid], full[valid]) > 1e-3  # the layer really was removed


@pytest.mark.parametrize("family", list(TINY))
def test_structural_fallback_finds_the_same_layers_in_a_renamed_graph(tiny_model, family):
    _, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    named = discover(model)
    renamed, names = opaque_copy(model)
    assert not any(node.name.startswith("/") for node in renamed.graph.node)
    found = discover(renamed)
    assert found.family == "structural"
    assert summary(found) == summary(named, names.__getitem__)
    assert summary(discover(model, family="structural")) == summary(named)


@pytest.mark.parametrize(
    "family, prefix, wrapped",
    [("llama", "/model/", "/model/model/"), ("gemma3", "/model/", "/model/language_model/"), ("bert", "/bert/", "/")],
)
def test_wrapper_prefixes_in_node_names_are_absorbed(tiny_model, family, prefix, wrapped):
    _, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    named = discover(model)
    wrap = lambda name: wrapped + name[len(prefix) :] if name.startswith(prefix) else name  # noqa: E731
    for node in model.graph.node:
        node.name = wrap(node.name)
    found = discover(model)
    assert found.family == named.family
    assert found.layers == tuple(dataclasses.replace(layer, nodes=tuple(map(wrap, layer.nodes))) for layer in named.layers)
    assert (found.embed, found.final_norm, found.shared_inputs) == (named.embed, named.final_norm, named.shared_inputs)


def test_unnamed_nodes_get_deterministic_names(tiny_model):
    _, onnx_path = tiny_model("llama")
    stripped = graph_io.load(onnx_path)
    for node in stripped.graph.node:
        node.name = ""
    first, second = copy.deepcopy(stripped), copy.deepcopy(stripped)
    assert summary(discover(first)) == summary(discover(second))
    names = [node.name for node in first.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert name_nodes(first) == 0  # already named: nothing changes


def test_duplicate_node_names_are_made_unique():
    model = lone_matmul()
    node = model.graph.node[0]
    model.graph.node.append(helper.make_node("Identity", ["y"], ["z"], name=node.name))
    model.graph.output[0].name = "z"
    assert name_nodes(model) == 1
    assert len({n.name for n in model.graph.node}) == 2
    assert [n.name for n in topological_order(model.graph)] == [n.name for n in model.graph.node]


def lone_matmul() -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "lone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_graph_without_layers_is_refused_with_what_was_looked_for():
    with pytest.raises(GraphPassError) as caught:
        discover(lone_matmul())
    message = str(caught.value)
    assert message.startswith("no transformer layers found")
    for looked_for in ("/model/layers.N/", "/transformer/h.N/", "/gpt_neox/layers.N/", "/encoder/layer.N/", "residual chain of Add"):
        assert looked_for in message
    assert "\n" not in message


def test_a_wrong_or_unknown_family_is_refused(tiny_model):
    _, onnx_path = tiny_model("gpt2")
    model = graph_io.load(onnx_path)
    with pytest.raises(GraphPassError, match=r"does not look like a llama export.*leave the family out"):
        discover(model, family="llama")
    with pytest.raises(GraphPassError, match=r"unknown model family 'llama3'; expected one of .*llama.*structural"):
        discover(model, family="llama3")
    assert discover(model, family="gpt2").family == "gpt2"


def test_mistral_is_found_when_named(tiny_model):
    _, onnx_path = tiny_model("mistral")
    model = graph_io.load(onnx_path)
    by_name = discover(model, family="mistral")
    assert by_name.family == "mistral"
    assert summary(by_name) == summary(discover(model))


@pytest.mark.slow
def test_structural_fallback_on_renamed_smollm2(smollm2_dir):
    model = graph_io.load(smollm2_dir / "model.onnx")
    started = time.perf_counter()
    named = discover(model)
    seconds = time.perf_counter() - started
    assert (named.family, named.num_layers, named.num_heads, named.head_dim, named.hidden_size) == ("llama", 30, 9, 64, 576)
    assert seconds < 10
    # Rotary tables (under layer 0's scope) and the expanded mask are read by every layer.
    assert set(named.shared_inputs) >= {"/model/Expand_output_0"}
    assert any(re.match(r"/model/layers\.0/", name) for name in named.shared_inputs)
    renamed, names = opaque_copy(model)
    del model
    found = discover(renamed)
    assert found.family == "structural"
    assert summary(found) == summary(named, names.__getitem__)
