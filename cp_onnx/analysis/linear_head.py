"""Logit measures of perturbed rows without the vocabulary-wide product, where ``logits = y @ W``.

When the head ends in a plain unembedding (``split_unembedding``: no bias, no softcapping), a row's
logit change is exactly linear in the change ``dy`` of its normed hidden state: ``dz = W^T dy``. Then

- ``logit_change = |dz| = sqrt(dy^T (W W^T) dy)``: exact, from the Gram matrix;
- ``fisher = Var_p(dz)`` under the base distribution p: exact but for a truncation, computed on the
  ``top_tokens`` most likely tokens of each position (p renormalised within them), so a row costs
  ``hidden x top_tokens`` per token instead of ``hidden x vocab``. On SmolLM2 the 2048 most likely of
  its 49152 tokens hold all but 2.4e-3 of the probability mass (median over the 286 positions of the
  calibration texts; 4e-2 at the 90th percentile, 0.14 at most): the variance left out is that mass's
  share, where the tail's logits move as much as the rest.
- ``loss`` change to second order: ``log E_p e^dz - dz_target = (ubar - u_target) . dy + fisher / 2 + O(dz^3)``
  with ``ubar = E_p[u_v]`` (``u_v`` column v of W), the first-order term over the whole vocabulary.

The probes that read these are finite-difference steps (heads.ALPHA, mahalanobis.ALPHA = 0.05) whose
truncation error is already O(step) relative to the derivative they estimate; the third-order term left
out of the loss is O(step^2) relative, so the estimates keep their order of accuracy. Rows that need the
exact effect of a large change (KL of an ablation) take the full head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_TOKENS = 2048  # tokens per position the Fisher variance is summed over: 1/24 of SmolLM2's vocabulary's work


class LinearHead:
    """The unembedding W [hidden, vocab] of a head whose logits are ``normed_hidden @ W``, and its Gram matrix."""

    def __init__(self, weight: np.ndarray, top_tokens: int = TOP_TOKENS):
        if top_tokens < 1:
            raise ValueError(f"top_tokens must be >= 1, got {top_tokens}")
        self.weight = np.asarray(weight, dtype=np.float32)
        w = self.weight.astype(np.float64)
        self.gram = w @ w.T  # [hidden, hidden]
        self.top_tokens = min(top_tokens, self.weight.shape[1])

    def logit_change(self, dy: np.ndarray) -> np.ndarray:
        """|W^T dy| over the last axis of ``dy`` [..., hidden] (float64)."""
        return np.sqrt(np.maximum(np.einsum("...h,hk,...k->...", dy, self.gram, dy, optimize=True), 0.0))

    def base(self, probs: np.ndarray, ids: np.ndarray) -> "LinearBase":
        """What every row of one text is measured against: its base distributions ``probs`` [seq, vocab] and next tokens."""
        seq, vocab = probs.shape
        k = self.top_tokens
        top = np.arange(vocab)[None].repeat(seq, 0) if k == vocab else np.argpartition(-probs, k - 1, axis=-1)[:, :k]
        p_top = np.take_along_axis(probs, top, axis=-1).astype(np.float64)
        p_top /= p_top.sum(axis=-1, keepdims=True)
        # ubar - u_target = W q with q = p, its target entry replaced by -(mass of the other tokens): formed
        # without 1 - p_target, which loses its digits when the model is sure of the target.
        positions, targets = np.arange(seq - 1), ids[1:]
        q = probs[:-1].copy()
        q[positions, targets] = 0
        q[positions, targets] = -q.sum(axis=-1, dtype=np.float64)
        gradient = (self.weight @ q.T).T.astype(np.float64)  # [seq - 1, hidden]
        return LinearBase(self, top, p_top, gradient)


@dataclass
class LinearBase:
    head: LinearHead
    top: np.ndarray  # [seq, K] the most likely tokens of each position
    p_top: np.ndarray  # [seq, K] their base probabilities, renormalised
    gradient: np.ndarray  # [seq - 1, hidden] d loss / d y at the base: ubar - u_target

    def measures(self, dy: np.ndarray, wanted: frozenset[str]) -> dict[str, np.ndarray]:
        """Of loss change, Fisher variance and logit change, those ``wanted``, for rows [rows, seq, hidden] of normed-state changes."""
        found = {}
        if "logit_change" in wanted:
            found["logit_change"] = self.head.logit_change(dy.astype(np.float64))
        if wanted & {"fisher", "loss"}:
            fisher = np.empty(dy.shape[:2])
            dy32 = dy.astype(np.float32)
            for s in range(dy.shape[1]):
                dz = (dy32[:, s] @ self.head.weight[:, self.top[s]]).astype(np.float64)  # [rows, K]
                dz -= (dz @ self.p_top[s])[:, None]
                fisher[:, s] = np.square(dz) @ self.p_top[s]
            found["fisher"] = fisher
            if "loss" in wanted:
                found["loss_change"] = np.einsum("rsh,sh->rs", dy[:, :-1].astype(np.float64), self.gradient) + fisher[:, :-1] / 2
        return found
