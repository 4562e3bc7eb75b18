"""Activation Jacobians: how strongly the rest of the model answers a change of each layer's input.

Per token ``t`` and layer ``l`` we estimate the Frobenius norm of ``J_t = d out[t] / d x_l[0..t]``,
the output at ``t`` with respect to the layer's input at every position ``t`` sees: the row block
of the full (causal) Jacobian. Summed in squares over tokens it gives the full Jacobian's Frobenius
norm, as the column blocks (input at ``t`` -> outputs at ``>= t``) do; unlike either per-position
block, it costs two forwards per probe for all tokens at once: every position is perturbed by its
own ``v_t ~ N(0, I)`` and ``E |sum_t' J_tt' v_t'|^2 = sum_t' ||J_tt'||_F^2``. Outputs: the last
layer's output (the residual stream entering the final norm; the segment head does not expose the
norm's output) and the logits, which include the final norm.

The logits' part needs only the norm of each pair's logit difference: where the logits are the normed
hidden state times a matrix W, PerturbedRuns forms it as sqrt(d W W^T d) from the normed states'
difference d, without the vocabulary-wide product (exact up to rounding; tested against autograd).

Jacobian-vector products come from central differences ``(f(x + h v) - f(x - h v)) / 2h`` with
``h`` relative to the input's scale (see RELATIVE_STEP). Points are the inputs of layers 0..L-1 and,
last, the head's input (the final norm's).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cp_onnx.analysis.perturbation import Probe, ProbeResult, Row, TextBase
from cp_onnx.analysis.scores import EPS, Block, block_z
from cp_onnx.models.evaluators import candidate_blocks

METHOD = "jacobian"
# Central differences in float32: the truncation error is ~ h^2 |f'''| / 6, with f''' ~ |f| / s^3 for
# an input of scale s, and the round-off error is ~ eps |f| / h (eps = 1.2e-7). Their sum is smallest
# at h ~ (3 eps)^(1/3) s ~ 7e-3 s. The scale s is the text's median per-token RMS of the layer input:
# SmolLM2's per-token norms grow from ~3 at the embedding to ~700 at the head's input, and the first
# token's reach ~2.5e4, so any absolute step would be round-off noise in late layers and a large
# perturbation in early ones. (The median keeps the first token's massive activations out of s.)
RELATIVE_STEP = float((3 * np.finfo(np.float32).eps) ** (1 / 3))
NUM_PROBES = 2


def input_scale(x: np.ndarray) -> float:
    """Median over tokens of the per-token RMS of a [seq, hidden] activation."""
    return float(np.median(np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1))))


def probes(text: TextBase, layers: Sequence[int], num_probes: int, rng: np.random.Generator) -> list[Probe]:
    """Central-difference pairs ``x +- h v`` at each layer's input, ``v ~ N(0, I)`` at every position."""
    found = []
    for l in layers:
        x = text.resid[l]
        step = RELATIVE_STEP * input_scale(x)
        for k in range(num_probes):
            v = (step * rng.standard_normal(x.shape)).astype(x.dtype)
            found.append(Probe((METHOD, l, k), (Row(l, v), Row(l, -v)), step, measures=frozenset()))  # the pair's logit change only
    return found


def directional(result: ProbeResult) -> tuple[np.ndarray, np.ndarray]:
    """The pair's Jacobian-vector products: of the last layer's output [seq, hidden], and the norm of the logits' [seq]."""
    plus, minus = result.rows
    step = 2 * result.probe.step
    final = (plus.final.astype(np.float64) - minus.final) / step
    return final, result.pair_logit_change / step


class JacobianStats:
    """Per input point (each layer's input, then the head's) and token: Frobenius norm estimates and relative gains."""

    def __init__(self, points: int):
        # Per point, one [seq] array per text.
        self.frob_final_sq: list[list[np.ndarray]] = [[] for _ in range(points)]
        self.frob_logits_sq: list[list[np.ndarray]] = [[] for _ in range(points)]
        self.gain_final: list[list[np.ndarray]] = [[] for _ in range(points)]
        self.gain_logits: list[list[np.ndarray]] = [[] for _ in range(points)]
        self.scale: list[list[float]] = [[] for _ in range(points)]

    def add(self, text: TextBase, final: np.ndarray, results: Sequence[ProbeResult]) -> None:
        """Fold one text's probe results in; ``final`` is the base row's last-layer output [seq, hidden]."""
        by_point: dict[int, list[ProbeResult]] = {}
        for result in results:
            by_point.setdefault(result.probe.key[1], []).append(result)
        final_norm = np.linalg.norm(final.astype(np.float64), axis=-1)
        for l, group in sorted(by_point.items()):
            jvps = [directional(r) for r in group]
            f_sq = np.mean([np.sum(j[0] ** 2, axis=-1) for j in jvps], axis=0)
            z_sq = np.mean([j[1] ** 2 for j in jvps], axis=0)
            s = input_scale(text.resid[l])
            self.frob_final_sq[l].append(f_sq)
            self.frob_logits_sq[l].append(z_sq)
            # Relative gain: output change per relative change of a typical input token (both as fractions of their size).
            self.gain_final[l].append(s * np.sqrt(f_sq) / np.maximum(final_norm, EPS))
            # Logits have no natural size (a shared offset is free): their change per relative input change, in nats.
            self.gain_logits[l].append(s * np.sqrt(z_sq))
            self.scale[l].append(s)

    def per_point(self) -> dict[str, np.ndarray]:
        """RMS Frobenius norms over all tokens, geometric-mean gains, mean input scale: one value per point."""
        def pooled(values, how):
            return np.array([how(np.concatenate(v)) if v else np.nan for v in values])

        def geometric(a):
            return np.exp(np.mean(np.log(np.maximum(a, EPS))))

        return {
            "frobenius_final": pooled(self.frob_final_sq, lambda a: np.sqrt(np.mean(a))),
            "frobenius_logits": pooled(self.frob_logits_sq, lambda a: np.sqrt(np.mean(a))),
            "gain_final": pooled(self.gain_final, geometric),
            "gain_logits": pooled(self.gain_logits, geometric),
            "input_scale": np.array([np.mean(s) if s else np.nan for s in self.scale]),
        }


def rank_blocks(per_layer: dict[str, np.ndarray], block_sizes: Sequence[int] = (3, 4, 5)) -> list[Block]:
    """Blocks ranked by Jacobian stability: low logit gain inside the block and a flat gain profile.

    ``gain_z`` = z-score of the block's mean log gain (logits); ``roughness_z`` = z-score of the block's
    mean |step| of log gain between consecutive layers (the step into the next layer counts, as in the
    paper's stability term). score = -gain_z - roughness_z; a heuristic, validated only by the sweep.
    """
    log_gain = np.log(np.maximum(per_layer["gain_logits"], EPS))
    steps = np.abs(np.diff(log_gain))
    blocks = []
    for start, end in candidate_blocks(len(log_gain), block_sizes):
        gain_z = block_z(log_gain, start, end)
        rough = steps[start : min(end, len(steps))]
        roughness_z = float((np.mean(rough) - np.mean(steps)) / (np.std(steps) + EPS)) if rough.size else 0.0
        metrics = {"gain_z": gain_z, "roughness_z": roughness_z, "mean_log_gain": float(np.mean(log_gain[start:end]))}
        blocks.append(Block(start, end, -gain_z - roughness_z, metrics))
    return sorted(blocks, key=lambda b: b.score, reverse=True)

