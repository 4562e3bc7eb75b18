"""The segment pass: cut a model into a preamble, one model per layer and a head, to run layer by layer.

Chaining them computes the full model: ``preamble(graph inputs) -> embed + context``, then
``layer_l(resid, context) -> resid`` for every layer in any order or repetition, then
``head(resid, context, positions) -> logits``. On a graph with a KV cache, layer ``l`` also reads its
``past_key_values.l.*`` inputs and returns its ``present.l.*`` outputs after the stream, so a shared
prefix can be run once and its keys and values fed to every text that continues it. ``context`` holds the tensors the layers and the head
read besides the residual stream (expanded mask, rotary tables, shape values). The head gathers the
flat ``positions`` (row * seq + token) before the lm_head, so logits are only computed where needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import onnx
from onnx import helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import PAST, PRESENT, GraphIndex, find_lm_head, infer_types, layer_of_nodes, node_reads
from graph_passes.layer_map import LayerMap
from graph_passes.rewrite import clone_nodes, copy_model

POSITIONS = "positions"  # head input: int64 [n], flat indices row * seq + token of the logits wanted
_GATHERED = "/segment/gathered"
_GATHERED_MID = "/segment/gathered_mid"


@dataclass(frozen=True)
class Tail:
    """The last layer cut at its attention residual add, for a run whose last step is that layer.

    ``attention``: resid_in + context -> resid_mid (and the layer's cache outputs). ``positionwise``: resid_mid +
    positions -> logits [n, vocab]: the gather of the positions, then the layer's MLP half, the final norm and the
    lm_head. Every op after resid_mid acts on each token alone, so the MLP (most of a layer's work) runs only
    where logits are read, and the result is the head's on the whole last layer."""

    attention: onnx.ModelProto
    positionwise: onnx.ModelProto
    resid_mid: str


@dataclass(frozen=True)
class Segments:
    """A model cut at every layer boundary; tensor names are the original graph's."""

    preamble: onnx.ModelProto  # graph inputs -> embed and the context tensors computed from them
    layers: tuple[onnx.ModelProto, ...]  # layer l: resid_in[l] + context -> resid_out[l]
    head: onnx.ModelProto  # resid_in[L] + context + positions -> logits [n, vocab]
    embed: str
    resid_in: tuple[str, ...]  # input name of each layer segment, then of the head (L + 1 names)
    resid_out: tuple[str, ...]  # output name of each layer segment
    context: tuple[str, ...]  # tensors the layers and head read from the preamble or the graph inputs
    logits: str
    gathered_before_lm_head: bool
    past: tuple[tuple[str, ...], ...] = ()  # per layer: its KV-cache inputs (key, value); () without a cache
    present: tuple[tuple[str, ...], ...] = ()  # per layer: its KV-cache outputs, after resid_out  # False: the head computes all logits and gathers them after
    tail: Tail | None = None  # None where the last layer's MLP half reads more than resid_mid (or the head reads context)


def segment(model: onnx.ModelProto, layer_map: LayerMap) -> Segments:
    """Split ``model`` into runnable segment models (initializers copied into the segment that reads them)."""
    index = GraphIndex(model.graph)
    if POSITIONS in index.producer or POSITIONS in index.graph_inputs:
        raise GraphPassError(f"the graph already has a tensor named {POSITIONS!r}; rename it before segmenting")
    layer_of = layer_of_nodes(model.graph, layer_map)
    layer_sets = [{i for i, node in enumerate(index.nodes) if layer_of.get(node.name) == layer.index} for layer in layer_map.layers]
    in_layers = set().union(*layer_sets)
    last = layer_map.layers[-1].resid_out
    layer_reads = [_external_reads(index, members, {layer.resid_in}) for layer, members in zip(layer_map.layers, layer_sets)]
    # Nodes the embedding and the layers' inputs need belong to the preamble, even where the head needs them too.
    before = set().union(*(index.ancestors(t) for t in (layer_map.embed, *set().union(*layer_reads))))
    head = index.ancestors(layer_map.logits, stop=frozenset({last})) - before
    head_reads = _external_reads(index, head, {last})
    context = tuple(sorted(set().union(*layer_reads, head_reads), key=lambda n: (index.position(n), n)))
    made = [t for t in dict.fromkeys((layer_map.embed, *context)) if t not in index.graph_inputs]
    preamble = set().union(*(index.ancestors(t) for t in made))
    if (preamble | head) & in_layers:
        raise GraphPassError("the embedding, the head or a layer reads another layer's inner tensors, so the graph cannot be cut at layer boundaries; re-export the model without graph optimisation")

    extract = _Extractor(model, index, infer_types(model))
    preamble_inputs = [name for name in index.graph_inputs if name in _external_reads(index, preamble, set())]
    past, present = _cache_names(model.graph, layer_map.num_layers)
    layers = tuple(
        extract(f"layer{l}", members, [layer.resid_in, *sorted(reads)], [layer.resid_out, *(present[l] if present else ())])
        for l, (layer, members, reads) in enumerate(zip(layer_map.layers, layer_sets, layer_reads))
    )
    head_model, gathered = _head(extract, index, head, [last, *sorted(head_reads)], layer_map.logits)
    tail = None if head_reads else _tail(extract, index, layer_map.layers[-1], layer_sets[-1], head, layer_map.logits, present[-1] if present else ())
    return Segments(
        preamble=extract("preamble", preamble, preamble_inputs, made),
        layers=layers,
        head=head_model,
        embed=layer_map.embed,
        resid_in=tuple(layer.resid_in for layer in layer_map.layers) + (last,),
        resid_out=tuple(layer.resid_out for layer in layer_map.layers),
        context=context,
        logits=layer_map.logits,
        gathered_before_lm_head=gathered,
        past=past,
        present=present,
        tail=tail,
    )


def _tail(extract: _Extractor, index: GraphIndex, layer, members: set[int], head: set[int], logits: str, present: tuple[str, ...]) -> Tail | None:
    """The last layer's Tail, or None where its nodes after resid_mid read anything but resid_mid and weights."""
    mid = layer.resid_mid
    if not mid:
        return None
    attention = index.ancestors(mid) & members
    rest = members - attention
    if _external_reads(index, rest, {mid}) or any(index.producer.get(t) in rest for t in present):
        return None
    reads = _external_reads(index, attention, {layer.resid_in})
    attention_model = extract(f"layer{layer.index}_attention", attention, [layer.resid_in, *sorted(reads)], [mid, *present])
    nodes = [*_gather_nodes(mid, _GATHERED_MID), *clone_nodes([index.nodes[i] for i in sorted(rest | head)], "", {mid: _GATHERED_MID})]
    positions = helper.make_tensor_value_info(POSITIONS, onnx.TensorProto.INT64, [POSITIONS])
    positionwise = extract("tail", set(), [mid], [logits], nodes, [positions])
    _rows_are_positions(positionwise)
    return Tail(attention_model, positionwise, mid)


def _rows_are_positions(model: onnx.ModelProto) -> None:
    """The output's [batch, seq, vocab] becomes [positions, vocab]."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    vocab = onnx.TensorShapeProto.Dimension()
    if len(dims):
        vocab.CopyFrom(dims[-1])
    del dims[:]
    dims.add().dim_param = POSITIONS
    dims.add().CopyFrom(vocab)


def _cache_names(graph: onnx.GraphProto, num_layers: int) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """Per layer, the ``past_key_values.l.*`` inputs and ``present.l.*`` outputs (key before value); empty without a cache."""
    def by_layer(values, pattern):
        found = sorted(((int(m[1]), m[2], v.name) for v in values if (m := pattern.match(v.name))), key=lambda f: (f[0], f[1] != "key", f[1]))
        return tuple(tuple(name for layer, _, name in found if layer == l) for l in range(num_layers)) if found else ()

    return by_layer(graph.input, PAST), by_layer(graph.output, PRESENT)


def _external_reads(index: GraphIndex, members: set[int], stream: set[str]) -> set[str]:
    """Computed tensors or graph inputs that ``members`` read but do not make (the stream excluded)."""
    made = {out for i in members for out in index.nodes[i].output}
    reads = {name for i in members for name in node_reads(index.nodes[i])}
    return {n for n in reads - made - stream if n not in index.initializers and (n in index.producer or n in index.graph_inputs)}


class _Extractor:
    """Builds a standalone model from some of a graph's nodes, copying the initializers they read."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex, types: Mapping[str, onnx.TypeProto]):
        self.model, self.index, self.types = model, index, types
        self.initializers = {t.name: t for t in model.graph.initializer}

    def __call__(self, name: str, members: Iterable[int], inputs: list[str], outputs: list[str], extra_nodes: list[onnx.NodeProto] = (), extra_values: list[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
        nodes = [self.index.nodes[i] for i in sorted(members)]
        read = {name for node in (*nodes, *extra_nodes) for name in node_reads(node)}
        graph = helper.make_graph(
            [*nodes, *extra_nodes],
            name,
            [*(self._value(t) for t in inputs), *extra_values],
            [self._value(t) for t in outputs],
            initializer=[self.initializers[t] for t in sorted(read & set(self.initializers))],
        )
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model

    def _value(self, tensor: str) -> onnx.ValueInfoProto:
        value = onnx.ValueInfoProto(name=tensor)
        inferred = self.types.get(tensor)
        if inferred is None or not inferred.tensor_type.elem_type:
            raise GraphPassError(f"the type of tensor {tensor!r} cannot be inferred, so it cannot become a segment input or output; re-export the model")
        value.type.CopyFrom(inferred)
        return value


def _head(extract: _Extractor, index: GraphIndex, members: set[int], inputs: list[str], logits: str) -> tuple[onnx.ModelProto, bool]:
    """The head model; the gather of ``positions`` goes before the lm_head when one is found, else after the logits."""
    lm_head, data = find_lm_head(index, logits, members)
    positions = helper.make_tensor_value_info(POSITIONS, onnx.TensorProto.INT64, [POSITIONS])
    if lm_head is None:
        last = index.producer[logits]
        nodes = [*clone_nodes([index.nodes[last]], "", {logits: _GATHERED}), *_gather_nodes(_GATHERED, logits)]
        members, gathered = members - {last}, False
    else:
        node = onnx.NodeProto()
        node.CopyFrom(index.nodes[lm_head])
        node.input[0] = _GATHERED
        nodes = [*_gather_nodes(data, _GATHERED), node]
        members, gathered = members - {lm_head}, True
    head = extract("head", members, inputs, [logits], nodes, [positions])
    _rows_are_positions(head)
    return head, gathered


def _gather_nodes(source: str, target: str) -> list[onnx.NodeProto]:
    """Flatten ``source`` to [rows, width] and gather the ``positions`` rows into ``target``."""
    flat = f"{target}/flat"
    return [
        helper.make_node("Flatten", [source], [flat], name=f"{target}/Flatten", axis=-1),
        helper.make_node("Gather", [flat, POSITIONS], [target], name=f"{target}/Gather", axis=0),
    ]


def split_unembedding(head: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.TensorProto] | None:
    """The head without its unembedding, and the unembedding weight W (its initializer), where ``logits = hidden @ W``
    exactly (the last node a MatMul of the gathered, normed hidden state by a 2-D initializer); else None.

    The model returned outputs the gathered hidden state [positions, hidden]: a logit difference's norm
    is then ``sqrt(d W W^T d)`` for the hidden state's difference d, without the vocabulary-wide product."""
    last = head.graph.node[-1] if head.graph.node else None
    weights = {t.name: t for t in head.graph.initializer}
    if last is None or last.op_type != "MatMul" or list(last.input)[0] != _GATHERED or last.output[0] != head.graph.output[0].name:
        return None
    weight = weights.get(last.input[1])
    if weight is None or len(weight.dims) != 2:
        return None
    normed = copy_model(head)
    del normed.graph.node[-1]
    kept = {name for node in normed.graph.node for name in node_reads(node)}
    survivors = [t for t in normed.graph.initializer if t.name in kept]
    del normed.graph.initializer[:]
    normed.graph.initializer.extend(survivors)
    del normed.graph.output[:]
    normed.graph.output.append(helper.make_tensor_value_info(_GATHERED, weight.data_type, [POSITIONS, weight.dims[0]]))
    normed.graph.name = "head_normed"
    return normed, weight
