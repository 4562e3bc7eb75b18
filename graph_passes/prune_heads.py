"""The prune-heads pass: remove attention heads from the weights, so the model computes fewer heads.

In each layer with heads to remove, the query projection keeps the columns of the kept heads (weight
and bias) and the output projection the matching rows. A key/value head goes too (its columns of the
key and value projections, and its slice of the layer's KV-cache inputs and outputs) once no kept
query head reads it. The projections are found from the attention itself: the query, key and value
paths are walked back from the two attention MatMuls (scores and context) to the first weight
MatMul on each, the output projection forward from the head context; so names do not matter, but
each of q, k and v must have its own projection (fused qkv weights are refused).

Grouped-query attention repeats each key/value head for ``heads / kv_heads`` query heads, by a
constant in the graph. That repeat is left as it is; where the kept query heads no longer line up
with the repeated key/value heads, a Gather on the head axis picks, for each kept query head, a copy
of its key/value head just before the attention MatMuls. Reshape targets in the export are built
with -1 for the head count, so they follow the new widths; constant targets that name the head
count are rewritten. The result computes exactly what the original computes with those heads'
contexts zeroed (the ablate pass): a removed head contributes nothing through the output projection.
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_passes import metadata
from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import (MATMUL_OPS, PAST, PRESENT, GraphIndex, concrete_input_dims, constant_value, first_weight_matmul, infer_types,
                                     layer_of_nodes, static_dims)
from graph_passes.layer_map import LayerMap
from graph_passes.metadata import HEADS_KEY
from graph_passes.passes import GraphPass, checked_heads, require_heads
from graph_passes.rewrite import drop_unread_initializers, graph_reads, sort_nodes

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


class PruneHeads(GraphPass):
    """Remove the heads ``{layer: [head, ...]}`` from the weights; weights left on disk are read from ``weights_dir``.

    Each layer keeps at least one head, and a model is pruned once. That each layer's attention has the shape
    this pass can slice (separate q, k, v projections; see above) ``apply`` finds out before it changes anything;
    ``ensures`` checks by shape inference that every pruned layer's head context has its new head count.
    """

    def __init__(self, heads: Mapping[int, Sequence[int]], *, weights_dir: str | None = None):
        self.heads, self.weights_dir = heads, weights_dir

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        require_heads(layer_map)
        if metadata.read(model, HEADS_KEY) is not None:
            raise GraphPassError("this model's heads are already pruned; prune the original model instead")
        for l, hs in checked_heads(layer_map, self.heads).items():
            if len(hs) == layer_map.num_heads:
                raise GraphPassError(f"removing all {layer_map.num_heads} heads of layer {l} leaves it no attention; keep one, or remove the layer (prune --skip)")

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        chosen = checked_heads(layer_map, self.heads)
        if not chosen:
            return
        graph, num_heads = model.graph, layer_map.num_heads
        read_before = graph_reads(graph)
        index = GraphIndex(graph)
        types = infer_types(model, concrete_input_dims(graph))
        layer_of = layer_of_nodes(graph, layer_map)
        weights = _Weights(graph, self.weights_dir)
        kept_record = {}
        for l, removed in chosen.items():
            members = {i for i, node in enumerate(index.nodes) if layer_of.get(node.name) == l}
            kept = [h for h in range(num_heads) if h not in removed]
            kept_record[str(l)] = kept
            _prune_layer(graph, index, types, weights, members, layer_map, l, kept)
        sort_nodes(graph)
        drop_unread_initializers(graph, read_before)
        del graph.value_info[:]  # shapes inside pruned layers changed; onnxruntime infers them again
        metadata.write(model, {HEADS_KEY: json.dumps(kept_record)})

    def ensures(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        counts = {l: len(kept) for l, kept in metadata.kept_heads(model).items()}
        if not counts:
            return
        types = infer_types(model, concrete_input_dims(model.graph))
        for l, count in counts.items():
            dims = static_dims(types.get(layer_map.layers[l].head_ctx))
            if dims is not None and len(dims) == 4 and dims[1] is not None and dims[1] != count:
                raise GraphPassError(f"layer {l}: after pruning, the head context has {dims[1]} heads, not {count}; the graph fixes its head count somewhere this pass does not rewrite")


def prune_heads(model: onnx.ModelProto, layer_map: LayerMap, heads: Mapping[int, Sequence[int]], *, weights_dir: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without the heads ``{layer: [head, ...]}`` (see ``PruneHeads``)."""
    return PruneHeads(heads, weights_dir=weights_dir)(model, layer_map)


def _prune_layer(graph, index: GraphIndex, types, weights: "_Weights", members: set[int], layer_map: LayerMap, l: int, kept: list[int]) -> None:
    layer = layer_map.layers[l]
    head_dim = layer_map.head_dim
    context = index.producer.get(layer.head_ctx)
    scores = _scores_matmul(index, members, layer.pattern) if layer.pattern else None
    if context is None or scores is None or index.nodes[context].op_type != "MatMul":
        raise GraphPassError(f"layer {l}'s attention is not two MatMuls around a Softmax (scores, then context); its heads cannot be pruned")
    sides = {"q": index.nodes[scores].input[0], "k": index.nodes[scores].input[1], "v": index.nodes[context].input[1]}
    proj = {role: _projection(index, members, types, tensor, role, l) for role, tensor in sides.items()}
    if len(set(proj.values())) < 3:
        raise GraphPassError(f"layer {l} computes queries, keys and values with one fused projection; head pruning needs separate q, k and v projections")
    o_proj = _output_projection(index, members, layer.head_ctx, l)
    width = {role: weights.width(index.nodes[i]) for role, i in proj.items()}
    num_heads, kv_heads = width["q"] // head_dim, width["k"] // head_dim
    if num_heads != layer_map.num_heads or width["k"] != width["v"] or num_heads % kv_heads:
        raise GraphPassError(f"layer {l}: projection widths q {width['q']}, k {width['k']}, v {width['v']} do not fit {layer_map.num_heads} heads of {head_dim}")
    repeat = num_heads // kv_heads
    kept_kv = sorted({h // repeat for h in kept})
    columns = lambda groups: np.concatenate([np.arange(g * head_dim, (g + 1) * head_dim) for g in groups])  # noqa: E731
    for role, groups in (("q", kept), ("k", kept_kv), ("v", kept_kv)):
        node = index.nodes[proj[role]]
        weights.slice(node, 1, columns(groups), axis=1, name=f"/prune_heads/blocks.{l}.{role}_proj.weight")
        for bias, slot in _biases(index, members, node):
            weights.slice(bias, slot, columns(groups), axis=-1, name=f"/prune_heads/blocks.{l}.{role}_proj.bias")
        for reshape in _reshapes(index, members, node):
            _retarget(graph, index, reshape, (num_heads if role == "q" else kv_heads, len(groups)), head_dim, l, split=True)
    weights.width(index.nodes[o_proj])  # a plain [in, out] MatMul, or a one-line error
    weights.slice(index.nodes[o_proj], 1, columns(kept), axis=0, name=f"/prune_heads/blocks.{l}.o_proj.weight")
    for reshape in _reshapes_forward(index, members, layer.head_ctx, o_proj):
        _retarget(graph, index, reshape, (num_heads, len(kept)), head_dim, l, split=False)
    picks = [kept_kv.index(h // repeat) * repeat for h in kept]  # a copy of each kept query head's key/value head
    if picks != list(range(len(kept_kv) * repeat)):  # else every repeated copy is read, in order
        for node_at, slot, role in ((scores, 1, "k"), (context, 1, "v")):
            _gather_heads(graph, index.nodes[node_at], slot, picks, f"/model/layers.{l}/prune_heads/{role}")
    _resize_cache(graph, index, members, len(kept_kv))


def _scores_matmul(index: GraphIndex, members: set[int], pattern: str) -> int | None:
    """The MatMul of queries and keys that the Softmax (``pattern``) reads, through masks and scales."""
    found = _walk_back(index, members, index.nodes[index.producer[pattern]].input[0],
                       lambda node: node.op_type == "MatMul" and not set(node.input) & index.constants)
    return found[0] if found else None


def _projection(index: GraphIndex, members: set[int], types, tensor: str, role: str, l: int) -> int:
    """The weight MatMul a float path walked back from ``tensor`` reaches first (through reshapes, rotary, norms, the KV cache)."""
    found = set(_walk_back(index, members, tensor, lambda node: node.op_type in MATMUL_OPS and len(node.input) > 1 and node.input[1] in index.constants,
                           lambda name: _is_float(types, name)))
    if len(found) != 1:
        raise GraphPassError(f"layer {l}: found {len(found)} projections feeding the attention's {role} side, expected one; its heads cannot be pruned")
    return found.pop()


def _walk_back(index: GraphIndex, members: set[int], tensor: str, stop, follow=lambda name: True) -> list[int]:
    """The layer's nodes that ``stop`` accepts, reached walking back from ``tensor`` through computed inputs that ``follow``
    accepts (not walking past an accepted node), in the order found."""
    todo, seen, found = [tensor], set(), []
    while todo:
        i = index.producer.get(todo.pop())
        if i is None or i not in members or i in seen:
            continue
        seen.add(i)
        if stop(index.nodes[i]):
            found.append(i)
            continue
        todo.extend(name for name in index.nodes[i].input if name and name not in index.constants and follow(name))
    return found


def _output_projection(index: GraphIndex, members: set[int], head_ctx: str, l: int) -> int:
    """The first weight MatMul that reads the head context (through its transpose and reshape)."""
    found = first_weight_matmul(index, head_ctx, members)
    if found is None:
        raise GraphPassError(f"layer {l}: no output projection reads the head context; its heads cannot be pruned")
    return found

def _biases(index: GraphIndex, members: set[int], projection: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """(Add node, input slot) of a bias added straight to the projection's output."""
    found = []
    for j in index.consumers.get(projection.output[0], ()):
        node = index.nodes[j]
        if j in members and node.op_type == "Add":
            found += [(node, k) for k, name in enumerate(node.input) if name in index.constants]
    return found


def _reshapes(index: GraphIndex, members: set[int], projection: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Reshapes that split the projection's output into heads: the first Reshape after it (and its bias)."""
    todo, found = [projection.output[0]], []
    while todo:
        for j in index.consumers.get(todo.pop(), ()):
            node = index.nodes[j]
            if j in members and node.op_type == "Reshape":
                found.append(node)
            elif j in members and node.op_type == "Add":
                todo.extend(node.output)
    return found


def _reshapes_forward(index: GraphIndex, members: set[int], head_ctx: str, o_proj: int) -> list[onnx.NodeProto]:
    """Reshapes between the head context and the output projection (heads merged back into the width)."""
    path = index.between(head_ctx, index.nodes[o_proj].input[0]) or set()
    return [index.nodes[j] for j in sorted(path) if j in members and index.nodes[j].op_type == "Reshape"]


def _retarget(graph: onnx.GraphProto, index: GraphIndex, reshape: onnx.NodeProto, counts: tuple[int, int], head_dim: int, l: int, *,
              split: bool) -> None:
    """Rewrite a constant Reshape target that names the head count: ``[..., heads, head_dim]`` where a projection's output
    is split into heads (``split``), ``[..., heads * head_dim]`` where they are merged back (targets with -1 adapt by themselves)."""
    value = constant_value(graph, index, reshape.input[1])
    if value is None or value.ndim != 1 or not len(value):
        return
    (old, new), changed = counts, value.astype(np.int64).copy()
    if split and len(value) >= 2 and value[-1] == head_dim and value[-2] == old:
        changed[-2] = new
    elif not split and value[-1] == old * head_dim:
        changed[-1] = new * head_dim
    if not np.array_equal(changed, value):
        name = f"/model/layers.{l}/prune_heads/{reshape.name.rsplit('/', 1)[-1]}_shape"
        graph.initializer.append(numpy_helper.from_array(changed, name))
        node = next(n for n in graph.node if n.name == reshape.name)
        node.input[1] = name


def _gather_heads(graph: onnx.GraphProto, node: onnx.NodeProto, slot: int, picks: list[int], scope: str) -> None:
    """Make ``node`` read ``Gather(input, picks, axis=1)``: the key/value head copy of each kept query head."""
    picks_name, picked = f"{scope}/head_picks", f"{scope}/Gather_output_0"
    graph.initializer.append(numpy_helper.from_array(np.asarray(picks, dtype=np.int64), picks_name))
    target = next(n for n in graph.node if n.name == node.name)
    graph.node.append(helper.make_node("Gather", [target.input[slot], picks_name], [picked], name=f"{scope}/Gather", axis=1))
    target.input[slot] = picked


def _resize_cache(graph: onnx.GraphProto, index: GraphIndex, members: set[int], kv_heads: int) -> None:
    """Set the head dim of the layer's KV-cache inputs (read by its nodes) and outputs (made by them) to ``kv_heads``."""
    read = {name for i in members for name in index.nodes[i].input}
    made = {name for i in members for name in index.nodes[i].output}
    for values, pattern, mine in ((graph.input, PAST, read), (graph.output, PRESENT, made)):
        for value in values:
            if pattern.match(value.name) and value.name in mine:
                dim = value.type.tensor_type.shape.dim[1]
                dim.Clear()
                dim.dim_value = kv_heads


def _is_float(types, name: str) -> bool:
    value = types.get(name)
    return value is None or value.tensor_type.elem_type in _FLOATS


class _Weights:
    """Initializers by name, sliced into new ones (the originals stay until nothing reads them)."""

    def __init__(self, graph: onnx.GraphProto, weights_dir: str | None):
        self.graph, self.dir = graph, weights_dir
        self.by_name = {t.name: t for t in graph.initializer}
        # Exporters share equal weights through Identity nodes (all-zero biases of a random model, say).
        self.identity = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}

    def array(self, name: str) -> np.ndarray:
        while name not in self.by_name and name in self.identity:
            name = self.identity[name]
        tensor = self.by_name.get(name)
        if tensor is None:
            raise GraphPassError(f"weight {name!r} is not an initializer of the graph (computed weights cannot be pruned)")
        if tensor.data_location == onnx.TensorProto.EXTERNAL and self.dir is None:
            raise GraphPassError(f"weight {name!r} is stored outside the graph; pass weights_dir= the model's folder")
        return numpy_helper.to_array(tensor, self.dir or "")

    def width(self, node: onnx.NodeProto) -> int:
        """The projection's output width, from its weight [in, out]."""
        if node.op_type != "MatMul":
            raise GraphPassError(f"{node.name}: a {node.op_type} projection cannot be sliced by head; prune the float model before quantizing")
        shape = self.array(node.input[1]).shape
        if len(shape) != 2:
            raise GraphPassError(f"{node.name}: its weight has shape {list(shape)}, not [in, out]; its heads cannot be pruned")
        return shape[1]

    def slice(self, node: onnx.NodeProto, slot: int, keep: np.ndarray, *, axis: int, name: str) -> None:
        """Point ``node.input[slot]`` at a new initializer that keeps the indices ``keep`` of ``axis``."""
        value = self.array(node.input[slot])
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.take(value, keep, axis=axis)), name))
        target = next(n for n in self.graph.node if n.name == node.name)
        target.input[slot] = name
