"""The default prediction (method ``duplication_loss``): duplicate each candidate block, measure how
well the model then predicts the numbers in the reasoning calibration texts, and name a block only
where the gain is clear.

No labels: the texts are scored as a language model reads them. The score is the log-probability
gained on the tokens that hold digits, because that is where a reasoning text states what was
computed; the other tokens are ordinary language, which duplicating any block makes worse (on
SmolLM2, every block raises the loss averaged over all tokens, and that average ranks the sweep's
best block 34th of 81; the digit tokens rank it first: see benchmarks/results/predictions_*.md).
The loss over all tokens and over general texts is reported beside it as the cost. The sweep's reuse
evaluator runs it (the base model once, each block from the layer where it starts to differ).
A block is predicted to help only when the lower end of a bootstrap interval (texts resampled,
one-sided) on its gain is above zero; otherwise the method abstains and still ranks the least
harmful blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cp_onnx.errors import CpOnnxError
from cp_onnx.model import ModelFolder
from cp_onnx.scores import Block, candidate_blocks
from cp_onnx.scoring import ProbePlan
from cp_onnx.sweep import BASELINE, ReuseEvaluator

METHOD = "duplication_loss"
CONFIDENCE = 0.95  # one-sided: the top block's gain must be above zero in 95% of resamples
RESAMPLES = 2000
SEED = 0  # the bootstrap's generator: the same texts give the same decision


class NoNumbersError(CpOnnxError):
    """The reasoning texts hold no digit token to score (analyze skips the method when others were asked for)."""


@dataclass(frozen=True)
class Prediction:
    """Ranked blocks (score: gain on the reasoning texts' digit tokens, nats per token) and the decision on the top one."""

    blocks: list[Block]
    decision: str  # "help" or "abstain"
    texts: dict[str, int]  # texts scored per set

    def as_dict(self, least_harmful: int = 3) -> dict:
        top = self.blocks[0]
        chosen = {"start": top.start, "end": top.end} if self.decision == "help" else None
        return {
            "method": METHOD,
            "decision": self.decision,
            "block": chosen,
            "predicted_gain": top.score,
            "gain_lower_bound": top.metrics["gain_lower_bound"],
            "confidence": CONFIDENCE,
            "candidates": [b.as_dict() for b in self.blocks[:least_harmful]],
            "texts": dict(self.texts),
            "units": "nats per digit token of the reasoning calibration texts; positive = the duplicated model predicts them better",
        }


def predict(model: ModelFolder, reasoning: Sequence[str], general: Sequence[str], *, block_sizes: Sequence[int] = (3, 4, 5),
            max_length: int = 128, threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> Prediction:
    """Score every block of ``block_sizes`` by the log-probability it adds to the digit tokens of ``reasoning``."""
    if not reasoning:
        raise CpOnnxError("no reasoning calibration texts to score blocks on; give at least one")
    texts = [*reasoning, *general]
    plan = ProbePlan([], lambda text: model.encode([text])[0][0], texts, max_length=max_length)
    if len(plan.continuations) != len(texts):
        raise CpOnnxError("a calibration text tokenizes to a single token, which leaves nothing to predict; give longer texts")
    owners = np.concatenate([batch.owners for batch in plan.batches])
    numeric = numeric_tokens(model, np.concatenate([batch.targets for batch in plan.batches])) & (owners < len(reasoning))
    if not numeric.any():
        raise NoNumbersError("the reasoning calibration texts hold no numbers, and this method scores the numbers a text states or derives; "
                          "give texts with numbers, or choose one of the paper's methods with --method (stability, anomaly, composite, boundary)")
    evaluator = ReuseEvaluator(model.onnx_path, plan, threads)
    blocks = candidate_blocks(evaluator.num_layers, tuple(block_sizes))
    sums = []  # per config: [3, texts] summed log-prob of each text's digit tokens, of all its tokens, and how many digit tokens
    if progress:
        progress(0, len(blocks) + 1)
    for done, config in enumerate([BASELINE, *blocks], 1):
        logprob = np.concatenate([scores for scores, _ in evaluator.token_scores(config)])
        if not np.isfinite(logprob).all():
            raise CpOnnxError(f"the model's log-probabilities are not finite with block {config} duplicated; check the exported model")
        sums.append([np.bincount(owners, weights=logprob * numeric, minlength=len(texts)), np.bincount(owners, weights=logprob, minlength=len(texts))])
        if progress:
            progress(done, len(blocks) + 1)
    sums = np.array(sums)  # [configs, 2, texts]
    gains = sums[1:] - sums[0]  # [blocks, 2, texts]
    counts = np.bincount(owners, weights=numeric.astype(float), minlength=len(texts))
    tokens = np.array([len(c.tokens) for c in plan.continuations], dtype=np.float64)
    r = len(reasoning)
    numeric_gain = gains[:, 0, :r].sum(1) / counts[:r].sum()
    text_gain = gains[:, 1, :r].sum(1) / tokens[:r].sum()
    general_gain = gains[:, 1, r:].sum(1) / tokens[r:].sum() if general else np.full(len(blocks), np.nan)
    lower = _lower_bound(gains[:, 0, :r].T, counts[:r])
    ranked = sorted(range(len(blocks)), key=lambda b: (-numeric_gain[b], blocks[b]))
    scored = [Block(*blocks[b], float(numeric_gain[b]), {"gain_lower_bound": float(lower[b]), "text_nll_change": float(-text_gain[b]),
                                                         "general_nll_change": float(-general_gain[b])}) for b in ranked]
    decision = "help" if scored[0].metrics["gain_lower_bound"] > 0 else "abstain"
    return Prediction(scored, decision, {"reasoning": r, "general": len(general), "digit_tokens": int(counts[:r].sum())})


def numeric_tokens(model: ModelFolder, ids: np.ndarray) -> np.ndarray:
    """Which token ids hold a digit (as the tokenizer spells them: "Ġ42", "▁7", "3")."""
    spell = model.tokenizer.id_to_token
    return np.array([any(ch.isdigit() for ch in (spell(int(i)) or "")) for i in ids], dtype=bool)


def _lower_bound(gains: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per block, the (1 - CONFIDENCE) quantile of the token-weighted gain over texts resampled with replacement.

    ``gains`` [texts, blocks] and ``tokens`` [texts]; a resample whose texts hold no scored token is left out."""
    count = len(tokens)
    draws = np.random.default_rng(SEED).integers(0, count, size=(RESAMPLES, count))
    weights = np.zeros((RESAMPLES, count))
    np.add.at(weights, (np.arange(RESAMPLES)[:, None], draws), 1.0)
    scored = weights @ tokens
    resampled = (weights @ gains)[scored > 0] / scored[scored > 0, None]
    return np.quantile(resampled, 1 - CONFIDENCE, axis=0)
