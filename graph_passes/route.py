"""The route pass: run a model's decoder layers along any layer path (repeat, skip, reorder), weights shared.

Each occurrence of a layer in the path gets the layer's nodes: the first occurrence keeps the original
names, later ones are clones whose node and tensor names end in ``/dup1``, ``/dup2``, ... Every
occurrence reads the previous occurrence's ``resid_out`` (the first reads the embedding), the final
norm reads the last one's, and everything computed outside the layers (rotary tables, masks, weights)
stays shared, so the file grows by the cloned nodes only. In a graph with a KV cache
(``past_key_values.N.key/value`` -> ``present.N.key/value``) the slot numbers become path positions:
slot k holds the cache of the k-th occurrence, layer ``path[k]``; omitted layers lose their slots.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Sequence

import onnx

from graph_passes import metadata
from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import PAST, PRESENT, layer_of_nodes, node_reads
from graph_passes.layer_map import LayerMap
from graph_passes.layer_path import check_path, format_path
from graph_passes.metadata import KV_SLOTS_KEY, PATH_KEY
from graph_passes.passes import GraphPass
from graph_passes.rewrite import clone_nodes, drop_unread_initializers, graph_reads, live_nodes

DUP_SUFFIX = "/dup{}"


class Route(GraphPass):
    """Run the layers in the order ``path`` (layer indices, repeats allowed).

    Besides a path of this model's layers, the model must never have been routed, and its layers may pass
    nothing but the residual stream to each other (and each reads its own KV-cache slots only): ``apply``
    checks those on the graph before it changes anything.
    """

    def __init__(self, path: Sequence[int]):
        self.path = path

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        check_path(self.path, layer_map.num_layers)
        routed_before = metadata.read(model, PATH_KEY)
        if routed_before is not None:
            raise GraphPassError(f"this model is already routed (layer path {routed_before}); route the original model instead")

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        path = check_path(self.path, layer_map.num_layers)
        graph = model.graph
        layer_of = layer_of_nodes(graph, layer_map)
        made_in = {out: layer_of[node.name] for node in graph.node if node.name in layer_of for out in node.output if out}
        _check_boundaries(graph, layer_map, layer_of, made_in)
        past, present = _kv_slots(graph, layer_of, made_in, layer_map.num_layers)

        by_layer: dict[int, list[onnx.NodeProto]] = {i: [] for i in range(layer_map.num_layers)}
        for node in graph.node:
            if node.name in layer_of:
                by_layer[layer_of[node.name]].append(node)
        occurrence_nodes: list[onnx.NodeProto] = []
        renames: list[dict[str, str]] = []  # per path position: original tensor -> routed tensor
        seen: Counter[int] = Counter()
        stream = layer_map.embed
        for k, i in enumerate(path):
            suffix = DUP_SUFFIX.format(seen[i]) if seen[i] else ""
            seen[i] += 1
            rename = {layer_map.layers[i].resid_in: stream}
            rename.update({name: f"past_key_values.{k}.{kind}" for (layer, kind), name in past.items() if layer == i})
            rename.update({name: f"present.{k}.{kind}" for (layer, kind), name in present.items() if layer == i})
            occurrence_nodes += clone_nodes(by_layer[i], suffix, rename)
            renames.append(rename)
            stream = rename[layer_map.layers[i].resid_out]

        first_slot = {i: path.index(i) if i in path else 0 for i in range(layer_map.num_layers)}
        outside = {layer_map.layers[-1].resid_out: stream}
        outside.update({name: f"past_key_values.{first_slot[layer]}.{kind}" for (layer, kind), name in past.items()})
        prefix, tail = _split_outside(graph, layer_of, made_in)
        nodes = clone_nodes(prefix, "", outside) + occurrence_nodes + clone_nodes(tail, "", outside)

        # From here on the graph changes: what it read before is taken first.
        read_before = graph_reads(graph)
        _replace(graph.input, PAST, path, "past_key_values")
        _replace(graph.output, PRESENT, path, "present")
        nodes = live_nodes(nodes, [value.name for value in graph.output])
        del graph.node[:]
        graph.node.extend(nodes)
        _retype(graph, made_in, path, renames)
        drop_unread_initializers(graph, read_before)
        metadata.write(model, {PATH_KEY: format_path(path), **({KV_SLOTS_KEY: json.dumps(list(path))} if past else {})})


def route(model: onnx.ModelProto, layer_map: LayerMap, path: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` that runs its layers in the order ``path`` (see ``Route``)."""
    return Route(path)(model, layer_map)


def _check_boundaries(graph: onnx.GraphProto, layer_map: LayerMap, layer_of: dict[str, int], made_in: dict[str, int]) -> None:
    """Layers may only pass the residual stream to the next layer, and the last one to the final norm."""
    last = layer_map.layers[-1].resid_out
    for node in graph.node:
        layer = layer_of.get(node.name)
        allowed = {last} if layer is None else {layer_map.layers[layer].resid_in}
        for name in node.input:
            if name in made_in and made_in[name] != layer and name not in allowed:
                where = "outside the layers" if layer is None else f"in layer {layer}"
                raise GraphPassError(f"node {node.name!r} {where} reads {name!r} from inside layer {made_in[name]}, so the layers cannot be routed; route the model as exported, before other passes")
    for value in graph.output:
        if value.name in made_in and not PRESENT.match(value.name):
            raise GraphPassError(f"graph output {value.name!r} is computed inside layer {made_in[value.name]}; route the model before exposing activations")


def _kv_slots(graph: onnx.GraphProto, layer_of: dict[str, int], made_in: dict[str, int], num_layers: int) -> tuple[dict, dict]:
    """``(layer, kind) -> name`` of the past inputs and present outputs; both empty without a KV cache."""
    past = {(int(m[1]), m[2]): value.name for value in graph.input if (m := PAST.match(value.name))}
    present = {(int(m[1]), m[2]): value.name for value in graph.output if (m := PRESENT.match(value.name))}
    if not past and not present:
        return {}, {}
    expected = {(i, kind) for i in range(num_layers) for kind in {kind for _, kind in past}}
    if set(past) != expected or set(present) != expected:
        raise GraphPassError(f"the graph's KV-cache inputs and outputs do not match its {num_layers} layers; re-export it with text-generation-with-past")
    wrong = next(((name, made_in.get(name)) for (i, _), name in present.items() if made_in.get(name) != i), None)
    if wrong is not None:
        raise GraphPassError(f"{wrong[0]} is not computed by its layer (found: {wrong[1]}); re-export the model with text-generation-with-past")
    owner = {name: layer for (layer, _), name in past.items()}
    for node in graph.node:
        layer = layer_of.get(node.name)
        stray = next((name for name in node.input if layer is not None and owner.get(name, layer) != layer), None)
        if stray is not None:
            raise GraphPassError(f"node {node.name!r} of layer {layer} reads {stray}, another layer's cache, so the cache slots cannot follow the path; re-export the model")
    return past, present


def _split_outside(graph: onnx.GraphProto, layer_of: dict[str, int], made_in: dict[str, int]) -> tuple[list, list]:
    """Nodes outside the layers: those that run before the layers, and those that read their output."""
    after = set(made_in)
    prefix, tail = [], []
    for node in graph.node:
        if node.name in layer_of:
            continue
        if any(name in after for name in node_reads(node)):
            tail.append(node)
            after.update(node.output)
        else:
            prefix.append(node)
    return prefix, tail


def _replace(values, pattern: re.Pattern, path: tuple[int, ...], prefix: str) -> None:
    """Replace the KV-cache entries of a graph's input or output list by one per path position, in place."""
    slots = {(int(m[1]), m[2]): value for value in values if (m := pattern.match(value.name))}
    if not slots:
        return
    kinds = list(dict.fromkeys(kind for _, kind in slots))
    first = next(k for k, value in enumerate(values) if pattern.match(value.name))
    kept = [value for value in values if not pattern.match(value.name)]
    fresh = []
    for k, i in enumerate(path):
        for kind in kinds:
            value = onnx.ValueInfoProto()
            value.CopyFrom(slots[(i, kind)])
            value.name = f"{prefix}.{k}.{kind}"
            fresh.append(value)
    del values[:]
    values.extend(kept[:first] + fresh + kept[first:])


def _retype(graph: onnx.GraphProto, made_in: dict[str, int], path: tuple[int, ...], renames: list[dict[str, str]]) -> None:
    """Give every occurrence's tensors the value_info their originals had (``graph`` has its new nodes, its old
    value_info); drop it for tensors that are gone."""
    produced = {name for node in graph.node for name in node.output}
    values = []
    for value in graph.value_info:
        targets = [rename[value.name] for k, rename in enumerate(renames) if made_in.get(value.name) == path[k]] if value.name in made_in else [value.name]
        for target in targets:
            if target in produced:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(value)
                copy.name = target
                values.append(copy)
    del graph.value_info[:]
    graph.value_info.extend(values)
