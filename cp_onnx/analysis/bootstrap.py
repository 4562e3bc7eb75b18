"""The resampling behind the default prediction's bounds: texts drawn with replacement, token-weighted means.

One generator and one set of draws serve the decision's bound and the per-kind bounds, so both speak
of the same resamples of the same texts.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 2000
SEED = 0  # the bootstrap's generator: the same texts give the same decision


def resample_weights(tokens: np.ndarray) -> np.ndarray:
    """[draws, texts]: how often each text is drawn, per resample; resamples whose texts hold no scored token are left out."""
    weights = draw_counts(len(tokens))
    return weights[weights @ tokens > 0]


def draw_counts(count: int, stream: int | None = None) -> np.ndarray:
    """[RESAMPLES, count]: how often each of ``count`` texts is drawn in each resample (``stream``: an independent
    generator for one stratum, e.g. one kind of text, so that strata are resampled apart)."""
    rng = np.random.default_rng(SEED if stream is None else [SEED, stream])
    draws = rng.integers(0, count, size=(RESAMPLES, count))
    weights = np.zeros((RESAMPLES, count))
    np.add.at(weights, (np.arange(RESAMPLES)[:, None], draws), 1.0)
    return weights


def per_token(gains: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``gains`` [texts, blocks] per scored token of each text (0 for a text without one)."""
    return np.divide(gains, tokens[:, None], out=np.zeros_like(gains, dtype=np.float64), where=tokens[:, None] > 0)


def weighted_mean(rate: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``weights`` [draws, texts], each block's weighted mean of ``rate`` [texts, blocks] and its
    standard error (the linearised one of a ratio of sums): two arrays [draws, blocks]."""
    total = weights.sum(axis=1, keepdims=True)
    mean = weights @ rate / total
    spread = np.einsum("dt,dtb->db", weights**2, (rate[None] - mean[:, None, :]) ** 2)
    return mean, np.sqrt(spread) / total


def studentised(resampled: np.ndarray, resampled_error: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Each resample's deviation from the estimate in units of its own standard error (0 where that error is 0)."""
    return np.divide(resampled - point, resampled_error, out=np.zeros_like(resampled), where=resampled_error > 0)
