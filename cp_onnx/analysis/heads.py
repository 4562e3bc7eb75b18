"""Head influence: what removing each attention head does to the next-token loss and distribution.

For every head, over the calibration texts, side by side:
- first-order estimates from one finite-difference step toward removal (attribution patching without
  backpropagation): the head's context is scaled by ``1 - ALPHA``, so ``loss_estimate = dL / ALPHA``
  estimates ``dL/dctx . (0 - ctx)``. KL's first derivative vanishes at the base, so its estimate is
  the leading (quadratic) term: ``kl_estimate = Var_p(dlogits / ALPHA) / 2`` (the Fisher form).
  Where the logits are a plain product of the normed hidden state (``linear_head``), the step's rows
  skip the vocabulary-wide head: dL is taken to second order (an O(ALPHA^2) relative error, below the
  step's own O(ALPHA)) and the variance over each position's 2048 most likely tokens;
- the exact effects of zero ablation and of mean ablation (the context replaced by the head's mean
  over all calibration tokens), the forwards the ablate pass builds as a model of their own. These
  cost two full-vocabulary forwards per head and text, so by default only the EXACT_HEADS heads the
  estimates rank highest get them (``choose_exact``: the estimates screen, the ablations verify, as
  attribution patching is used); the other heads' exact columns are NaN.
Losses and KL are means over all predictions (tokens) of all texts. ``composition[l, h, m]`` is the
relative RMS change of layer m's update (out - in) when head (l, h) is zeroed: the head's measured
influence on each later layer.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.stats import spearmanr

from cp_onnx.analysis.perturbation import Probe, ProbeResult, Row, RowResult, TextBase
from cp_onnx.errors import CpOnnxError

# Step toward removal, as a fraction of the way: the estimate's truncation error is O(ALPHA) (one-sided,
# against the base row of the same batch); the float32 noise floor of a loss change is ~1e-7 nats, far
# below ALPHA times any head's effect worth ranking.
ALPHA = 0.05
# Heads ablated exactly by default. SmolLM2's 270 heads' ablations were ~55% of its circuit analysis; the
# strongest heads hold much of the effect (the 16 largest of 270 carry 49% of its summed zero-ablation KL), and
# these are the heads a reader inspects. ``None`` ablates every head (the estimates' full Spearman check).
EXACT_HEADS = 16
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
    found = estimate_probes(means, layers)
    return found + (ablation_probes(means, [(l, h) for l in layers for h in range(means.shape[1])]) if exact else [])


def estimate_probes(means: np.ndarray, layers: Sequence[int]) -> list[Probe]:
    """One row per head of each layer: its context scaled by 1 - ALPHA (the first-order estimates)."""
    num_heads = means.shape[1]
    found = []
    for l in layers:
        for h in range(num_heads):
            step = np.ones(num_heads, np.float32)
            step[h] = 1 - ALPHA
            found.append(Probe((KIND, "estimate", l, h), (Row(l, head_scale=step),), ALPHA, _ESTIMATED))
    return found


def ablation_probes(means: np.ndarray, heads: Iterable[tuple[int, int]], modes: Sequence[str] = ("zero", "mean")) -> list[Probe]:
    """Rows of the exact ablations ``modes`` of each (layer, head) in ``heads``: its context zeroed, or replaced by its mean."""
    num_heads = means.shape[1]
    found = []
    for l, h in heads:
        zero = np.ones(num_heads, np.float32)
        zero[h] = 0
        if "zero" in modes:
            found.append(Probe((KIND, "zero", l, h), (Row(l, head_scale=zero),), measures=_ZEROED))
        if "mean" in modes:
            shift = np.zeros((num_heads, 1, means.shape[2]), np.float32)
            shift[h, 0] = means[l, h]
            found.append(Probe((KIND, "mean", l, h), (Row(l, head_scale=zero, head_shift=shift),), measures=_MEANED))
    return found


def choose_exact(columns: dict[str, np.ndarray], count: int | None) -> list[tuple[int, int]]:
    """The heads to ablate exactly: ``count`` of them (None: all), taken alternately from the ranking by kl_estimate
    and by |loss_estimate| (largest first, NaN last, ties by (layer, head)) until that many are distinct; sorted.

    Two rankings because a head can move the distribution without moving the loss (it shifts mass between
    wrong tokens) or the reverse; either makes it one whose exact effect is worth measuring."""
    shape = columns["kl_estimate"].shape
    every = [(int(l), int(h)) for l, h in np.ndindex(shape)]
    if count is None or count >= len(every):
        return every
    rankings = []
    for values in (columns["kl_estimate"], np.abs(columns["loss_estimate"])):
        key = np.where(np.isfinite(values), values, -np.inf)
        rankings.append(iter(sorted(every, key=lambda lh: (-key[lh], lh))))
    chosen: list[tuple[int, int]] = []
    turn = 0
    while len(chosen) < count:
        head = next(h for h in rankings[turn % 2] if h not in chosen)  # a ranking holds every head, so one is left
        chosen.append(head)
        turn += 1
    return sorted(chosen)


def selection(count: int, total: int) -> str:
    """How the exactly ablated heads were chosen, for the report."""
    if count >= total:
        return "every head"
    if count == 0:
        return "none: first-order estimates only"
    return f"the {count} of {total} heads ranked highest by kl_estimate and by |loss_estimate|, taken alternately from the two rankings"


class HeadStats:
    """Sums over texts of each head's loss and distribution changes; ``result`` turns them into means.

    Counts are kept per head and mode, so a head's means are over the texts it was measured on, and heads
    never measured in a mode (not chosen for exact ablation) are NaN there."""

    def __init__(self, num_layers: int, num_heads: int):
        shape = (num_layers, num_heads)
        self.loss = {mode: np.zeros(shape) for mode in MODES}
        self.kl = {mode: np.zeros(shape) for mode in MODES}
        self.predictions = {mode: np.zeros(shape, np.int64) for mode in MODES}
        self.positions = {mode: np.zeros(shape, np.int64) for mode in MODES}
        self.composition = np.zeros((num_layers, num_heads, num_layers))
        self.base_update_sq = np.zeros((num_layers, num_heads, num_layers))  # per zeroed head: its texts' base updates

    def add(self, text: TextBase, base: RowResult, results: Sequence[ProbeResult]) -> None:
        """Fold in one text: its base row and (some of) its head probes' results."""
        update_sq = None
        for result in results:
            _, mode, l, h = result.probe.key
            row = result.rows[0]
            self.loss[mode][l, h] += np.sum(row.loss - base.loss)
            # The estimate keeps the Fisher form (quadratic in the step); the ablations the exact KL.
            self.kl[mode][l, h] += np.sum(row.fisher / 2 if mode == "estimate" else row.kl)
            self.predictions[mode][l, h] += text.ids.size - 1
            self.positions[mode][l, h] += text.ids.size
            if mode == "zero":
                if update_sq is None:
                    update_sq = np.einsum("lsd,lsd->l", text.updates, text.updates, dtype=np.float64)
                self.composition[l, h] += row.update_change
                self.base_update_sq[l, h] += update_sq

    def result(self) -> dict:
        """Per-head arrays [layers, heads] (COLUMNS; NaN where a head was not measured in that mode), ``exact`` [layers, heads]
        (zero and mean ablation measured), composition [layers, heads, layers] (NaN for heads not zeroed) and Spearman agreements."""
        columns = {}
        for mode in MODES:
            scale = ALPHA if mode == "estimate" else 1.0
            missing = np.where(self.positions[mode] > 0, 1.0, np.nan)
            columns[f"loss_{mode}"] = missing * self.loss[mode] / np.maximum(self.predictions[mode], 1) / scale
            columns[f"kl_{mode}"] = missing * self.kl[mode] / np.maximum(self.positions[mode], 1) / scale**2
        later = np.triu(np.ones(self.composition.shape[::2], bool), k=1)[:, None, :]  # layer m > l only
        composition = np.where(later, np.sqrt(self.composition / np.maximum(self.base_update_sq, 1e-30)), 0.0)
        composition[self.positions["zero"] == 0] = np.nan
        exact = (self.positions["zero"] > 0) & (self.positions["mean"] > 0)
        return {**columns, "exact": exact, "composition": composition, "spearman": agreement(columns)}


def agreement(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """Spearman rank correlation of each estimate with each exact effect, over the heads where both were measured."""
    found = {}
    for estimate, exact in AGREEMENT:
        a, b = columns[estimate].ravel(), columns[exact].ravel()
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
        usable = a.size > 2 and np.ptp(a) > 0 and np.ptp(b) > 0
        found[f"{estimate}~{exact}"] = float(spearmanr(a, b).statistic) if usable else float("nan")
    return found
