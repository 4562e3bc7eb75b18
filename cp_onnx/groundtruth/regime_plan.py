"""Prompting regimes: every probe item asked zero-shot (the question alone) and few-shot (its solved examples first).

A block's gain depends on the regime (on SmolLM2 the solved examples do much of what a duplicated
block does), so the sweep scores both and keeps them apart: each row's ``regimes`` maps a regime to
the metrics ``ProbePlan.metrics`` gives for it, with the general-text NLL (which has no prompt) in each.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np

from cp_onnx.errors import CpOnnxError
from cp_onnx.regimes import FEW_SHOT, REGIMES, ZERO_SHOT
from cp_onnx.models.scoring import Encode, ProbeItem, ProbePlan

def asked(items: Iterable[ProbeItem], regime: str) -> list[ProbeItem]:
    """The items as asked in ``regime``: zero-shot without their shots; few-shot only those that have shots."""
    if regime == ZERO_SHOT:
        return [replace(item, shots="") for item in items]
    return [item for item in items if item.shots]


class RegimePlan:
    """One ProbePlan per regime and one for the general texts, run as one list of batches.

    The few-shot plan shares each kind's solved examples as a KV-cache prefix (with ``share_prefixes``);
    zero-shot items run only their own tokens. Duck-types ProbePlan for the evaluators (batches, metrics).
    """

    def __init__(self, items: Sequence[ProbeItem], encode: Encode, general: Sequence[str] = (), *, regimes: Sequence[str] = REGIMES,
                 batch_size: int = 16, max_length: int = 256, share_prefixes: bool = False, item_limit: int | None = None):
        regimes = [r for r in REGIMES if r in regimes]
        if FEW_SHOT in regimes and not any(item.shots for item in items):
            if regimes == [FEW_SHOT]:
                raise CpOnnxError("no probe item has shots, so there is no few-shot regime; give items \"shots\" or choose --regimes zero")
            regimes.remove(FEW_SHOT)  # a suite without shots is zero-shot only
        self.plans = {r: ProbePlan(asked(items, r), encode, batch_size=batch_size, share_prefixes=share_prefixes and r == FEW_SHOT,
                                   item_limit=item_limit) for r in regimes}
        self.general = ProbePlan([], encode, general, batch_size=batch_size, max_length=max_length)
        parts = [*self.plans.values(), self.general]
        self.batches = [batch for plan in parts for batch in plan.batches]
        self.sequences = [seq for plan in parts for seq in plan.sequences]
        self._ends = np.cumsum([len(plan.batches) for plan in parts]).tolist()

    @property
    def regimes(self) -> list[str]:
        return list(self.plans)

    @property
    def identity(self) -> str:
        """sha256 of every regime's plan identity and the general texts': equal plans give equal metrics."""
        payload = json.dumps([[r, plan.identity] for r, plan in self.plans.items()] + [self.general.identity])
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def tokens(self) -> int:
        return sum(plan.tokens for plan in (*self.plans.values(), self.general))

    @property
    def tokens_run(self) -> int:
        return sum(plan.tokens_run for plan in (*self.plans.values(), self.general))

    def metrics(self, results: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
        """``{"regimes": {regime: metrics}}`` from ``token_scores`` of every batch, in batch order."""
        results = list(results)
        parts = [results[begin:end] for begin, end in zip([0, *self._ends], self._ends)]
        general_nll = self.general.metrics(parts[-1])["general_nll"]
        return {"regimes": {r: {**plan.metrics(part), "general_nll": general_nll} for (r, plan), part in zip(self.plans.items(), parts)}}
