"""The expose pass: make chosen activations graph outputs, named by their canonical names."""
from __future__ import annotations

from typing import Iterable

import onnx

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import elem_type, infer_types, token_dims
from graph_passes.layer_map import LayerMap, parse_name
from graph_passes.passes import GraphPass
from graph_passes.rewrite import add_outputs, live_nodes, tensor_type

_STREAM_ROLES = {"resid_in", "resid_mid", "resid_out", "embed", "final_norm"}


class Expose(GraphPass):
    """Make activations graph outputs: the model's outputs are its original ones followed by ``names`` (e.g.
    ``blocks.3.resid_out``).

    Each new output is an Identity of the activation, typed and shaped (symbolic batch and sequence
    dims); names already among the outputs are left as they are. With ``only``, the outputs are ``names``
    alone and the nodes they do not need are dropped: a session then skips the head's vocabulary-wide
    product (onnxruntime computes every graph output).
    """

    def __init__(self, names: Iterable[str], *, only: bool = False):
        self.names, self.only = list(dict.fromkeys(names)), only

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        for name in self.names:
            try:
                layer_map.tensor(name)  # a canonical name, of a tensor this layer map knows
            except ValueError as exc:
                raise GraphPassError(str(exc)) from None

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        graph = model.graph
        chosen = _new_outputs(graph, layer_map, self.names)
        if chosen:
            inferred = infer_types(model)
            add_outputs(model, chosen, {name: _output_type(name, tensor, inferred, graph, layer_map) for name, tensor in chosen.items()})
        if self.only:
            _only(model, self.names)

    def layer_map_after(self, layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap | None:
        return None if self.only else layer_map  # the Identity outputs are outside the layers; ``only`` drops nodes


def expose(model: onnx.ModelProto, layer_map: LayerMap, names: Iterable[str], *, only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with the activations ``names`` as outputs (see ``Expose``); ``model`` itself is not changed."""
    return Expose(names, only=only)(model, layer_map)


def _new_outputs(graph: onnx.GraphProto, layer_map: LayerMap, names: list[str]) -> dict[str, str]:
    """Canonical name -> graph tensor of the names not yet among the outputs; GraphPassError where the graph lacks the
    tensor or has another of that name."""
    outputs = {value.name for value in graph.output}
    tensors = {name for node in graph.node for name in node.output} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    chosen: dict[str, str] = {}
    for name in names:
        tensor = layer_map.tensor(name)
        if name in outputs:
            continue
        if tensor not in tensors:
            raise GraphPassError(f"{name!r} maps to tensor {tensor!r}, which this graph lacks: the layer map was discovered on another graph; run discover on this one")
        if name in tensors and name != tensor:
            raise GraphPassError(f"cannot expose {name!r}: the graph already has another tensor of that name; rename it first")
        chosen[name] = tensor
    return chosen


def _only(model: onnx.ModelProto, names: list[str]) -> None:
    """Keep just the outputs ``names`` and the nodes they depend on."""
    graph = model.graph
    kept = [value for value in graph.output if value.name in set(names)]
    nodes = live_nodes(graph.node, [value.name for value in kept])
    del graph.output[:], graph.node[:]
    graph.output.extend(kept)
    graph.node.extend(nodes)


def _output_type(name: str, tensor: str, inferred: dict[str, onnx.TypeProto], graph: onnx.GraphProto, layer_map: LayerMap) -> onnx.TypeProto:
    """Element type as inferred (float if unknown); dims from the role where known, else as inferred."""
    value = inferred.get(tensor)
    expected = _role_dims(name, graph, layer_map)
    known = list(value.tensor_type.shape.dim) if value is not None and value.tensor_type.HasField("shape") else None
    if expected is None or (known is not None and len(known) != len(expected)):
        return tensor_type(elem_type(inferred, tensor), known)
    return tensor_type(elem_type(inferred, tensor), [known[k] if dim is None and known is not None else dim for k, dim in enumerate(expected)])


def _role_dims(name: str, graph: onnx.GraphProto, layer_map: LayerMap) -> list | None:
    """[batch, seq, hidden] for the stream, [batch, heads, seq, head_dim | keys] for attention; None for logits."""
    _, role = parse_name(name)
    dims = token_dims(graph)
    if dims is None:
        return None
    batch, seq = dims
    mask = next((value.type.tensor_type.shape.dim for value in graph.input if value.name == "attention_mask"), None)
    keys = mask[1] if mask else seq
    if role in _STREAM_ROLES:
        return [batch, seq, layer_map.hidden_size]
    if role == "attn.head_ctx":
        return [batch, layer_map.num_heads, seq, layer_map.head_dim]
    if role == "attn.pattern":
        return [batch, layer_map.num_heads, seq, keys]
    return None
