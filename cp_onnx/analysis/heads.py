"""Head influence: what removing each attention head does to the next-token loss and distribution.

For every head, over the calibration texts, side by side:
- first-order estimates from one finite-difference step toward removal (attribution patching without
  backpropagation): the head's context is scaled by ``1 - ALPHA``, so ``loss_estimate = dL / ALPHA``
  estimates ``dL/dctx . (0 - ctx)``. KL's first derivative vanishes at the base, so its estimate is
  the leading (quadratic) term: ``kl_estimate = Var_p(dlogits / ALPHA) / 2`` (the Fisher form);
- the exact effects of zero ablation and of mean ablation (the context replaced by the head's mean
  over all calibration tokens), the forwards the ablate pass builds as a model of their own.
Losses and KL are means over all predictions (tokens) of all texts. ``composition[l, h, m]`` is the
relative RMS change of layer m's update (out - in) when head (l, h) is zeroed: the head's measured
influence on each later layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

from cp_onnx.analysis.perturbation import Probe, ProbeResult, Row, RowResult, TextBase
from cp_onnx.errors import CpOnnxError

# Step toward removal, as a fraction of the way: the estimate's truncation error is O(ALPHA) (one-sided,
# against the base row of the same batch); the float32 noise floor of a loss change is ~1e-7 nats, far
# below ALPHA times any head's effect worth ranking.
ALPHA = 0.05
KIND = "heads"  # first item of the probe keys
MODES = ("estimate", "zero", "mean")
COLUMNS = ("loss_estimate", "kl_estimate", "loss_zero", "kl_zero", "loss_mean", "kl_mean")
# What HeadStats reads of each mode's rows.
_ESTIMATED, _ZEROED, _MEANED = frozenset({"loss", "fisher"}), frozenset({"loss", "kl", "update_change"}), frozenset({"loss", "kl"})
# Estimate ~ exact effect pairs whose rank agreement is reported.
AGREEMENT = (("loss_estimate", "loss_zero"), ("kl_estimate", "kl_zero"), ("loss_estimate", "loss_mean"), ("kl_estimate", "kl_mean"))


def head_means(texts: Sequence[TextBase]) -> np.ndarray:
    """[layers, heads, head_dim] mean head context over every token of every text (float64)."""
    if any(t.head_ctx is None for t in texts):
        raise CpOnnxError("these activations hold no per-head context: the graph's attention is fused (GroupQueryAttention or similar), "
                          "per-head tensors do not exist; head-level analysis needs an unfused export (cp-onnx export)")
    total = sum(t.head_ctx.sum(axis=2, dtype=np.float64) for t in texts)
    return total / sum(t.ids.size for t in texts)


def probes(text: TextBase, means: np.ndarray, layers: Sequence[int], exact: bool = True) -> list[Probe]:
    """Single-row probes per head of each layer: the step toward zero, then (``exact``) zero and mean ablation."""
    num_heads = means.shape[1]
    found = []
    for l in layers:
        for h in range(num_heads):
            step, zero = np.ones(num_heads, np.float32), np.ones(num_heads, np.float32)
            step[h], zero[h] = 1 - ALPHA, 0
            shift = np.zeros((num_heads, 1, means.shape[2]), np.float32)
            shift[h, 0] = means[l, h]
            found.append(Probe((KIND, "estimate", l, h), (Row(l, head_scale=step),), ALPHA, _ESTIMATED))
            if exact:
                found.append(Probe((KIND, "zero", l, h), (Row(l, head_scale=zero),), measures=_ZEROED))
                found.append(Probe((KIND, "mean", l, h), (Row(l, head_scale=zero, head_shift=shift),), measures=_MEANED))
    return found


class HeadStats:
    """Sums over texts of each head's loss and distribution changes; ``result`` turns them into means."""

    def __init__(self, num_layers: int, num_heads: int):
        shape = (num_layers, num_heads)
        self.loss = {mode: np.zeros(shape) for mode in MODES}
        self.kl = {mode: np.zeros(shape) for mode in MODES}
        self.composition = np.zeros((num_layers, num_heads, num_layers))
        self.base_update_sq = np.zeros(num_layers)
        self.predictions = self.positions = 0
        self.measured: set[str] = set()

    def add(self, text: TextBase, base: RowResult, results: Sequence[ProbeResult]) -> None:
        """Fold in one text: its base row and its head probes' results."""
        for result in results:
            _, mode, l, h = result.probe.key
            self.measured.add(mode)
            row = result.rows[0]
            self.loss[mode][l, h] += np.sum(row.loss - base.loss)
            # The estimate keeps the Fisher form (quadratic in the step); the ablations the exact KL.
            self.kl[mode][l, h] += np.sum(row.fisher / 2 if mode == "estimate" else row.kl)
            if mode == "zero":
                self.composition[l, h] += row.update_change
        self.base_update_sq += np.einsum("lsd,lsd->l", text.updates, text.updates, dtype=np.float64)
        self.predictions += text.ids.size - 1
        self.positions += text.ids.size

    def result(self) -> dict:
        """Per-head arrays [layers, heads] (COLUMNS; NaN for modes not measured), composition [layers, heads, layers]
        (NaN without zero ablations) and Spearman agreements."""
        columns = {}
        for mode in MODES:
            scale = ALPHA if mode == "estimate" else 1.0
            missing = np.nan if mode not in self.measured else 1.0
            columns[f"loss_{mode}"] = missing * self.loss[mode] / max(self.predictions, 1) / scale
            columns[f"kl_{mode}"] = missing * self.kl[mode] / max(self.positions, 1) / scale**2
        later = np.triu(np.ones(self.composition.shape[::2], bool), k=1)[:, None, :]  # layer m > l only
        composition = np.where(later, np.sqrt(self.composition / np.maximum(self.base_update_sq, 1e-30)), 0.0)
        composition = composition if "zero" in self.measured else np.full_like(composition, np.nan)
        return {**columns, "composition": composition, "spearman": agreement(columns)}


def agreement(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman rank correlation over all heads of each estimate with each exact effect."""
    found = {}
    for estimate, exact in AGREEMENT:
        a, b = columns[estimate].ravel(), columns[exact].ravel()
        usable = a.size > 2 and np.isfinite(a).all() and np.isfinite(b).all() and np.ptp(a) > 0 and np.ptp(b) > 0
        found[f"{estimate}~{exact}"] = float(spearmanr(a, b).statistic) if usable else float("nan")
    return found
