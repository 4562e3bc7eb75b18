"""The expose pass: make chosen activations graph outputs, named by their canonical names."""
from __future__ import annotations

from typing import Iterable

import onnx

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import add_outputs, infer_types, node_reads
from graph_passes.layer_map import LayerMap, parse_name

_STREAM_ROLES = {"resid_in", "resid_mid", "resid_out", "embed", "final_norm"}


def expose(model: onnx.ModelProto, layer_map: LayerMap, names: Iterable[str], *, only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are its original ones followed by ``names`` (e.g. ``blocks.3.resid_out``).

    Each new output is an Identity of the activation, typed and shaped (symbolic batch and sequence
    dims); names already among the outputs are left as they are. ``model`` itself is not changed.
    With ``only``, the outputs are ``names`` alone and the nodes they do not need are dropped: a
    session then skips the head's vocabulary-wide product (onnxruntime computes every graph output).
    """
    names = list(dict.fromkeys(names))
    graph = model.graph
    outputs = {value.name for value in graph.output}
    tensors = {name for node in graph.node for name in node.output} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    chosen: dict[str, str] = {}
    for name in names:
        try:
            tensor = layer_map.tensor(name)
        except ValueError as exc:
            raise GraphPassError(str(exc)) from None
        if name in outputs:
            continue
        if tensor not in tensors:
            raise GraphPassError(f"{name!r} maps to tensor {tensor!r}, which this graph lacks: the layer map was discovered on another graph; run discover on this one")
        if name in tensors and name != tensor:
            raise GraphPassError(f"cannot expose {name!r}: the graph already has another tensor of that name; rename it first")
        chosen[name] = tensor
    exposed = _copy(model)
    if chosen:
        inferred = infer_types(model)
        add_outputs(exposed, chosen, {name: _output_type(name, inferred.get(tensor), graph, layer_map) for name, tensor in chosen.items()})
    return _only(exposed, names) if only else exposed


def _only(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` (changed in place) with just the outputs ``names`` and the nodes they depend on."""
    graph = model.graph
    kept = [value for value in graph.output if value.name in set(names)]
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, todo = set(), [value.name for value in kept]
    while todo:
        i = producer.get(todo.pop())
        if i is not None and i not in needed:
            needed.add(i)
            todo.extend(node_reads(graph.node[i]))
    nodes = [node for i, node in enumerate(graph.node) if i in needed]
    del graph.output[:], graph.node[:]
    graph.output.extend(kept)
    graph.node.extend(nodes)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _output_type(name: str, inferred: onnx.TypeProto | None, graph: onnx.GraphProto, layer_map: LayerMap) -> onnx.TypeProto:
    """Element type as inferred (float if unknown); dims from the role where known, else as inferred."""
    value_type = onnx.TypeProto()
    value_type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    if inferred is not None and inferred.tensor_type.elem_type:
        value_type.tensor_type.elem_type = inferred.tensor_type.elem_type
    expected = _role_dims(name, graph, layer_map)
    known = list(inferred.tensor_type.shape.dim) if inferred is not None and inferred.tensor_type.HasField("shape") else None
    if expected is None or (known is not None and len(known) != len(expected)):
        if known is not None:
            value_type.tensor_type.shape.dim.extend(known)
        return value_type
    shape = value_type.tensor_type.shape
    for k, dim in enumerate(expected):
        target = shape.dim.add()
        if isinstance(dim, onnx.TensorShapeProto.Dimension):
            target.CopyFrom(dim)
        elif dim is not None:
            target.dim_value = dim
        elif known is not None:
            target.CopyFrom(known[k])
    return value_type


def _role_dims(name: str, graph: onnx.GraphProto, layer_map: LayerMap) -> list | None:
    """[batch, seq, hidden] for the stream, [batch, heads, seq, head_dim | keys] for attention; None for logits."""
    _, role = parse_name(name)
    inputs = {value.name: list(value.type.tensor_type.shape.dim) for value in graph.input}
    ids = inputs.get("input_ids") or next((dims for dims in inputs.values() if len(dims) == 2), None)
    if not ids or len(ids) != 2:
        return None
    batch, seq = ids
    keys = (inputs.get("attention_mask") or [None, seq])[1]
    if role in _STREAM_ROLES:
        return [batch, seq, layer_map.hidden_size]
    if role == "attn.head_ctx":
        return [batch, layer_map.num_heads, seq, layer_map.head_dim]
    if role == "attn.pattern":
        return [batch, layer_map.num_heads, seq, keys]
    return None
