"""The contract every pass keeps, a runner for several, and the preconditions several passes state.

Modelled on onnx_ir's passes: a pass is a small class holding its options, that states what it needs of a
model before it changes anything and rewrites a model it is given. Calling a pass leaves its input as it
is: the model is copied once and the copy rewritten. ``run_passes`` rewrites one copy by a sequence of
passes, rediscovering the layers where a pass moved them. discover and segment return something other than
a model (a LayerMap, the segment models), so they stay functions.
"""
from __future__ import annotations

from typing import ClassVar, Iterable, Mapping, Sequence

import onnx

from graph_passes.discovery import discover
from graph_passes.errors import GraphPassError
from graph_passes.layer_map import LayerMap
from graph_passes.rewrite import copy_model


class GraphPass:
    """One rewrite of a model's graph; a subclass takes its options in ``__init__`` and defines

    - ``requires``: the preconditions, as checks that raise GraphPassError in one line (what is wrong, what
      to do) and change nothing.
    - ``apply``: the rewrite, in place, on a model that meets them. What only the rewrite's own analysis of
      the graph can tell (route's layer boundaries, whether prune_heads can slice a layer's attention) it
      checks the same way as it goes, rather than search the graph twice; a model it refused is to be
      thrown away, which is why calling a pass and ``run_passes`` hand it their own copy.
    - ``ensures`` (optional): postconditions on the result.
    - ``layer_map_after``: the rewritten model's layer map when the pass can tell it; the default None makes
      ``run_passes`` discover it again (a pass that clones or moves layer nodes keeps the default).
    """

    needs_layer_map: ClassVar[bool] = True  # False: works on any graph, with or without a layer map

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap | None) -> None:
        pass

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define apply")

    def ensures(self, model: onnx.ModelProto, layer_map: LayerMap | None) -> None:
        pass

    def layer_map_after(self, layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap | None:
        return None

    def __call__(self, model: onnx.ModelProto, layer_map: LayerMap | None = None) -> onnx.ModelProto:
        """A rewritten copy of ``model`` (which is left as it is)."""
        if layer_map is None and self.needs_layer_map:
            raise GraphPassError(f"{type(self).__name__} needs the model's layer map; run discover on the model and pass it")
        self.requires(model, layer_map)
        result = copy_model(model)
        self.apply(result, layer_map)
        self.ensures(result, layer_map)
        return result


def run_passes(model: onnx.ModelProto, layer_map: LayerMap | None, passes: Sequence[GraphPass]) -> onnx.ModelProto:
    """``model`` rewritten by ``passes`` in order, on one copy (``model`` is left as it is).

    Each pass is checked against the model as the passes before it left it; where a pass cannot tell the
    layer map of its result (or ``layer_map`` is None), discovery finds it for the next pass that needs it.
    """
    result = copy_model(model)
    for graph_pass in passes:
        if layer_map is None and graph_pass.needs_layer_map:
            layer_map = discover(result)
        graph_pass.requires(result, layer_map)
        graph_pass.apply(result, layer_map)
        graph_pass.ensures(result, layer_map)
        layer_map = graph_pass.layer_map_after(layer_map, result) if layer_map is not None else None
    return result


def require_heads(layer_map: LayerMap) -> None:
    """GraphPassError unless every layer has its per-head context, with its head count and size known."""
    if layer_map.attention_op and not layer_map.available("attn.head_ctx"):
        raise GraphPassError(f"this graph's attention is fused ({layer_map.attention_op}): per-head tensors do not exist; "
                             "head-level analysis needs an unfused export (cp-onnx export)")
    if not layer_map.available("attn.head_ctx") or not layer_map.num_heads or not layer_map.head_dim:
        raise GraphPassError(f"this {layer_map.family} graph has no per-head attention context before the output projection; heads cannot be perturbed or ablated")


def checked_layers(layer_map: LayerMap, layers: Iterable[int]) -> list[int]:
    """``layers`` sorted and once each, after checking that the model has them."""
    chosen = sorted(set(int(l) for l in layers))
    bad = [l for l in chosen if not 0 <= l < layer_map.num_layers]
    if bad:
        raise GraphPassError(f"layer {bad[0]} is out of range: the model has layers 0..{layer_map.num_layers - 1}")
    return chosen


def checked_heads(layer_map: LayerMap, heads: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` in the caller's order of layers, heads sorted and once each, layers without heads left
    out, after checking that the model has those layers and heads (and per-head tensors at all, when any is named)."""
    chosen = {int(l): sorted(set(int(h) for h in hs)) for l, hs in heads.items()}
    checked_layers(layer_map, chosen)
    chosen = {l: hs for l, hs in chosen.items() if hs}
    if chosen:
        require_heads(layer_map)
    for l, hs in chosen.items():
        if hs[0] < 0 or hs[-1] >= layer_map.num_heads:
            raise GraphPassError(f"layer {l} has heads 0..{layer_map.num_heads - 1}; head {hs[0] if hs[0] < 0 else hs[-1]} does not exist")
    return chosen
