"""What every pass shares: the preconditions several passes state about a layer map."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from graph_passes.errors import GraphPassError
from graph_passes.layer_map import LayerMap


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
