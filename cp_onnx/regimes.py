"""The prompting regimes, one vocabulary for the prediction, the sweep, the reports and the command line.

A block's gain depends on how the question reaches the model (on SmolLM2 the best zero-shot block
loses few-shot: the solved examples in the prompt do much of what the duplicated block does), so
every claim names its regime:
- zero-shot: the question alone, "Question: ..." then "Answer:";
- few-shot: solved examples first (the probe suite's shots), or, for calibration texts, the texts as
  written: worked problems in running prose, whose numbers are read with the reasoning before them.
"""
from __future__ import annotations

from cp_onnx.errors import CpOnnxError

ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"
REGIMES = (ZERO_SHOT, FEW_SHOT)  # the order rows, reports and tables list them in
SHORT = {"zero": ZERO_SHOT, "few": FEW_SHOT}  # as the command line spells them
SPELLINGS = (*SHORT, *REGIMES)


def parse_regimes(text: str) -> tuple[str, ...]:
    """``"zero,few"`` (short or full names, any order) to regimes in REGIMES order; CpOnnxError for anything else."""
    names = [SHORT.get(part.strip(), part.strip()) for part in str(text).split(",") if part.strip()]
    unknown = [n for n in names if n not in REGIMES]
    if unknown or not names:
        raise CpOnnxError(f"unknown regimes {text!r}; give zero, few or zero,few")
    return tuple(r for r in REGIMES if r in names)


def short(regime: str) -> str:
    """The command line's name of a regime: "zero" or "few"."""
    return next(flag for flag, name in SHORT.items() if name == regime)
