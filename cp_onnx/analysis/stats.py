"""The CircuitProbe paper's seven per-layer statistics, accumulated from padded batches.

Every text is mean-pooled over its own valid positions only, so a batch gives the same numbers
as running each text alone, as the paper's reference implementation does (METHOD.md).
Memory stays bounded: running sums per layer, the pooled outputs' running mean and squared
deviations (for the cross-example variance), the first text's pooled outputs (for the forward
similarity) and the change vectors of the first ``RANK_TEXTS`` texts (for the rank).
"First" means first in the calibration order, which batches may state (``positions``) when they
arrive in another order (sorted by length, to pad less).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cp_onnx.errors import CpOnnxError
from graph_passes.layer_map import block_name

STAT_NAMES = (
    "representation_change",
    "self_similarity",
    "norm_growth",
    "attention_entropy",
    "cross_example_variance",
    "representation_rank",
    "forward_similarity",
)
RANK_TEXTS = 50  # the reference stacks the change vectors of the first 50 texts
MIN_RANK_TEXTS = 5  # below this the reference leaves representation_rank at 0.0
PROB_FLOOR = 1e-10  # attention probabilities are clamped here before the log
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity clamps each norm at this
NORM_FLOOR = 1e-8  # texts whose pooled input norm is at most this are skipped for norm_growth


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis, each norm clamped at COS_EPS as torch does."""
    nx = np.maximum(np.linalg.norm(x, axis=-1), COS_EPS)
    ny = np.maximum(np.linalg.norm(y, axis=-1), COS_EPS)
    return np.sum(x * y, axis=-1) / (nx * ny)


class LayerStatistics:
    """Streaming accumulator of the per-layer statistics; feed batches, then call ``result``."""

    def __init__(self, num_layers: int):
        if num_layers < 1:
            raise CpOnnxError(f"num_layers must be at least 1, got {num_layers}")
        self.num_layers = num_layers
        self.num_texts = 0
        # Running per-layer sums over texts (norm growth counts its own texts: some are skipped).
        self._change_sum, self._self_sim_sum, self._entropy_sum = (np.zeros(num_layers) for _ in range(3))
        self._growth_sum, self._growth_count = np.zeros(num_layers), np.zeros(num_layers)
        self._with_patterns: bool | None = None  # whether batches carry attention patterns
        self._out_mean: np.ndarray | None = None  # [layers, hidden], running mean of pooled outputs
        self._out_m2: np.ndarray | None = None  # [layers, hidden], running sum of squared deviations
        self._first_out: tuple[int, np.ndarray] | None = None  # (position, [layers, hidden]) of the first text
        self._rank_changes: dict[int, np.ndarray] = {}  # position -> [layers, hidden], first RANK_TEXTS texts

    def add_batch(
        self,
        resid_in: Sequence[np.ndarray],
        resid_out: Sequence[np.ndarray],
        attention_mask: np.ndarray,
        patterns: Sequence[np.ndarray] | None = None,
        positions: Sequence[int] | None = None,
    ) -> None:
        """Add a padded batch: per layer [batch, seq, hidden] residuals and [batch, heads, seq, seq] patterns.

        ``positions``: each text's place in the calibration order (default: after the texts added so far).
        """
        mask = self._check_batch(resid_in, resid_out, attention_mask, patterns)
        positions = list(range(self.num_texts, self.num_texts + mask.shape[0]) if positions is None else positions)
        if len(positions) != mask.shape[0]:
            raise CpOnnxError(f"got {len(positions)} positions for a batch of {mask.shape[0]} texts; give one per text")
        # Everything is computed before any state changes, so a rejected batch leaves no trace.
        # Layer by layer, input before output, so a NaN is blamed on the layer that produced it.
        pooled_in, pooled_out = [], []
        for layer, (x, y) in enumerate(zip(resid_in, resid_out)):
            pooled_in.append(self._pool(x, mask, layer, "resid_in"))
            pooled_out.append(self._pool(y, mask, layer, "resid_out"))
        pooled_in, pooled_out = np.stack(pooled_in, axis=1), np.stack(pooled_out, axis=1)  # [batch, layers, hidden]
        if patterns is not None:
            self._entropy_sum += [self._entropy(p, mask, layer).sum() for layer, p in enumerate(patterns)]
        self._with_patterns = patterns is not None
        change = pooled_out - pooled_in  # [batch, layers, hidden]
        self._change_sum += np.linalg.norm(change, axis=-1).sum(axis=0)
        self._self_sim_sum += cosine(pooled_in, pooled_out).sum(axis=0)
        in_norm = np.linalg.norm(pooled_in, axis=-1)
        usable = in_norm > NORM_FLOOR
        self._growth_sum += np.where(usable, np.linalg.norm(pooled_out, axis=-1) / np.where(usable, in_norm, 1.0), 0.0).sum(axis=0)
        self._growth_count += usable.sum(axis=0)
        self._merge_outputs(pooled_out)
        first = int(np.argmin(positions))
        if self._first_out is None or positions[first] < self._first_out[0]:
            self._first_out = (positions[first], pooled_out[first].copy())
        self._rank_changes.update(zip(positions, change))  # rows of a fresh array: no copy needed
        for late in sorted(self._rank_changes)[RANK_TEXTS:]:
            del self._rank_changes[late]
        self.num_texts += mask.shape[0]

    def result(self) -> dict[str, np.ndarray]:
        """The seven statistics, each float64 [num_layers]; attention_entropy is NaN without patterns."""
        if self.num_texts == 0:
            raise CpOnnxError("no calibration texts were added; call add_batch with at least one text first")
        n = self.num_texts
        growth = np.divide(self._growth_sum, self._growth_count, out=np.zeros(self.num_layers), where=self._growth_count > 0)
        forward = np.zeros(self.num_layers)  # the last layer has no successor: 0, as in the reference
        first_out = self._first_out[1]
        forward[:-1] = cosine(first_out[:-1], first_out[1:])
        return {
            "representation_change": self._change_sum / n,
            "self_similarity": self._self_sim_sum / n,
            "norm_growth": growth,
            "attention_entropy": self._entropy_sum / n if self._with_patterns else np.full(self.num_layers, np.nan),
            "cross_example_variance": (self._out_m2 / n).mean(axis=1),
            "representation_rank": self._rank(),
            "forward_similarity": forward,
        }

    def _check_batch(self, resid_in, resid_out, attention_mask, patterns) -> np.ndarray:
        """Validate shapes against each other and earlier batches; return the mask as booleans."""
        mask = np.asarray(attention_mask)
        if mask.ndim != 2:
            raise CpOnnxError(f"attention_mask must be [batch, seq], got shape {mask.shape}")
        mask = mask != 0
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise CpOnnxError(f"text {int(empty[0])} of the batch has no valid position (attention_mask all 0); drop empty texts")
        roles = [("resid_in", resid_in), ("resid_out", resid_out)] + ([("attn.pattern", patterns)] if patterns is not None else [])
        for role, tensors in roles:
            if len(tensors) != self.num_layers:
                raise CpOnnxError(f"got {len(tensors)} {role} tensors for a {self.num_layers}-layer model; pass one per layer")
        hidden = self._out_mean.shape[1] if self._out_mean is not None else np.shape(resid_in[0])[-1]
        for role, tensors in roles:
            for layer, t in enumerate(tensors):
                shape = np.shape(t)
                if role == "attn.pattern":
                    ok, want = len(shape) == 4 and shape[0] == mask.shape[0] and shape[2:] == (mask.shape[1],) * 2, "[batch, heads, seq, seq]"
                else:
                    ok, want = shape == (*mask.shape, hidden), f"{(*mask.shape, hidden)}"
                if not ok:
                    raise CpOnnxError(f"{block_name(layer, role)} has shape {shape}, expected {want} to match attention_mask {mask.shape}")
        if self._with_patterns is not None and (patterns is not None) != self._with_patterns:
            raise CpOnnxError("attention patterns were given for some batches and not others; pass them for every batch or none")
        return mask

    @staticmethod
    def _pool(x: np.ndarray, mask: np.ndarray, layer: int, role: str) -> np.ndarray:
        """Mean over each text's valid positions, in float64: [batch, seq, hidden] -> [batch, hidden]."""
        # np.where, not a multiply: garbage (even NaN) at pad positions must not leak in.
        total = np.where(mask[..., None], x, 0).sum(axis=1, dtype=np.float64)
        # Any NaN/Inf at a valid position makes the sum non-finite, so this checks every one of them.
        if not np.isfinite(total).all():
            where = f"layer {layer} produced" if role == "resid_out" else f"layer {layer} received"
            raise CpOnnxError(
                f"{where} NaN/Inf activations ({block_name(layer, role)}); the model overflows or is broken "
                f"on this input: export it in float32 (not float16) and check the weights and input ids"
            )
        return total / mask.sum(axis=1)[:, None]

    @staticmethod
    def _entropy(pattern: np.ndarray, mask: np.ndarray, layer: int) -> np.ndarray:
        """Per-text mean over heads and valid query rows of the entropy over valid keys: -> [batch]."""
        probs = np.maximum(pattern.astype(np.float64), PROB_FLOOR)
        terms = np.where(mask[:, None, None, :], -probs * np.log(probs), 0.0)
        rows = np.where(mask[:, None, :], terms.sum(axis=-1), 0.0)  # [batch, heads, seq]
        per_text = rows.sum(axis=(1, 2)) / (pattern.shape[1] * mask.sum(axis=1))
        if not np.isfinite(per_text).all():
            raise CpOnnxError(
                f"layer {layer} produced NaN/Inf attention probabilities ({block_name(layer, 'attn.pattern')}); "
                f"export the model in float32 and check the attention mask"
            )
        return per_text

    def _merge_outputs(self, pooled_out: np.ndarray) -> None:
        """Fold a batch of pooled outputs into the running mean and squared deviations (Chan et al.)."""
        count = pooled_out.shape[0]
        batch_mean = pooled_out.mean(axis=0)
        batch_m2 = ((pooled_out - batch_mean) ** 2).sum(axis=0)
        if self._out_mean is None:
            self._out_mean, self._out_m2 = batch_mean, batch_m2
            return
        total = self.num_texts + count
        delta = batch_mean - self._out_mean
        self._out_mean = self._out_mean + delta * (count / total)
        self._out_m2 = self._out_m2 + batch_m2 + delta**2 * (self.num_texts * count / total)

    def _rank(self) -> np.ndarray:
        """Effective rank (exp of the entropy of normalised singular values) of the stacked change vectors."""
        if len(self._rank_changes) < MIN_RANK_TEXTS:
            return np.zeros(self.num_layers)  # the reference leaves the rank at its default, 0.0
        changes = np.stack([self._rank_changes[p] for p in sorted(self._rank_changes)], axis=1)  # [layers, texts, hidden]
        ranks = np.zeros(self.num_layers)
        for layer, matrix in enumerate(changes):
            singular = np.linalg.svd(matrix, compute_uv=False)
            p = singular / (singular.sum() + PROB_FLOOR)
            p = p[p > PROB_FLOOR]
            ranks[layer] = np.exp(-np.sum(p * np.log(p)))
        return ranks
