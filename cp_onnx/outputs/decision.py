"""The answer every output shows first: the default prediction's decision for each prompting regime, one line each.

One module writes them, so the summary, the text report, the ONNX metadata and the HTML page cannot
disagree; examples/cpp/main.cpp rebuilds the same lines from report.json, branch for branch, so keep
the two in step (tests/test_cpp_example.py compares them). A report trimmed by hand loses only the parts
whose fields are missing: readers must not fail on it. Each line names its regime, because a block's gain
depends on how the question is asked.
"""
from __future__ import annotations

from cp_onnx.regimes import REGIMES

# Analyses where the default method was skipped (texts without numbers) or not asked for.
NO_PREDICTION = ("decision: none: this report holds no default prediction (duplication_loss was skipped or not run), "
                 "so no block is recommended; its rankings are not recommendations")
LABELS = {"zero_shot": "zero-shot", "few_shot": "few-shot"}


def predictions(report: dict) -> dict[str, dict]:
    """The report's predictions in REGIMES order (those that are well-formed dictionaries)."""
    found = report.get("predictions") if isinstance(report.get("predictions"), dict) else {}
    return {regime: found[regime] for regime in REGIMES if isinstance(found.get(regime), dict)}


def label(regime: str) -> str:
    return LABELS.get(regime, str(regime))


def span(block: dict) -> str:
    return f"[{block['start']}, {block['end']})"


def layers_run_twice(block: dict) -> str:
    first, last = block["start"], block["end"] - 1
    return f"layer {first} run twice" if first == last else f"layers {first} to {last} run twice"


def helps(prediction: dict) -> bool:
    return prediction.get("decision") == "help" and isinstance(prediction.get("block"), dict)


def gain_per(prediction: dict) -> str:
    """What the gain is averaged over: "question" (zero-shot) or "digit token" (few-shot)."""
    return prediction.get("gain_per") or "digit token"


def figures(prediction: dict) -> str | None:
    """Gain, lower bound and general-text cost of the first candidate; None when the report lacks them."""
    candidates = prediction.get("candidates") or []
    gain, lower = prediction.get("predicted_gain"), prediction.get("gain_lower_bound")
    if not candidates or gain is None or lower is None:
        return None
    cost = (candidates[0].get("metrics") or {}).get("general_nll_change")
    level = f"lower {prediction['confidence']:.0%} bound" if prediction.get("confidence") is not None else "lower bound"
    return (f"gain {gain:+.4f} nats per {gain_per(prediction)} ({level} {lower:+.4f}), "
            f"cost on general text {'n/a' if cost is None else f'{cost:+.4f}'} nats per token")


def scope(prediction: dict) -> str:
    """Which metric the figures hold for, and the method that measured them."""
    measured = f"metric {prediction['metric']}" if prediction.get("metric") else "metric not recorded"
    return f"{measured}, method {prediction.get('method') or 'duplication_loss'}"


def decision_lines(report: dict) -> list[str]:
    """One line per regime's decision, in REGIMES order; NO_PREDICTION alone when the report has none."""
    found = predictions(report)
    return [decision_line(prediction, regime) for regime, prediction in found.items()] or [NO_PREDICTION]


def decision_line(prediction: dict, regime: str) -> str:
    """One regime's decision as one line: the block to duplicate with its gain and cost, or that none is predicted to help.

    Line breaks inside a hand-edited report's strings become spaces: readers take each line for the whole answer."""
    return _decision(prediction, regime).replace("\r", " ").replace("\n", " ")


def _decision(prediction: dict, regime: str) -> str:
    measured = figures(prediction)
    if helps(prediction):
        block = prediction["block"]
        head = f"{label(regime)} decision: duplicate {span(block)} ({layers_run_twice(block)})"
        return "; ".join([head, *([measured] if measured else []), scope(prediction)])
    head = f"{label(regime)} decision: no block is predicted to help"
    if prediction.get("reason"):
        head += f" ({prediction['reason']})"
    parts = [head]
    if prediction.get("candidates"):
        parts.append("least harmful " + ", ".join(span(b) for b in prediction["candidates"]))
    if measured:
        parts.append(f"top {measured}")
    return "; ".join([*parts, scope(prediction)])


def greedy_line(prediction: dict, regime: str) -> str | None:
    """How often the model's own greedy continuation is the calibration texts' answer, without and with the first
    candidate, and the change's bound (or that the calibration set cannot bound it).

    A second metric beside the decision's log-probability: a block can make an answer likelier without making
    it the model's first choice. None for a report without the figures."""
    greedy = prediction.get("greedy")
    candidates = prediction.get("candidates") or []
    if not isinstance(greedy, dict) or not candidates or not all(_number(greedy.get(k)) for k in ("base", "change")):
        return None
    base, change = greedy["base"], greedy["change"]
    texts = prediction.get("texts") if isinstance(prediction.get("texts"), dict) else {}
    unit = gain_per(prediction)
    total = texts.get("questions") if unit == "question" else texts.get("digit_tokens")
    total = total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else None
    role = "the block to duplicate" if helps(prediction) else "the least harmful block"
    if total:
        count = lambda share: f"{round(share * total)} of {total} ({share:.0%})"  # noqa: E731
        said = f"right on {count(base)} {unit}s; with {span(candidates[0])} ({role}) duplicated {count(base + change)}"
    else:
        said = f"right on {base:.0%} of the {unit}s; with {span(candidates[0])} ({role}) duplicated {base + change:.0%}"
    if _number(greedy.get("lower")) and _number(greedy.get("upper")):
        level = f"{greedy['confidence']:.0%} " if _number(greedy.get("confidence")) else ""
        bound = f" [{level}bounds {100 * greedy['lower']:+.1f}, {100 * greedy['upper']:+.1f}]"
    else:
        changed = greedy.get("changed_units")
        bound = f" (the calibration set cannot bound it: {'only ' + str(changed) if _number(changed) else 'too few'} {unit_word(prediction)}s changed)"
    return f"{label(regime)} greedy (the model's own answer): {said}, {100 * change:+.1f} points{bound}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kinds_line(prediction: dict, regime: str) -> str | None:
    """The first candidate per kind of calibration text, in one line: where it helps, hurts, or the bound cannot tell.

    None for a prediction without per-kind figures. It follows its decision line (whose metric and regime it shares)."""
    blocks, _ = kind_table(prediction)
    if not blocks:
        return None
    kinds = prediction["kinds"]
    first, least = blocks[0], kinds.get("min_texts")
    word = unit_word(prediction)
    # Kinds with too few texts are unclear too, but for want of texts, not because the bounds straddle zero: said apart, briefly.
    verdicts: dict[str, list[str]] = {"helps": [], "hurts": [], "unclear": [], FEW: []}
    for kind, gain in first["by_kind"].items():
        if _too_few(gain, least):
            verdicts[FEW].append(f"{kind} " + ("(none)" if gain.get("gain") is None else f"{gain['gain']:+.3f} ({_count(gain.get('with_numbers') or 0, word)})"))
        else:
            verdicts.setdefault(gain.get("verdict") or "unclear", []).append(f"{kind} {kind_figure(gain, least, word)}")
    role = "the block to duplicate" if helps(prediction) else "the least harmful block"
    level = f"{kinds['confidence']:.0%} " if kinds.get("confidence") is not None else ""
    said = "; ".join(f"{verdict} for {', '.join(items)}" for verdict, items in verdicts.items() if items and verdict != FEW)
    if verdicts[FEW]:
        needed = f" ({least} needed)" if least is not None else ""
        said += ("; " if said else "") + f"too few {word}s to tell{needed} for {', '.join(verdicts[FEW])}"
    line = (f"{label(regime)} per kind of calibration text, {span(first)} ({role}): {said}; gain per {gain_per(prediction)} "
            f"[{level}bounds holding for all blocks and kinds at once]")
    return line.replace("\r", " ").replace("\n", " ")


FEW = "too few"


def kind_table(prediction: dict) -> tuple[list[dict], list[str]]:
    """The candidates that carry per-kind figures, and the kinds they cover in order; ([], []) for a prediction without them."""
    kinds = prediction.get("kinds") if isinstance(prediction, dict) else None
    blocks = [b for b in (kinds.get("blocks") or [] if isinstance(kinds, dict) else []) if isinstance(b, dict) and b.get("by_kind")]
    return blocks, list(dict.fromkeys(kind for b in blocks for kind in b["by_kind"]))


def _too_few(gain: dict, min_texts: int | None) -> bool:
    return gain.get("gain") is None or (min_texts is not None and (gain.get("with_numbers") or 0) < min_texts)


def unit_word(prediction: dict) -> str:
    """What the units of a prediction are: "question" (zero-shot) or "text" (few-shot: texts holding numbers)."""
    return "question" if gain_per(prediction) == "question" else "text"


def kind_figure(gain: dict, min_texts: int | None, word: str = "text") -> str:
    """One block's gain on one kind of text, as the kinds line and tables show it."""
    texts = gain.get("texts")
    counted = _count(texts, word) if texts is not None else f"{word}s not recorded"
    if gain.get("gain") is None:
        return f"(nothing scored in its {counted})"
    if _too_few(gain, min_texts):
        return f"{gain['gain']:+.3f} (only {_count(gain.get('with_numbers') or 0, word)} scored, {min_texts} needed)"
    if gain.get("lower") is None or gain.get("upper") is None:
        return f"{gain['gain']:+.3f} ({counted})"
    return f"{gain['gain']:+.3f} [{gain['lower']:+.3f}, {gain['upper']:+.3f}] ({counted})"


def _count(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
