"""What `cp-onnx analyze` and `cp-onnx report` print: the decision first, then the ranked blocks, with depth."""
from __future__ import annotations

import textwrap

from cp_onnx.outputs import pruning_report
from cp_onnx.outputs.decision import decision_lines, gain_per, greedy_line, kind_table, kinds_line, label, predictions, span, unit_word

# Paper's circuit kinds, the method that predicts each, and where the paper says they sit.
KIND_METHODS = (("stability", "stability", "early, ~10-25% depth"), ("magnitude", "anomaly", "late, ~85-100% depth"))


def depth(block: dict, num_layers: int) -> str:
    return f"{100 * block['start'] / num_layers:3.0f}-{100 * block['end'] / num_layers:3.0f}%"


def format_summary(report: dict, top: int = 5) -> str:
    """The decisions first (one per prompting regime), what the model itself answers, then the ranked blocks."""
    n = report["model"]["num_layers"]
    calibration = report.get("calibration") or {}
    found = predictions(report)
    lines = [_wrap(line) for line in decision_lines(report)] + [""]
    for regime, prediction in found.items():
        for extra in (greedy_line(prediction, regime), kinds_line(prediction, regime)):
            if extra:
                lines += [_wrap(extra), ""]
    asked = f" and {calibration['questions']} calibration questions" if calibration.get("questions") else ""
    lines += [f"{report['model']['name']}: {n} layers, {calibration.get('n', '?')} calibration texts ({calibration.get('tokens', '?')} tokens){asked}",
              *regime_lines(found), RANKINGS_NOTE]
    for regime, prediction in found.items():
        lines += candidate_lines(prediction, regime, n)
        lines += kind_table_lines(prediction, regime)
    for kind, method, where in KIND_METHODS:
        blocks = report["methods"].get(method, {}).get("blocks")
        if not blocks:
            continue
        lines.append(f"\n{kind} circuits ranked (method {method}; the paper expects them {where})")
        lines.append(f"  {'rank':>4}  {'block':>9}  {'depth':>9}  {'score':>8}")
        for rank, block in enumerate(blocks[:top], 1):
            score = "n/a" if block["score"] is None else f"{block['score']:8.3f}"
            lines.append(f"  {rank:>4}  {span(block):>9}  {depth(block, n):>9}  {score:>8}")
    shown = {method for _, method, _ in KIND_METHODS} | {p.get("method") for p in found.values()}  # the candidates cover its method
    others = [m for m in report["methods"] if m not in shown]
    for method in others:
        best = report["methods"][method]["blocks"][:1]
        if best:
            lines.append(f"\n{method}: first-ranked block {span(best[0])} ({depth(best[0], n)}), score {best[0]['score']:.3f}")
    lines += pruning_report.summary_lines(report)
    if "languages" in report:
        lines.append("\nlanguage check (top-1 per language)")
        for method, spread in report["languages"]["spread"].items():
            tops = ", ".join(f"{lang} [{s}, {e})" for lang, (s, e) in spread["top1"].items())
            lines.append(f"  {method:>10}: {tops}; start spread {spread['start_range']}, end spread {spread['end_range']}")
    return "\n".join(lines)


WIDTH = 100


def _wrap(line: str) -> str:
    return textwrap.fill(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False)
RANKINGS_NOTE = "the rankings below order blocks by each method's score; they are not recommendations (the decision above is)"


def regime_lines(found: dict[str, dict]) -> list[str]:
    """What each decision is for (the prompting), how many units it rests on (a race may stop early), and its work."""
    lines = []
    for regime, prediction in found.items():
        race = prediction.get("race") if isinstance(prediction.get("race"), dict) else {}
        used, of = race.get("units_used"), race.get("units")
        facts = [f"decided on {used} of {of} {unit_word(prediction)}s"] if isinstance(used, int) and isinstance(of, int) else []
        work = prediction.get("work") if isinstance(prediction.get("work"), dict) else {}
        if isinstance(work.get("layer_tokens"), int) and work.get("exhaustive_layer_tokens"):
            facts.append(f"{work['layer_tokens'] / work['exhaustive_layer_tokens']:.0%} of the exhaustive computation's work")
        lines.append(f"{prediction.get('prompting') or label(regime)}: {', '.join(facts)}" if facts else prediction.get("prompting") or label(regime))
    return lines


def candidate_lines(prediction: dict, regime: str, num_layers: int) -> list[str]:
    """One regime's best candidates with the figures behind its decision (none for a prediction without them)."""
    candidates = prediction.get("candidates") or []
    if not candidates:
        return []
    lines = [f"\n{prediction.get('method') or 'duplication_loss'} ranked, {label(regime)} (gain: answer log-probability, nats per "
             f"{gain_per(prediction)}; greedy: change in points; cost: NLL change, nats per token)",
             f"  {'rank':>4}  {'block':>9}  {'depth':>9}  {'gain':>8}  {'lower':>8}  {'greedy':>7}  {'all tokens':>10}  {'general':>8}"]
    for rank, block in enumerate(candidates, 1):
        metrics = block.get("metrics") or {}
        cells = [block["score"], metrics.get("gain_lower_bound"), metrics.get("text_nll_change"), metrics.get("general_nll_change")]
        gain, lower, text, general = ("n/a" if v is None else f"{v:+.4f}" for v in cells)
        greedy = "n/a" if metrics.get("greedy_change") is None else f"{100 * metrics['greedy_change']:+.1f}"
        lines.append(f"  {rank:>4}  {span(block):>9}  {depth(block, num_layers):>9}  {gain:>8}  {lower:>8}  {greedy:>7}  {text:>10}  {general:>8}")
    return lines


def kind_table_lines(prediction: dict, regime: str) -> list[str]:
    """The candidates' gain per kind of calibration unit and verdict; none without per-kind figures."""
    blocks, names = kind_table(prediction)
    if not blocks:
        return []
    width = max(len(name) for name in names)
    word = unit_word(prediction)
    lines = [f"\nper kind, {label(regime)} (gain per {gain_per(prediction)}; helps/hurts where the simultaneous bounds say so)",
             f"  {'kind':<{width}}  {word + 's':>9}" + "".join(f"  {span(b):>17}" for b in blocks)]
    for name in names:
        gains = [b["by_kind"].get(name) or {} for b in blocks]
        cells = ["n/a" if g.get("gain") is None else f"{g['gain']:+.4f} {g.get('verdict', '')}" for g in gains]
        lines.append(f"  {name:<{width}}  {gains[0].get('texts', '?'):>9}" + "".join(f"  {cell:>17}" for cell in cells))
    return lines


def print_summary(report: dict, top: int = 5) -> None:
    print(format_summary(report, top))
