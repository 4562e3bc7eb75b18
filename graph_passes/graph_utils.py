"""Reading an ONNX graph: node names, producers and consumers, order, types and dims, layer membership.

The helpers that change a graph are in ``rewrite``; these only look (``name_nodes`` aside, which discovery
runs first so that nodes can be named at all).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict, deque
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from graph_passes.errors import GraphPassError
from graph_passes.fused_ops import PACKED_MATMULS
from graph_passes.graph_io import weightless_copy
from graph_passes.layer_map import LayerMap

# Ops that pass a tensor through unchanged in value (fp32 exports wrap the residual in Cast to fp32).
PASS_THROUGH = frozenset({"Cast", "Identity"})
# Ops that multiply by a weight matrix: what marks a branch as a sublayer rather than an activation.
MATMUL_OPS = frozenset({"MatMul", "Gemm", *PACKED_MATMULS})
# Per-token ops that may follow the lm_head (bias, softcapping, casts): what reads one position reads it alone.
PER_TOKEN_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity"})
# Optimum's KV-cache graph inputs and outputs, one key and one value per layer: what route, segment and prune_heads rename or resize.
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
# Sizes graph inputs get for shape inference: batch 1, every other free dim 7 (an odd size no head count or
# hidden size of a real model is likely to share).
_BATCH, _OTHER = 1, 7


def name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed or duplicate-named nodes deterministic names (``{op}_{position}``), in place; returns how many."""
    taken = Counter(node.name for node in model.graph.node if node.name)
    seen: set[str] = set()
    renamed = 0
    for position, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{position}" if not node.name else f"{node.name}_{position}"
        name, k = base, 0
        while name in taken or name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that computes it."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                readers[name].append(node)
    return dict(readers)


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where every node comes after the producers of its inputs (stable)."""
    nodes = list(graph.node)
    made_by = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting_on = [sum(1 for name in set(node.input) if name in made_by) for node in nodes]
    readers: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if name in made_by:
                readers[made_by[name]].append(i)
    ready = deque(i for i, count in enumerate(waiting_on) if count == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in sorted(readers[i]):
            waiting_on[j] -= 1
            if waiting_on[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise GraphPassError("the graph has a cycle: no topological order exists; re-export the model")
    return [nodes[i] for i in order]


def infer_types(model: onnx.ModelProto, fixed_dims: Mapping[str, list[int]] | None = None) -> dict[str, onnx.TypeProto]:
    """Tensor name -> inferred type, by ONNX shape inference on a weightless copy (fast, safe over 2 GB).

    ``fixed_dims`` replaces the dims of named graph inputs first, so that data propagation can turn
    computed shapes (Reshape targets built from Shape/Gather/Concat) into numbers.
    """
    light = weightless_copy(model)
    for value in light.graph.input:
        if fixed_dims and value.name in fixed_dims:
            for dim, size in zip(value.type.tensor_type.shape.dim, fixed_dims[value.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=fixed_dims is not None)
    except Exception:  # inference is a help, not a requirement: fall back to what the graph declares
        inferred = light
    graph = inferred.graph
    return {value.name: value.type for value in (*graph.input, *graph.value_info, *graph.output)}


def concrete_input_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Sizes for every graph input, for ``infer_types``: free dims set to batch 1 / 7, fixed dims kept."""
    sizes = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        sizes[value.name] = [d.dim_value if d.HasField("dim_value") else (_BATCH if k == 0 else _OTHER) for k, d in enumerate(dims)]
    return sizes


def elem_type(types: Mapping[str, onnx.TypeProto], tensor: str) -> int:
    """Element type of a tensor as inferred (float when inference could not tell)."""
    value = types.get(tensor)
    return value.tensor_type.elem_type if value is not None and value.tensor_type.elem_type else onnx.TensorProto.FLOAT


def token_dims(graph: onnx.GraphProto) -> tuple[onnx.TensorShapeProto.Dimension, onnx.TensorShapeProto.Dimension] | None:
    """The batch and sequence dims of the token inputs (``input_ids``, else the first 2-D input); None without one."""
    inputs = {value.name: list(value.type.tensor_type.shape.dim) for value in graph.input}
    dims = inputs.get("input_ids") or next((d for d in inputs.values() if len(d) == 2), None)
    return (dims[0], dims[1]) if dims and len(dims) == 2 else None


def static_dims(value_type: onnx.TypeProto | None) -> list[int | None] | None:
    """Dims of a tensor type as ints (None where unknown or symbolic); None when the rank is unknown."""
    if value_type is None or not value_type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value_type.tensor_type.shape.dim]


class GraphIndex:
    """Positions, producers and consumers of one graph's nodes, for the searches discovery makes."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.initializer_dims = {t.name: list(t.dims) for t in graph.initializer}
        self.initializers = set(self.initializer_dims)
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs = {v.name for v in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers[name].append(i)
        # Tensors computed from weights and constants alone (an Identity or Transpose of a weight counts).
        self.constants = set(self.initializers)
        for node in self.nodes:
            if all(name in self.constants for name in node.input if name):
                self.constants.update(node.output)

    def position(self, tensor: str) -> int:
        """Position of a tensor's producer (-1 for graph inputs and initializers)."""
        return self.producer.get(tensor, -1)

    def data_inputs(self, i: int) -> list[str]:
        """Inputs of node i that are computed (not weights or constants)."""
        return [name for name in self.nodes[i].input if name and name not in self.constants]

    def source(self, tensor: str) -> str:
        """The tensor behind any chain of Cast/Identity nodes."""
        while tensor in self.producer and self.nodes[self.producer[tensor]].op_type in PASS_THROUGH:
            tensor = self.nodes[self.producer[tensor]].input[0]
        return tensor

    def ancestors(self, tensor: str, *, after: int = -1, stop: frozenset[str] = frozenset()) -> set[int]:
        """Nodes that ``tensor`` depends on, at positions > ``after``, not looking past ``stop`` tensors."""
        found: set[int] = set()
        todo = [tensor]
        while todo:
            name = todo.pop()
            if name in stop:
                continue
            i = self.producer.get(name)
            if i is None or i <= after or i in found:
                continue
            found.add(i)
            todo.extend(n for n in self.nodes[i].input if n)
        return found

    def descendants_within(self, tensor: str, allowed: set[int]) -> set[int]:
        """Nodes in ``allowed`` that depend on ``tensor``."""
        found: set[int] = set()
        todo = [tensor]
        while todo:
            for j in self.consumers.get(todo.pop(), ()):
                if j in allowed and j not in found:
                    found.add(j)
                    todo.extend(n for n in self.nodes[j].output if n)
        return found

    def between(self, start: str, end: str) -> set[int] | None:
        """Nodes on some path from ``start`` to ``end`` (end's producer included); None if ``end`` does not depend on ``start``."""
        if start == end:
            return set()
        upstream = self.ancestors(end, after=self.position(start))
        path = self.descendants_within(start, upstream)
        return path if self.producer.get(end) in path else None

    def is_dead_end(self, i: int) -> bool:
        """Whether nothing reads node i's outputs (e.g. an Identity that only feeds a graph output)."""
        return not any(self.consumers.get(name) for name in self.nodes[i].output)

    def ops(self, nodes: Iterable[int]) -> set[str]:
        return {self.nodes[i].op_type for i in nodes}


def find_lm_head(index: GraphIndex, logits: str, members: set[int] | None = None) -> tuple[int | None, str | None]:
    """The weight matmul that makes ``logits`` through per-token ops only (among ``members``, default every node)
    and its data input, or (None, None)."""
    tensor = logits
    while (i := index.producer.get(tensor)) is not None and (members is None or i in members):
        node = index.nodes[i]
        data = index.data_inputs(i)
        if len(data) != 1:
            return None, None
        if node.op_type in MATMUL_OPS and node.input[0] == data[0]:
            return i, data[0]
        if node.op_type not in PER_TOKEN_OPS:
            return None, None
        tensor = data[0]
    return None, None


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or ``default`` when the node does not set it."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def weight_shape(index: GraphIndex, node: onnx.NodeProto, types: Mapping[str, onnx.TypeProto] | None = None) -> tuple[int, int] | None:
    """(input width, output width) of a weight matmul, from its weight's dims (transB honoured) or, for a
    packed quantized weight, from the node's attributes; None when unknown."""
    if node.op_type in PACKED_MATMULS:
        widths = tuple(attribute(node, name) for name in PACKED_MATMULS[node.op_type])
        return widths if all(isinstance(w, int) for w in widths) else None
    weight = node.input[1] if len(node.input) > 1 else None
    dims = index.initializer_dims.get(weight) or static_dims((types or {}).get(weight))
    if not dims or len(dims) != 2 or None in dims:
        return None
    return (dims[1], dims[0]) if attribute(node, "transB", 0) else (dims[0], dims[1])


def first_weight_matmul(index: GraphIndex, tensor: str, members: set[int] | None = None) -> int | None:
    """Position of the first weight matmul that reads ``tensor`` through other nodes (among ``members``, default
    every node), breadth first: the output projection that reads a head context through its reshapes."""
    seen, todo = set(), [tensor]
    while todo:
        for j in sorted(index.consumers.get(todo.pop(0), ())):
            if members is not None and j not in members or j in seen:
                continue
            node = index.nodes[j]
            if node.op_type in MATMUL_OPS and len(node.input) > 1 and node.input[1] in index.constants:
                return j
            seen.add(j)
            todo.extend(node.output)
    return None


def projection_width(index: GraphIndex, tensor: str, types: Mapping[str, onnx.TypeProto] | None = None) -> int | None:
    """Input width of the first weight matmul that reads ``tensor`` (through reshapes): o_proj's heads * head_dim."""
    j = first_weight_matmul(index, tensor)
    shape = weight_shape(index, index.nodes[j], types) if j is not None else None
    return shape[0] if shape else None


def constant_value(graph: onnx.GraphProto, index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output, else None (a value computed at run time)."""
    tensor = next((t for t in graph.initializer if t.name == name), None)
    if tensor is not None:
        return numpy_helper.to_array(tensor)
    i = index.producer.get(name)
    if i is not None and index.nodes[i].op_type == "Constant":
        value = next((a for a in index.nodes[i].attribute if a.name == "value"), None)
        return numpy_helper.to_array(value.t) if value is not None else None
    return None


def node_reads(node: onnx.NodeProto) -> Iterable[str]:
    """Tensor names a node reads, including those its subgraphs read from the outer scope (over-approximated)."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            for inner in sub.node:
                yield from node_reads(inner)


def layer_of_nodes(graph: onnx.GraphProto, layer_map: LayerMap) -> dict[str, int]:
    """Node name -> layer index, after checking the layer map was discovered on this graph."""
    names = {node.name for node in graph.node}
    layer_of: dict[str, int] = {}
    for layer in layer_map.layers:
        if not layer.nodes:
            raise GraphPassError(f"the layer map lists no nodes for layer {layer.index}; run discover on this graph")
        missing = next((name for name in layer.nodes if name not in names), None)
        if missing is not None:
            raise GraphPassError(f"layer {layer.index}'s node {missing!r} is not in this graph: the layer map was discovered on another graph; run discover on this one")
        layer_of.update(dict.fromkeys(layer.nodes, layer.index))
    for node in graph.node:
        if node.name in layer_of and any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise GraphPassError(f"layer {layer_of[node.name]} contains the control-flow node {node.name!r} ({node.op_type}); routing layers with subgraphs is not supported, re-export without it")
    return layer_of
