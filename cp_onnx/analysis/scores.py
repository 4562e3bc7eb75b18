"""The CircuitProbe paper's block scores, exactly as its reference implementation computes them.

A block is ``[start, end)`` (end exclusive). Candidates are generated size by size, then start by
start, and sorted by score with a stable sort, so equal scores keep that order (as the reference).
Metric names match the reference's, e.g. ``stability_z``, ``repr_change_z``, ``stab_rank_z``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cp_onnx.errors import CpOnnxError
from cp_onnx.models.evaluators import candidate_blocks

METHODS = ("stability", "anomaly", "composite", "boundary", "contrastive")
EPS = 1e-10  # added to every standard deviation, and the floor of ratio denominators

_ANOMALY_STATS = ("representation_change", "self_similarity", "cross_example_variance", "representation_rank")
_STABILITY_STATS = ("representation_change", "cross_example_variance", "representation_rank")
# Per method, the statistics it reads (of the mixed set, for contrastive).
USED_STATS = {
    "anomaly": _ANOMALY_STATS,
    "stability": _STABILITY_STATS,
    "composite": _ANOMALY_STATS,
    "boundary": ("forward_similarity",),
    "contrastive": _ANOMALY_STATS,
}
# Statistics compared by the contrastive score, and whether their difference is normalised.
# Entropy is compared only where both sets have it positive, so it may be NaN (missing).
_CONTRASTED = {
    "representation_change": True,
    "self_similarity": False,
    "norm_growth": True,
    "cross_example_variance": True,
    "attention_entropy": True,
}


@dataclass(frozen=True)
class Block:
    """A scored candidate block of layers [start, end) with the terms that made its score."""

    start: int
    end: int
    score: float
    metrics: dict[str, float]

    def as_dict(self) -> dict:
        """Plain JSON-ready form: start, end, score, metrics."""
        return {"start": self.start, "end": self.end, "score": self.score, "metrics": dict(self.metrics)}


def rank_blocks(
    stats: Mapping[str, np.ndarray],
    method: str,
    block_sizes: Sequence[int] = (3, 4, 5),
    *,
    contrast_stats: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None,
) -> list[Block]:
    """Score every candidate block by ``method`` and return them best first."""
    if method not in METHODS:
        raise CpOnnxError(f"unknown scoring method {method!r}; choose one of {', '.join(METHODS)}")
    layers = _checked(stats, USED_STATS[method], "statistics")
    num_layers = len(next(iter(layers.values())))
    contrast = None
    if method == "contrastive":
        if contrast_stats is None:
            raise CpOnnxError("the contrastive method needs statistics of reasoning and general texts; pass contrast_stats=(reasoning, general)")
        contrast = layer_contrast(*contrast_stats)
        if len(contrast) != num_layers:
            raise CpOnnxError(f"contrast statistics cover {len(contrast)} layers but the mixed statistics {num_layers}; collect all on the same model")
    scorer = _Scorer(layers, num_layers, contrast)
    score = getattr(scorer, method)
    blocks = []
    for start, end in candidate_blocks(num_layers, block_sizes):
        value, metrics = score(start, end)
        blocks.append(Block(start, end, float(value), metrics))
    return sorted(blocks, key=lambda b: b.score, reverse=True)  # stable: ties keep candidate order


def layer_contrast(reasoning: Mapping[str, np.ndarray], general: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per layer, the mean normalised absolute difference of the statistics between the two sets."""
    required = tuple(name for name in _CONTRASTED if name != "attention_entropy")
    r = _checked(reasoning, required, "reasoning statistics", optional=("attention_entropy",))
    g = _checked(general, required, "general statistics", optional=("attention_entropy",))
    if len(r["representation_change"]) != len(g["representation_change"]):
        raise CpOnnxError("reasoning and general statistics cover different numbers of layers; collect both on the same model")
    contrast = []
    for layer in range(len(r["representation_change"])):
        diffs = []
        for name, normalised in _CONTRASTED.items():
            if name not in r or name not in g:
                continue
            a, b = r[name][layer], g[name][layer]
            if name == "attention_entropy" and not (a > 0 and b > 0):  # NaN (missing) fails this too
                continue
            diffs.append(abs(a - b) / max(abs(a), abs(b), EPS) if normalised else abs(a - b))
        contrast.append(np.mean(diffs))
    return np.asarray(contrast)


def _checked(
    stats: Mapping[str, np.ndarray], required: Sequence[str], what: str, optional: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The required (and present optional) statistics as float64 arrays of one length, all finite."""
    missing = [name for name in required if name not in stats]
    if missing:
        raise CpOnnxError(f"{what} lack {', '.join(missing)}; collect them with cp_onnx.analysis.stats.LayerStatistics")
    arrays = {name: np.asarray(stats[name], dtype=np.float64) for name in (*required, *optional) if name in stats}
    lengths = {name: a.shape for name, a in arrays.items()}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise CpOnnxError(f"{what} must be 1-D arrays of one length (one value per layer), got shapes {lengths}")
    for name in required:
        bad = np.flatnonzero(~np.isfinite(arrays[name]))
        if bad.size:
            raise CpOnnxError(
                f"{what}: {name} is NaN/Inf at layer {int(bad[0])}; the scores need it finite at every layer, "
                f"so recollect the statistics (a NaN usually means the model overflowed)"
            )
    return arrays


def block_z(values: np.ndarray, start: int, end: int) -> float:
    """How far the block's mean lies from the all-layer mean, in population standard deviations."""
    return float((np.mean(values[start:end]) - np.mean(values)) / (np.std(values) + EPS))


class _Scorer:
    """The paper's per-block scores over one model's per-layer statistics."""

    def __init__(self, stats: dict[str, np.ndarray], num_layers: int, contrast: np.ndarray | None):
        self.stats = stats
        self.num_layers = num_layers
        self.contrast = contrast

    def anomaly(self, start: int, end: int) -> tuple[float, dict[str, float]]:
        s = self.stats
        metrics = {
            "repr_change_z": block_z(s["representation_change"], start, end),
            "self_sim_z": -block_z(s["self_similarity"], start, end),  # lower similarity = more work
            "variance_z": block_z(s["cross_example_variance"], start, end),
            "rank_z": block_z(s["representation_rank"], start, end),
        }
        return sum(metrics.values()), metrics

    def stability(self, start: int, end: int) -> tuple[float, dict[str, float]]:
        change, variance = self.stats["representation_change"], self.stats["cross_example_variance"]
        metrics, score = {}, 0.0
        if end < self.num_layers:  # S: a flat stretch of representation change (the step into `end` counts)
            deltas = np.abs(np.diff(change))
            metrics["stability_z"] = float(-(np.mean(deltas[start:end]) - np.mean(deltas)) / (np.std(deltas) + EPS))
            score += 1.5 * metrics["stability_z"]
        if start > 0 and end < self.num_layers:  # M: variance growth close to the model's median
            growth = variance[1:] / np.maximum(variance[:-1], EPS)  # growth[i - 1] is layer i's
            median = np.median(growth)
            block = growth[max(start, 1) - 1 : end - 1]
            spread = np.abs(growth - median)
            deviation = abs(np.mean(block) - median)
            metrics["moderate_var_z"] = float(-(deviation - np.mean(spread)) / (np.std(spread) + EPS))
            score += metrics["moderate_var_z"]
        if start > 2:  # T: the block follows a high-change stretch
            before = np.mean(change[start - 3 : start])
            if before > 0:
                metrics["transition_score"] = float(max(0.0, 1.0 - np.mean(change[start:end]) / before))
                score += metrics["transition_score"]
        metrics["rank_z"] = block_z(self.stats["representation_rank"], start, end)
        score += 0.5 * metrics["rank_z"]
        return score, metrics

    def composite(self, start: int, end: int) -> tuple[float, dict[str, float]]:
        stability, stab_metrics = self.stability(start, end)
        anomaly, anom_metrics = self.anomaly(start, end)
        metrics = {"stability_score": stability, "anomaly_score": anomaly}
        metrics.update({f"stab_{k}": v for k, v in stab_metrics.items()})
        metrics.update({f"anom_{k}": v for k, v in anom_metrics.items()})
        return 0.5 * stability + 0.5 * anomaly, metrics

    def boundary(self, start: int, end: int) -> tuple[float, dict[str, float]]:
        forward = self.stats["forward_similarity"]
        coherence = float(np.mean(forward[start : end - 1])) if end - start > 1 else 0.0
        left = 1.0 - forward[start - 1] if start > 0 else 0.0
        right = 1.0 - forward[end - 1] if end < self.num_layers else 0.0
        metrics = {"internal_coherence": coherence, "boundary_contrast": float((left + right) / 2)}
        return coherence + metrics["boundary_contrast"], metrics

    def contrastive(self, start: int, end: int) -> tuple[float, dict[str, float]]:
        anomaly, metrics = self.anomaly(start, end)
        z_contrast = block_z(self.contrast, start, end)
        metrics = {
            **metrics,
            "anomaly_score": anomaly,
            "contrastive_z": z_contrast,
            "contrastive_raw": float(np.mean(self.contrast[start:end])),
        }
        return 0.5 * z_contrast + 0.5 * anomaly, metrics
