"""Mahalanobis anomaly: how atypical each layer's token activations and updates are, and its outlier neurons.

Per layer, over every calibration token (fewer tokens than dimensions, so the covariance is the
Ledoit-Wolf shrinkage estimate):
- ``distance_mean`` and ``tail_ratio`` (max / median) of the Mahalanobis distances of the layer's
  output tokens under their own mean and covariance: how far the most unusual tokens stand out;
- ``shift``: mean Mahalanobis norm of the layer's update (out - in) under the covariance of its
  input tokens: representation change in units of the input's own spread (the paper's change,
  whitened, so massive-activation dimensions do not dominate it);
- outlier neurons: the output dimensions with the largest mean |activation| (magnitude z-score
  across dimensions). Each candidate's weight on the logits is measured: the first-order logit
  change of zeroing it at every token (a finite-difference step of ALPHA toward zero, RMS over
  tokens of the logit-vector norm). ``logit_share`` divides it by what a typical neuron would give:
  the RMS magnitude over all dimensions times the logit Jacobian's RMS sensitivity per direction
  (Frobenius norm / sqrt(hidden)) at the same point. A share far above 1 is a neuron that weighs
  disproportionately on the logits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.linalg import solve_triangular

from cp_onnx.analysis.heads import ALPHA
from cp_onnx.analysis.perturbation import Probe, ProbeResult, Row, TextBase
from cp_onnx.analysis.scores import EPS, Block, block_z
from cp_onnx.models.evaluators import candidate_blocks
from cp_onnx.errors import CpOnnxError

METHOD = "mahalanobis"
NEURONS_PER_LAYER = 2  # candidates measured per layer (two forwards' worth of rows each)
OUTLIER_Z = 3.0  # magnitude z-score from which a candidate counts as an outlier neuron


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, Ledoit-Wolf shrunk covariance ``(1 - s) S + s mu I`` and shrinkage ``s`` of samples x [n, d] (float64).

    S is the maximum-likelihood covariance (divided by n), mu = trace(S) / d; ``s`` minimises the
    expected Frobenius loss (Ledoit and Wolf 2004, "A well-conditioned estimator for large-dimensional
    covariance matrices"), computed through the n x n Gram matrix since n < d here.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise CpOnnxError(f"the covariance needs at least 2 samples of shape [n, d], got {x.shape}; use more calibration tokens")
    n, d = x.shape
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / n
    mu = np.trace(cov) / d
    gram = centred @ centred.T
    sq_norm_s = np.sum(gram**2) / n**2  # ||S||_F^2 = ||X X^T||_F^2 / n^2
    dispersion = (sq_norm_s - 2 * mu * np.trace(cov) + d * mu**2) / d  # ||S - mu I||_F^2 / d
    # (1/n^2) sum_k ||x_k x_k^T - S||_F^2 / d, the variance of S around its mean
    spread = (np.sum(np.diag(gram) ** 2) / n - sq_norm_s) / (n * d)
    shrinkage = 0.0 if dispersion <= 0 else float(min(spread, dispersion) / dispersion)
    shrunk = (1 - shrinkage) * cov
    shrunk[np.diag_indices(d)] += shrinkage * mu
    return mean, shrunk, shrinkage


def mahalanobis(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Distances sqrt((x - mean)^T cov^-1 (x - mean)) of the rows of x [n, d]."""
    return _distances(x, mean, _cholesky(cov))


def _cholesky(cov: np.ndarray) -> np.ndarray:
    # A Cholesky factor, not an eigendecomposition: ~10x cheaper, and it checks positive definiteness.
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise CpOnnxError("the covariance is singular; Mahalanobis distances need a shrunk (positive definite) covariance") from None


def _distances(x: np.ndarray, mean: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Mahalanobis distances under the covariance whose lower Cholesky factor is ``factor``."""
    whitened = solve_triangular(factor, (np.asarray(x, dtype=np.float64) - mean).T, lower=True)
    return np.linalg.norm(whitened, axis=0)


def candidates(texts: Sequence[TextBase], count: int = NEURONS_PER_LAYER) -> np.ndarray:
    """[layers, count] output dimensions of largest mean |activation| over all tokens, per layer."""
    magnitude = _magnitudes(texts)
    return np.argsort(-magnitude, axis=1, kind="stable")[:, :count]


def _magnitudes(texts: Sequence[TextBase]) -> np.ndarray:
    """[layers, hidden] mean |activation| of each layer's output over every token of every text."""
    total = sum(np.abs(t.resid[1:]).sum(axis=1, dtype=np.float64) for t in texts)
    return total / sum(t.ids.size for t in texts)


def probes(text: TextBase, neurons: np.ndarray) -> list[Probe]:
    """One row per candidate: the layer's output dimension stepped ALPHA of the way to zero at every token."""
    found = []
    for l, dims in enumerate(neurons):
        x = text.resid[l + 1]  # layer l's output enters layer l + 1 (or the head)
        for i in dims:
            delta = np.zeros_like(x)
            delta[:, i] = -ALPHA * x[:, i]
            found.append(Probe((METHOD, l, int(i)), (Row(l + 1, delta),), ALPHA, measures=frozenset({"logit_change", "fisher"})))
    return found


class AnomalyStats:
    """Per-layer Mahalanobis statistics of the base activations, and the outlier neurons' measured logit weight."""

    def __init__(self, texts: Sequence[TextBase], neurons: np.ndarray):
        self.texts, self.neurons = texts, neurons
        self.effect_sq = np.zeros(neurons.shape)
        self.kl = np.zeros(neurons.shape)
        self.tokens = 0

    def add(self, text: TextBase, results: Sequence[ProbeResult]) -> None:
        """Fold in one text's neuron probe results."""
        for result in results:
            _, l, i = result.probe.key
            k = int(np.flatnonzero(self.neurons[l] == i)[0])
            row = result.rows[0]
            self.effect_sq[l, k] += np.sum((row.logit_change / ALPHA) ** 2)
            self.kl[l, k] += np.sum(row.fisher) / 2 / ALPHA**2
        self.tokens += text.ids.size

    def result(self, frobenius_logits: np.ndarray) -> dict:
        """Per-layer statistics and the candidate neurons; ``frobenius_logits`` [layers + 1] is the logit
        Jacobian's RMS Frobenius norm at each layer's input and, last, at the head's."""
        resid = [np.concatenate([t.resid[p] for t in self.texts]) for p in range(self.texts[0].resid.shape[0])]
        layers = len(resid) - 1
        stats = {name: np.zeros(layers) for name in ("distance_mean", "tail_ratio", "shift", "shrinkage", "max_logit_share", "outlier_neurons")}
        magnitude = _magnitudes(self.texts)
        z = (magnitude - magnitude.mean(axis=1, keepdims=True)) / (magnitude.std(axis=1, keepdims=True) + EPS)
        neurons = []
        _, cov, _ = ledoit_wolf(resid[0])
        factor_in = _cholesky(cov)
        for l in range(layers):
            mean, cov, stats["shrinkage"][l] = ledoit_wolf(resid[l + 1])
            factor = _cholesky(cov)
            distances = _distances(resid[l + 1], mean, factor)
            stats["distance_mean"][l] = distances.mean()
            stats["tail_ratio"][l] = distances.max() / max(np.median(distances), EPS)
            stats["shift"][l] = _distances(resid[l + 1] - resid[l], 0.0, factor_in).mean()
            factor_in = factor
            found = self._neurons(l, resid[l + 1], magnitude[l], z[l], frobenius_logits[l + 1])
            stats["max_logit_share"][l] = max((n["logit_share"] for n in found), default=np.nan)
            stats["outlier_neurons"][l] = int(np.sum(z[l] >= OUTLIER_Z))
            neurons += found
        return {"layers": stats, "neurons": neurons}

    def _neurons(self, layer: int, outputs: np.ndarray, magnitude: np.ndarray, z: np.ndarray, frobenius_logits: float) -> list[dict]:
        """The layer's candidates with their measured logit effect and its ratio to a typical neuron's."""
        rms = np.sqrt(np.mean(outputs.astype(np.float64) ** 2, axis=0))  # per dimension, over tokens
        typical = np.sqrt(np.mean(rms**2)) * frobenius_logits / np.sqrt(rms.size)
        found = []
        for k, i in enumerate(self.neurons[layer]):
            effect = np.sqrt(self.effect_sq[layer, k] / max(self.tokens, 1))
            found.append({
                "layer": layer, "dim": int(i), "magnitude": float(magnitude[i]), "magnitude_z": float(z[i]),
                "logit_effect": float(effect), "kl_effect": float(self.kl[layer, k] / max(self.tokens, 1)),
                "logit_share": float(effect / max(typical, EPS)), "outlier": bool(z[i] >= OUTLIER_Z),
            })
        return found


# Per-layer statistics the anomaly score adds up (log scale: they are ratios and spread over decades):
# outlier tokens and outlier neurons. ``shift`` is reported but left out: it is the paper's representation
# change, whitened, which the paper's anomaly score already counts (and the embedding's tiny spread makes
# layer 0's shift extreme in every model).
ANOMALY_TERMS = ("tail_ratio", "max_logit_share")


def rank_blocks(layers: dict[str, np.ndarray], block_sizes: Sequence[int] = (3, 4, 5)) -> list[Block]:
    """Blocks ranked by Mahalanobis anomaly: the sum over ANOMALY_TERMS of the z-score of the block's mean log value."""
    logs = {name: np.log(np.maximum(layers[name], EPS)) for name in ANOMALY_TERMS}
    blocks = []
    for start, end in candidate_blocks(len(logs[ANOMALY_TERMS[0]]), block_sizes):
        metrics = {f"{name}_z": block_z(values, start, end) for name, values in logs.items()}
        blocks.append(Block(start, end, sum(metrics.values()), metrics))
    return sorted(blocks, key=lambda b: b.score, reverse=True)
