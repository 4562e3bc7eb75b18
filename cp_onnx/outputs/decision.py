"""The answer every output shows first: the default prediction's decision, in one line.

One function writes it, so the summary, the text report, the ONNX metadata and the HTML page cannot
disagree; examples/cpp/main.cpp rebuilds the same line from report.json, branch for branch, so keep
the two in step (tests/test_cpp_example.py compares them). A report trimmed by hand, or written
before a field existed, loses only the parts whose fields are missing: readers must not fail on it.
"""
from __future__ import annotations

# Older reports, and analyses where the default method was skipped (texts without numbers) or not asked for.
NO_PREDICTION = ("decision: none: this report holds no default prediction (an older report, or duplication_loss was "
                 "skipped or not run), so no block is recommended; its rankings are not recommendations")


def span(block: dict) -> str:
    return f"[{block['start']}, {block['end']})"


def layers_run_twice(block: dict) -> str:
    first, last = block["start"], block["end"] - 1
    return f"layer {first} run twice" if first == last else f"layers {first} to {last} run twice"


def helps(prediction: dict) -> bool:
    return prediction.get("decision") == "help" and isinstance(prediction.get("block"), dict)


def figures(prediction: dict) -> str | None:
    """Gain, lower bound and general-text cost of the top candidate; None when the report lacks them."""
    candidates = prediction.get("candidates") or []
    gain, lower = prediction.get("predicted_gain"), prediction.get("gain_lower_bound")
    if not candidates or gain is None or lower is None:
        return None
    cost = (candidates[0].get("metrics") or {}).get("general_nll_change")
    level = f"lower {prediction['confidence']:.0%} bound" if prediction.get("confidence") is not None else "lower bound"
    return (f"gain {gain:+.4f} nats per digit token ({level} {lower:+.4f}), "
            f"cost on general text {'n/a' if cost is None else f'{cost:+.4f}'} nats per token")


def scope(prediction: dict) -> str:
    """Which metric and prompting regime the figures hold for, and the method that measured them."""
    if prediction.get("metric") and prediction.get("regime"):
        measured = f"metric {prediction['metric']}, regime {prediction['regime']}"
    else:
        measured = "metric and regime not recorded (an older report)"
    return f"{measured}, method {prediction.get('method') or 'duplication_loss'}"


def decision_line(report: dict) -> str:
    """The decision as one line: the block to duplicate with its gain and cost, or that none is predicted to help.

    Line breaks inside a hand-edited report's strings become spaces: readers take the first line for the whole answer."""
    return _decision(report).replace("\r", " ").replace("\n", " ")


def _decision(report: dict) -> str:
    prediction = report.get("prediction")
    if not isinstance(prediction, dict):
        return NO_PREDICTION
    measured = figures(prediction)
    if helps(prediction):
        block = prediction["block"]
        head = f"decision: duplicate {span(block)} ({layers_run_twice(block)})"
        return "; ".join([head, *([measured] if measured else []), scope(prediction)])
    head = "decision: no block is predicted to help"
    if prediction.get("reason"):
        head += f" ({prediction['reason']})"
    parts = [head]
    if prediction.get("candidates"):
        parts.append("least harmful " + ", ".join(span(b) for b in prediction["candidates"]))
    if measured:
        parts.append(f"top {measured}")
    return "; ".join([*parts, scope(prediction)])
