"""Which attention heads a model can lose: each head's effect on the calibration loss, two ways.

- ``head_first_order``: cp-onnx's first-order estimate (one finite-difference step toward zeroing the
  head, ``heads.ALPHA``), the attribution-patching style of estimate, cheap;
- ``head_ablation`` (the default): the exact loss increase with the head alone zeroed, which is what
  pruning it does (the prune-heads pass computes exactly the zero-ablated model).

Both are means over every next-token prediction of the calibration texts (``cp_onnx.analysis.heads``); the
heads with the lowest values are removed, every layer keeping at least ``min_kept`` heads (a layer
without heads has no attention: remove the layer instead).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from cp_onnx.analysis import heads as head_influence
from cp_onnx.analysis.perturbation import PerturbedRuns, base_activations
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import open_graph
from graph_passes import discover
from graph_passes.passes import require_heads

DEFAULT = "head_ablation"
METHODS = {"head_first_order": "loss_estimate", DEFAULT: "loss_zero"}  # method -> HeadStats column


def head_scores(model: ModelFolder, texts: Sequence[str], *, max_length: int = 128, threads: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Per method, [layers, heads] loss increase (nats per prediction) when each head alone is removed."""
    token_lists, _ = model.encode(list(texts), max_length=max_length)
    proto, weights = open_graph(model.onnx_path)
    layer_map = discover(proto)
    require_heads(layer_map)
    bases = base_activations(proto, layer_map, token_lists, threads=threads, weights=weights)
    runs = PerturbedRuns(proto, layer_map, threads=threads, weights=weights)
    del proto
    means = head_influence.head_means(bases)
    stats = head_influence.HeadStats(layer_map.num_layers, layer_map.num_heads)
    for k, (ids, base) in enumerate(zip(token_lists, bases)):
        probes = [p for p in head_influence.probes(base, means, range(layer_map.num_layers)) if p.key[1] != "mean"]  # mean ablation: not pruning
        base_row, results = runs.run(ids, probes)
        stats.add(base, base_row, results)
        if progress:
            progress(k + 1, len(token_lists))
    result = stats.result()
    return {method: result[column] for method, column in METHODS.items()}


def choose_heads(scores: np.ndarray, count: int, *, min_kept: int = 1, skip_layers: Sequence[int] = ()) -> dict[int, list[int]]:
    """The ``count`` lowest-scoring heads as {layer: [heads]}, leaving every layer ``min_kept`` heads (layers in ``skip_layers`` untouched)."""
    layers, per_layer = scores.shape
    open_layers = [l for l in range(layers) if l not in set(skip_layers)]
    available = len(open_layers) * max(per_layer - min_kept, 0)
    if not 0 <= count <= available:
        raise CpOnnxError(f"can remove at most {available} heads ({per_layer - min_kept} in each of {len(open_layers)} layers, keeping {min_kept} per layer), not {count}")
    chosen: dict[int, list[int]] = {}
    order = sorted(((float(scores[l, h]), l, h) for l in open_layers for h in range(per_layer)), key=lambda t: (np.nan_to_num(t[0], nan=np.inf), t[1], t[2]))
    for _, l, h in order:
        if sum(map(len, chosen.values())) == count:
            break
        if len(chosen.get(l, [])) < per_layer - min_kept:
            chosen.setdefault(l, []).append(h)
    return {l: sorted(hs) for l, hs in sorted(chosen.items())}


def heads_section(scores: Mapping[str, np.ndarray], top: int = 10) -> dict:
    """Report form: per method, the ``top`` cheapest heads to remove (lowest first) and the whole [layers, heads] table."""
    return {
        "default": DEFAULT if DEFAULT in scores else next(iter(scores)),
        "methods": {m: {"cheapest": [{"layer": l, "head": h, "score": float(values[l, h])} for l, hs in _cheapest(values, top) for h in hs],
                        "scores": np.asarray(values).tolist()} for m, values in scores.items()},
        "units": "loss increase (nats per prediction of the calibration texts) with the head alone removed; lowest: cheapest to remove",
    }


def _cheapest(values: np.ndarray, top: int) -> list[tuple[int, list[int]]]:
    flat = sorted(np.ndindex(values.shape), key=lambda lh: (np.nan_to_num(values[lh], nan=np.inf), lh))[:top]
    return [(int(l), [int(h)]) for l, h in flat]
