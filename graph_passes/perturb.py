"""The perturb pass: graph inputs that shift a layer's residual input and scale or shift its heads.

For each chosen layer ``l`` a new input ``perturb.blocks.{l}.resid_in`` [batch, seq, hidden] is added
to the residual stream entering the layer (every node of layer ``l`` that reads ``resid_in`` reads
``resid_in + delta``, the skip connection included). For each layer whose heads are chosen, the
head context [batch, heads, seq, head_dim] before the output projection becomes
``head_ctx * head_scale[:, :, None, None] + head_shift`` with inputs
``perturb.blocks.{l}.attn.head_scale`` [batch, heads] and ``perturb.blocks.{l}.attn.head_ctx``
[batch, heads, seq, head_dim]. Zeros and ones leave the model unchanged, so the rows of one batch
can hold the base forward and many perturbed ones of the same text. ``include_inserted`` updates a
LayerMap so the segment pass can cut a perturbed model layer by layer (a perturbation at layer ``l``
then runs layers ``l..L-1`` only).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import infer_types, topological_order
from graph_passes.layer_map import Layer, LayerMap, block_name

INSERTED_SCOPE = "/perturb/blocks."  # node names of what perturb and ablate insert: /perturb/blocks.{layer}/...


def resid_input(layer: int) -> str:
    """Name of the input added to layer ``layer``'s residual input."""
    return f"perturb.{block_name(layer, 'resid_in')}"


def head_scale_input(layer: int) -> str:
    """Name of the [batch, heads] input multiplying layer ``layer``'s head contexts."""
    return f"perturb.blocks.{layer}.attn.head_scale"


def head_shift_input(layer: int) -> str:
    """Name of the [batch, heads, seq, head_dim] input added to layer ``layer``'s head contexts."""
    return f"perturb.{block_name(layer, 'attn.head_ctx')}"


def perturb(model: onnx.ModelProto, layer_map: LayerMap, layers: Iterable[int] = (), heads: Iterable[int] = ()) -> onnx.ModelProto:
    """A copy of ``model`` with residual inputs for ``layers`` and head scale/shift inputs for the layers in ``heads``.

    ``heads`` names layers: every head of such a layer gets a scale and a shift (a row picks heads
    by its values). The canonical tensors (``resid_in``, ``head_ctx``) keep their unperturbed values.
    """
    layers, head_layers = checked_layers(layer_map, layers), checked_layers(layer_map, heads)
    if head_layers:
        require_heads(layer_map)
    out = copy_model(model)
    types = infer_types(model)
    batch, seq = stream_dims(model.graph)
    for l in layers:
        layer = layer_map.layers[l]
        delta = _add_input(out.graph, resid_input(l), elem_type(types, layer.resid_in), [batch, seq, layer_map.hidden_size])
        reroute(out.graph, layer, layer.resid_in, [("Add", delta)])
    for l in head_layers:
        layer = layer_map.layers[l]
        elem = elem_type(types, layer.head_ctx)
        scale = _add_input(out.graph, head_scale_input(l), elem, [batch, layer_map.num_heads])
        shift = _add_input(out.graph, head_shift_input(l), elem, [batch, layer_map.num_heads, seq, layer_map.head_dim])
        axes = add_constant(out.graph, f"{INSERTED_SCOPE}{l}/head_scale_axes", np.array([2, 3], dtype=np.int64))
        scale4 = f"{INSERTED_SCOPE}{l}/head_scale_4d"
        out.graph.node.append(helper.make_node("Unsqueeze", [scale, axes], [scale4], name=scale4))
        reroute(out.graph, layer, layer.head_ctx, [("Mul", scale4), ("Add", shift)])
    sort_nodes(out.graph)
    return out


def reroute(graph: onnx.GraphProto, layer: Layer, tensor: str, ops: Sequence[tuple[str, str]]) -> str:
    """Make the nodes of ``layer`` that read ``tensor`` read ``op_n(...op_1(tensor, operand_1)..., operand_n)`` instead.

    ``ops`` are binary elementwise ops (Add, Mul) with their second operand; nodes are appended
    (call ``sort_nodes`` after). Returns the name of the rerouted tensor. The perturb and ablate passes
    both go through here.
    """
    members = set(layer.nodes)
    readers = [node for node in graph.node if node.name in members and tensor in node.input]
    if not readers:
        raise GraphPassError(f"no node of layer {layer.index} reads {tensor!r}; the layer map was discovered on another graph: run discover on this one")
    current = tensor
    for k, (op, operand) in enumerate(ops):
        name = f"{INSERTED_SCOPE}{layer.index}/{tensor.strip('/').replace('/', '.')}/{op}_{k}"
        graph.node.append(helper.make_node(op, [current, operand], [name], name=name))
        current = name
    for node in readers:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = current
    return current


def include_inserted(layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap:
    """``layer_map`` with the nodes perturb or ablate inserted into each layer added to ``Layer.nodes``.

    Needed by passes that work on whole layers (segment, route) after perturb or ablate.
    """
    inserted: dict[int, list[str]] = {}
    for node in model.graph.node:
        if node.name.startswith(INSERTED_SCOPE):
            layer = int(node.name[len(INSERTED_SCOPE):].split("/", 1)[0])
            inserted.setdefault(layer, []).append(node.name)
    layers = tuple(replace(layer, nodes=layer.nodes + tuple(inserted.get(layer.index, ()))) for layer in layer_map.layers)
    return replace(layer_map, layers=layers)


def stream_dims(graph: onnx.GraphProto) -> tuple[onnx.TensorShapeProto.Dimension, onnx.TensorShapeProto.Dimension]:
    """The batch and sequence dims of the token inputs (``input_ids``, else the first 2-D input)."""
    inputs = {value.name: list(value.type.tensor_type.shape.dim) for value in graph.input}
    dims = inputs.get("input_ids") or next((d for d in inputs.values() if len(d) == 2), None)
    if not dims or len(dims) != 2:
        raise GraphPassError("the graph has no [batch, sequence] token input; give a transformer LM exported with Optimum")
    return dims[0], dims[1]


def checked_layers(layer_map: LayerMap, layers: Iterable[int]) -> list[int]:
    chosen = sorted(set(int(l) for l in layers))
    bad = [l for l in chosen if not 0 <= l < layer_map.num_layers]
    if bad:
        raise GraphPassError(f"layer {bad[0]} is out of range: the model has layers 0..{layer_map.num_layers - 1}")
    return chosen


def require_heads(layer_map: LayerMap) -> None:
    """GraphPassError unless every layer has its per-head context, with its head count and size known."""
    if layer_map.attention_op and not layer_map.available("attn.head_ctx"):
        raise GraphPassError(f"this graph's attention is fused ({layer_map.attention_op}): per-head tensors do not exist; "
                             "head-level analysis needs an unfused export (cp-onnx export)")
    if not layer_map.available("attn.head_ctx") or not layer_map.num_heads or not layer_map.head_dim:
        raise GraphPassError(f"this {layer_map.family} graph has no per-head attention context before the output projection; heads cannot be perturbed or ablated")


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def elem_type(types: dict, tensor: str) -> int:
    """Element type of a tensor as inferred (float when inference could not tell)."""
    value = types.get(tensor)
    return value.tensor_type.elem_type if value is not None and value.tensor_type.elem_type else onnx.TensorProto.FLOAT


def _add_input(graph: onnx.GraphProto, name: str, dtype: int, dims: list) -> str:
    if any(value.name == name for value in graph.input):
        raise GraphPassError(f"the model already has an input {name!r}; perturb the original model, not a perturbed one")
    value = graph.input.add()
    value.name = name
    value.type.tensor_type.elem_type = dtype
    for dim in dims:
        target = value.type.tensor_type.shape.dim.add()
        if isinstance(dim, onnx.TensorShapeProto.Dimension):
            target.CopyFrom(dim)
        elif dim is not None:
            target.dim_value = int(dim)
    return name


def add_constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def sort_nodes(graph: onnx.GraphProto) -> None:
    ordered = topological_order(graph)
    del graph.node[:]
    graph.node.extend(ordered)
