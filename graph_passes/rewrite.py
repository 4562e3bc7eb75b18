"""Changing an ONNX graph: the edits several passes make (copy, add inputs, constants and outputs, clone and reroute
nodes, keep what the outputs need, drop weights nothing reads). Each changes what it is given, in place."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import node_reads, topological_order
from graph_passes.layer_map import Layer, LayerMap

# Node names of what perturb and ablate insert into a layer: /perturb/blocks.{layer}/... (include_inserted reads them).
INSERTED_SCOPE = "/perturb/blocks."

Dim = onnx.TensorShapeProto.Dimension | int | None  # a dim to declare: copied, fixed, or left unknown


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def tensor_type(elem_type: int, dims: Sequence[Dim] | None) -> onnx.TypeProto:
    """A tensor type of ``elem_type`` whose dims are copied (a Dimension), fixed (an int) or unknown (None); no shape
    at all (unknown rank) for ``dims=None``."""
    value_type = onnx.TypeProto()
    value_type.tensor_type.elem_type = elem_type
    if dims is None:
        return value_type
    shape = value_type.tensor_type.shape
    shape.SetInParent()  # a declared rank, even 0
    for dim in dims:
        target = shape.dim.add()
        if isinstance(dim, onnx.TensorShapeProto.Dimension):
            target.CopyFrom(dim)
        elif dim is not None:
            target.dim_value = int(dim)
    return value_type


def add_input(graph: onnx.GraphProto, name: str, elem_type: int, dims: Sequence[Dim]) -> str:
    value = graph.input.add()
    value.name = name
    value.type.CopyFrom(tensor_type(elem_type, dims))
    return name


def add_constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def add_outputs(model: onnx.ModelProto, outputs: Mapping[str, str], types: Mapping[str, onnx.TypeProto]) -> None:
    """Append graph outputs named by ``outputs`` keys, each an Identity of the tensor it maps to."""
    graph = model.graph
    for new_name, tensor in outputs.items():
        if new_name != tensor:
            graph.node.append(helper.make_node("Identity", [tensor], [new_name], name=f"/expose/{new_name}"))
        value = onnx.ValueInfoProto(name=new_name)
        value.type.CopyFrom(types[new_name])
        graph.output.append(value)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Put the nodes in topological order (passes append what they insert at the end)."""
    ordered = topological_order(graph)
    del graph.node[:]
    graph.node.extend(ordered)


def clone_nodes(nodes: Iterable[onnx.NodeProto], suffix: str, rename: dict[str, str]) -> list[onnx.NodeProto]:
    """Copies of ``nodes`` with ``suffix`` on node names and on every output not in ``rename``; inputs renamed.

    ``rename`` (original tensor -> new name) gains the outputs' new names, so a caller can follow them."""
    nodes = list(nodes)
    for node in nodes:
        for name in node.output:
            if name and name not in rename:
                rename[name] = name + suffix
    clones = []
    for node in nodes:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = node.name + suffix
        clone.input[:] = [rename.get(name, name) for name in node.input]
        clone.output[:] = [rename.get(name, name) for name in node.output]
        clones.append(clone)
    return clones


def live_nodes(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes some of ``outputs`` depend on (an omitted layer's weight casts, say, go), order kept; ``nodes`` in
    topological order, as ONNX requires, so one backward sweep finds them."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(node_reads(node))
    return keep[::-1]


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor the graph's nodes or outputs read: what ``drop_unread_initializers`` compares against."""
    return {name for node in graph.node for name in node_reads(node)} | {value.name for value in graph.output}


def drop_unread_initializers(graph: onnx.GraphProto, read_before: set[str]) -> None:
    """Drop the initializers that were read (``read_before``, from ``graph_reads`` before the rewrite) and no longer
    are (weights only omitted layers or removed heads used), with their graph-input entries in old IR versions."""
    read_now = graph_reads(graph)
    unused = {t.name for t in graph.initializer if t.name in read_before and t.name not in read_now}
    if not unused:
        return
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [value for value in graph.input if value.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)


def reroute(graph: onnx.GraphProto, layer: Layer, tensor: str, ops: Sequence[tuple[str, str]]) -> str:
    """Make the nodes of ``layer`` that read ``tensor`` read ``op_n(...op_1(tensor, operand_1)..., operand_n)`` instead.

    ``ops`` are binary elementwise ops (Add, Mul) with their second operand; nodes are appended
    (call ``sort_nodes`` after). Returns the name of the rerouted tensor. The perturb and ablate passes
    both go through here, so ``include_inserted`` finds what either inserted.
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
