"""The ablate pass: replace chosen heads' contexts (before the output projection) by zeros or by given means.

A head's context becomes ``head_ctx * keep + fill`` with constants keep [1, heads, 1, 1] (0 for an
ablated head, 1 otherwise) and fill [1, heads, 1, head_dim] (the head's mean for mean ablation, else
0), through the same rerouting the perturb pass uses.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import elem_type, infer_types
from graph_passes.layer_map import LayerMap
from graph_passes.passes import GraphPass, checked_heads
from graph_passes.rewrite import add_constant, include_inserted, reroute, sort_nodes

MODES = ("zero", "mean")


class Ablate(GraphPass):
    """Ablate the heads ``{layer: [head, ...]}``: their contexts become zeros, or with ``mode="mean"`` the means given.

    ``mode="mean"`` needs ``means[layer]`` of shape [num_heads, head_dim] for every ablated layer
    (the analysis side computes them over calibration tokens); rows of unablated heads are ignored.
    """

    def __init__(self, heads: Mapping[int, Sequence[int]], mode: str = "zero", means: Mapping[int, np.ndarray] | None = None):
        self.heads, self.mode, self.means = heads, mode, means

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        if self.mode not in MODES:
            raise GraphPassError(f"unknown ablation mode {self.mode!r}; use 'zero' or 'mean'")
        chosen = checked_heads(layer_map, self.heads)
        if chosen and self.mode == "mean":
            _check_means(chosen, self.means, layer_map.num_heads, layer_map.head_dim)

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        chosen = checked_heads(layer_map, self.heads)
        if not chosen:
            return
        num_heads, head_dim = layer_map.num_heads, layer_map.head_dim
        types = infer_types(model)
        for l in sorted(chosen):
            hs, layer = chosen[l], layer_map.layers[l]
            dtype = helper.tensor_dtype_to_np_dtype(elem_type(types, layer.head_ctx))
            keep = np.ones((1, num_heads, 1, 1), dtype=dtype)
            keep[0, hs] = 0
            ops = [("Mul", add_constant(model.graph, f"/ablate/blocks.{l}/keep", keep))]
            if self.mode == "mean":
                fill = np.zeros((1, num_heads, 1, head_dim), dtype=dtype)
                fill[0, hs, 0] = np.asarray(self.means[l], dtype=dtype)[hs]
                ops.append(("Add", add_constant(model.graph, f"/ablate/blocks.{l}/fill", fill)))
            reroute(model.graph, layer, layer.head_ctx, ops)
        sort_nodes(model.graph)

    def layer_map_after(self, layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap:
        return include_inserted(layer_map, model)


def ablate(
    model: onnx.ModelProto,
    layer_map: LayerMap,
    heads: Mapping[int, Sequence[int]],
    mode: str = "zero",
    means: Mapping[int, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the heads ``{layer: [head, ...]}`` ablated (see ``Ablate``)."""
    return Ablate(heads, mode, means)(model, layer_map)


def _check_means(chosen: dict[int, list[int]], means: Mapping[int, np.ndarray] | None, num_heads: int, head_dim: int) -> None:
    if means is None:
        raise GraphPassError("mean ablation needs means={layer: array [num_heads, head_dim]}; compute them over calibration tokens")
    for l in chosen:
        if l not in means:
            raise GraphPassError(f"mean ablation of layer {l} needs means[{l}] of shape [{num_heads}, {head_dim}]")
        shape = np.shape(means[l])
        if shape != (num_heads, head_dim):
            raise GraphPassError(f"means[{l}] has shape {shape}, expected [{num_heads}, {head_dim}] (heads, head_dim)")
        if not np.isfinite(means[l]).all():
            raise GraphPassError(f"means[{l}] holds NaN/Inf; compute the means over finite activations")
