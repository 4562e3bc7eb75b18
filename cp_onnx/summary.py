"""The ranked table `cp-onnx analyze` prints: predicted circuits of both kinds, with depth."""
from __future__ import annotations

from cp_onnx import pruning_report

# Paper's circuit kinds, the method that predicts each, and where the paper says they sit.
KIND_METHODS = (("stability", "stability", "early, ~10-25% depth"), ("magnitude", "anomaly", "late, ~85-100% depth"))


def depth(block: dict, num_layers: int) -> str:
    return f"{100 * block['start'] / num_layers:3.0f}-{100 * block['end'] / num_layers:3.0f}%"


def format_summary(report: dict, top: int = 5) -> str:
    """Text table of the top blocks of each circuit kind found in a report."""
    n = report["model"]["num_layers"]
    calibration = report.get("calibration") or {}
    lines = [f"{report['model']['name']}: {n} layers, {calibration.get('n', '?')} calibration texts ({calibration.get('tokens', '?')} tokens)"]
    if report.get("prediction"):
        lines.append(format_prediction(report["prediction"]))
    for kind, method, where in KIND_METHODS:
        blocks = report["methods"].get(method, {}).get("blocks")
        if not blocks:
            continue
        lines.append(f"\n{kind} circuits (method {method}; the paper expects them {where})")
        lines.append(f"  {'rank':>4}  {'block':>9}  {'depth':>9}  {'score':>8}")
        for rank, block in enumerate(blocks[:top], 1):
            span = f"[{block['start']}, {block['end']})"
            score = "n/a" if block["score"] is None else f"{block['score']:8.3f}"
            lines.append(f"  {rank:>4}  {span:>9}  {depth(block, n):>9}  {score:>8}")
    shown = {method for _, method, _ in KIND_METHODS} | {(report.get("prediction") or {}).get("method")}  # the prediction line covers its method
    others = [m for m in report["methods"] if m not in shown]
    for method in others:
        best = report["methods"][method]["blocks"][:1]
        if best:
            lines.append(f"\n{method}: top block [{best[0]['start']}, {best[0]['end']}) ({depth(best[0], n)}), score {best[0]['score']:.3f}")
    lines += pruning_report.summary_lines(report)
    if "languages" in report:
        lines.append("\nlanguage check (top-1 per language)")
        for method, spread in report["languages"]["spread"].items():
            tops = ", ".join(f"{lang} [{s}, {e})" for lang, (s, e) in spread["top1"].items())
            lines.append(f"  {method:>10}: {tops}; start spread {spread['start_range']}, end spread {spread['end_range']}")
    return "\n".join(lines)


def format_prediction(prediction: dict) -> str:
    """The default method's decision in one line, with the figures behind it (a report trimmed by hand may lack them)."""
    if not prediction.get("candidates") or prediction.get("predicted_gain") is None or prediction.get("gain_lower_bound") is None:
        from cp_onnx.embed import decision_text

        return f"\nprediction ({prediction.get('method', 'duplication_loss')}): {decision_text(prediction)}"
    top = prediction["candidates"][0]
    costs = {key: "n/a" if top["metrics"].get(key) is None else f"{-top['metrics'][key]:+.4f}" for key in ("text_nll_change", "general_nll_change")}
    figures = (f"gain on the numbers of the reasoning texts {prediction['predicted_gain']:+.4f} nats/token (lower {prediction.get('confidence', 0.95):.0%} "
               f"bound {prediction['gain_lower_bound']:+.4f}); all their tokens {costs['text_nll_change']}, general text {costs['general_nll_change']}")
    if prediction["decision"] == "help":
        return f"\nprediction ({prediction.get('method', 'duplication_loss')}): duplicate [{top['start']}, {top['end']}): {figures}"
    others = ", ".join(f"[{b['start']}, {b['end']})" for b in prediction["candidates"])
    why = f" ({prediction['reason']})" if prediction.get("reason") else ""
    return f"\nprediction ({prediction.get('method', 'duplication_loss')}): no block is predicted to help{why}; least harmful {others}; top: {figures}"


def print_summary(report: dict, top: int = 5) -> None:
    print(format_summary(report, top))
