"""Per kind of calibration text: a block's gain on the digit tokens of each kind's texts, and where it clearly helps or hurts.

The texts of a kind stand for the task of that kind (the shipped English texts name the probe suite's
kinds: arithmetic texts for arithmetic questions, ...); a user's texts without a "kind" form one kind,
"your texts", so the prediction speaks for the user's own task. A kind's gain is the overall score
restricted to its texts (log-probability gained per digit token). Its bounds are two-sided and hold for
every scored block and every kind at once (max-|t| over resamples, studentised): reading off the kind
where a block looks best must not pass that luck off as an effect. Each kind is resampled within its
own texts (a stratified bootstrap): drawn from all texts at once, a kind of 14 among 83 questions was
often drawn as 3 or 4 distinct texts, whose tiny standard errors put its bounds at +-10 nats.
A kind with fewer than MIN_TEXTS texts holding numbers is "unclear" and has no bounds, as the decision
abstains with too few texts: a studentised bootstrap over two or three texts has resamples of one text
repeated, whose standard error is about zero, and its critical value runs to 1e12 (seen on SmolLM2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from cp_onnx.analysis import bootstrap
from cp_onnx.calibration import TASK_KINDS

HELPS, HURTS, UNCLEAR = "helps", "hurts", "unclear"


@dataclass(frozen=True)
class KindGain:
    """One block on the texts of one kind: gain (nats per digit token), its simultaneous bounds, and the verdict."""

    texts: int
    with_numbers: int
    gain: float | None  # None when no text of the kind holds a number
    lower: float | None
    upper: float | None
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)


def kind_order(kinds: Sequence[str]) -> list[str]:
    """The distinct kinds, the probe suite's in its order first, then the others as they first appear."""
    present = dict.fromkeys(kinds)
    return [k for k in TASK_KINDS if k in present] + [k for k in present if k not in TASK_KINDS]


def kind_gains(gains: np.ndarray, tokens: np.ndarray, kinds: Sequence[str], *, confidence: float, min_texts: int,
               floor: float = 0.0) -> list[dict[str, KindGain]]:
    """Per block (a column of ``gains`` [texts, blocks]), each kind's KindGain; ``tokens`` [texts]: digit tokens per text.
    ``floor``: the least critical value (after a race, the Bonferroni bound over the blocks raced and the kinds)."""
    kinds = np.asarray(kinds, dtype=object)
    rate = bootstrap.per_token(gains, tokens)
    found, deviations = {}, {}  # kind -> (texts, with numbers, gain, standard error); kind -> the largest |t| over blocks per resample
    for stream, kind in enumerate(kind_order(list(kinds))):
        member = kinds == kind
        texts, digits = int(member.sum()), tokens[member]
        with_numbers = int((digits > 0).sum())
        point, error = bootstrap.weighted_mean(rate[member], digits[None, :]) if with_numbers else (None, None)
        found[kind] = (texts, with_numbers, point, error)
        if with_numbers < min_texts:
            continue
        drawn = bootstrap.draw_counts(texts, stream) * digits
        held = drawn.sum(axis=1) > 0  # resamples that drew a text of this kind holding numbers
        resampled, resampled_error = bootstrap.weighted_mean(rate[member], drawn[held])
        t = np.zeros((len(drawn), gains.shape[1]))
        t[held] = np.abs(bootstrap.studentised(resampled, resampled_error, point))
        deviations[kind] = t.max(axis=1)
    critical = max(floor, float(np.quantile(np.max(list(deviations.values()), axis=0), confidence))) if deviations else None
    return [{kind: _judged(texts, with_numbers, point, error, block, critical, min_texts)
             for kind, (texts, with_numbers, point, error) in found.items()} for block in range(gains.shape[1])]


def _judged(texts: int, with_numbers: int, point, error, block: int, critical: float | None, min_texts: int) -> KindGain:
    if point is None:
        return KindGain(texts, 0, None, None, None, UNCLEAR)
    if with_numbers < min_texts:
        return KindGain(texts, with_numbers, float(point[0, block]), None, None, UNCLEAR)
    gain, margin = float(point[0, block]), critical * float(error[0, block])
    lower, upper = gain - margin, gain + margin
    verdict = HELPS if lower > 0 else HURTS if upper < 0 else UNCLEAR
    return KindGain(texts, with_numbers, gain, lower, upper, verdict)
