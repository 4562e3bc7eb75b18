"""`cp-onnx report --html`: one self-contained page (inline CSS, plots as PNG data URIs) with tables and plots."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from cp_onnx.files import write_text
from cp_onnx.groundtruth.sweep import regime_rows, regimes_of
from cp_onnx.outputs import plots, pruning_report
from cp_onnx.outputs.decision import (decision_lines, gain_per, greedy_line, helps, kind_figure, kind_table, kinds_line, label, layers_run_twice,
                                      predictions, scope as scope_text, span, unit_word)
from cp_onnx.outputs.embed import DEFAULT_TOP, top_circuits
from cp_onnx.outputs.summary import KIND_METHODS

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th { background: #f3f4f6; }
td.name, th.name { text-align: left; } tr.top1 td { background: #eef6ff; font-weight: 600; }
tr.in-block td { background: #fff7e0; } figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } caption { text-align: left; color: #555; }
#decision { border: 2px solid #1d4ed8; border-radius: 6px; padding: 0.2em 1.2em 0.8em; margin: 1em 0 2em; background: #f5f8ff; }
#decision h2 { margin-top: 0.6em; } .answer { font-size: 1.3em; font-weight: 600; } dt { font-weight: 600; float: left; width: 13em; }
.line code { font-size: 0.85em; color: #444; white-space: pre-wrap; } .note { color: #555; }
"""
KIND_OF_METHOD = {method: f"{kind} circuits, {where}" for kind, method, where in KIND_METHODS} | {
    "duplication_loss": "the default method: gain on the calibration digits; the decision judges its first block"}


def render(report: dict, *, top: int = DEFAULT_TOP, sweep_rows: list[dict] | None = None, sweep_header: dict | None = None) -> str:
    """The page as one HTML string; with sweep rows (and their header, to check the model), a validation table and heatmap."""
    model, calibration = report["model"], report.get("calibration") or {}
    title = f"cp-onnx report: {model['name']}"
    parts = [
        f"<h1>{_e(title)}</h1>", _decision_panel(report),
        f"<p class='meta'>{_e(model.get('family', '?'))}, {model['num_layers']} layers; "
        f"{calibration.get('n', '?')} calibration texts ({calibration.get('tokens', '?')} tokens, {_e(calibration.get('source', '?'))}, "
        f"{_e(calibration.get('language', '?'))}); onnx sha256 {_e(str(model.get('onnx_sha256', '?'))[:16])}&hellip;; "
        f"cp-onnx {_e((report.get('versions') or {}).get('cp_onnx', '?'))}</p>",
        "<h2>Rankings by method</h2>",
        "<p class='note'>Each method's blocks in the order of its own score: rankings, not recommendations. "
        "The decision above is the recommendation; a first-ranked block is not predicted to help unless it says so.</p>",
        _circuits_table(report, top),
    ]
    if pruning_report.html_rows(report):
        parts += ["<h2>Pruning candidates</h2>", _pruning_table(report)]
    regimes = regimes_of(sweep_rows or [])
    if sweep_header is not None and regimes:
        from cp_onnx.groundtruth.validate import check_same_model

        check_same_model(report, sweep_header)
    for regime in regimes:  # judged apart: solved examples in the prompt change which block helps
        flat, name = regime_rows(sweep_rows, regime), _e(regime.replace("_", "-"))
        if plots.is_removal_sweep(flat):
            parts += [f"<h2>Removals against the sweep ({name})</h2>", _removal_table(report, flat, regime)]
        else:
            parts += [f"<h2>Against the sweep ({name})</h2>", _validation_table(report, flat, regime)]
    parts += ["<h2>Per-layer statistics</h2>", _layers_table(report), "<h2>Plots</h2>",
              _image(plots.png_bytes(plots.layer_profile(report)), "Per-layer statistics; each method's first-ranked block shaded (a ranking, not a recommendation).")]
    heads = plots.head_matrix(report)
    if heads is not None:
        column = plots.head_column(report)
        parts.append(_image(plots.png_bytes(plots.head_heatmap(heads, f"head influence ({column})")), f"Head influence, layers by heads ({column})."))
    for regime in regimes:
        flat = regime_rows(sweep_rows, regime)
        what = "removed" if plots.is_removal_sweep(flat) else "duplicated"
        parts.append(_image(plots.sweep_heatmap_png(flat, report, regime), f"Sweep ({regime.replace('_', '-')}): answer log-probability gain of every "
                            f"{what} block [start, end); markers: each method's top-1, star: best."))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_html(report: dict, out: str | Path, *, top: int = DEFAULT_TOP, sweep_rows: list[dict] | None = None,
               sweep_header: dict | None = None) -> Path:
    """Render and write the page atomically."""

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, render(report, top=top, sweep_rows=sweep_rows, sweep_header=sweep_header))
    return out


def _decision_panel(report: dict) -> str:
    """The answers, before anything else: one per prompting regime, the block to duplicate with its gain, bound and
    cost, or why none and the least harmful blocks; the one-line form below each is the line `report --text` and the
    model metadata carry."""
    found = predictions(report)
    if not found:
        line = f"<p class='line'><code>{_e(decision_lines(report)[0])}</code></p>"
        return f"<section id='decision'><h2>Decision</h2><p class='answer'>No prediction in this report.</p>{line}</section>"
    parts = [_regime_decision(prediction, regime, line) for (regime, prediction), line in zip(found.items(), decision_lines(report))]
    return "<section id='decision'><h2>Decisions</h2>" + "".join(parts) + "</section>"


def _regime_decision(prediction: dict, regime: str, line: str) -> str:
    candidates = prediction.get("candidates") or []
    level = f"lower {prediction['confidence']:.0%} bound" if prediction.get("confidence") is not None else "lower bound"
    why = f"<p>Why: {_e(prediction['reason'])}.</p>" if prediction.get("reason") else ""
    if helps(prediction):
        block = prediction["block"]
        answer = f"Duplicate block {span(block)} ({layers_run_twice(block)})."
        metrics = (candidates[0].get("metrics") or {}) if candidates else {}
        facts = [("expected gain", f"{_signed(prediction.get('predicted_gain'))} nats per {gain_per(prediction)}"),
                 (level, f"{_signed(prediction.get('gain_lower_bound'))} nats per {gain_per(prediction)}"),
                 ("cost on general text", f"{_signed(metrics.get('general_nll_change'))} nats per token (NLL change)")]
        details = "<dl>" + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts) + "</dl>" + why
    else:
        answer = "No block is predicted to help."
        rows = "".join(f"<tr><td>{_e(span(b))}</td><td>{_signed(b.get('score'))}</td><td>{_signed((b.get('metrics') or {}).get('gain_lower_bound'))}</td>"
                       f"<td>{_signed((b.get('metrics') or {}).get('general_nll_change'))}</td></tr>" for b in candidates)
        details = why + (f"<table class='least-harmful'><caption>Least harmful blocks</caption><tr><th>block</th><th>gain</th>"
                         f"<th>{level}</th><th>general-text cost</th></tr>{rows}</table>" if rows else "")
    greedy = f"<p class='greedy'>{_e(said)}.</p>" if (said := greedy_line(prediction, regime)) else ""
    scope = f"<p class='scope'>{_e(scope_text(prediction))}; gains in nats per {_e(gain_per(prediction))}, costs as NLL change in nats per token.</p>"
    return (f"<div class='regime' id='decision-{_e(regime)}'><h3>{_e(label(regime).capitalize())}</h3><p class='answer'>{_e(answer)}</p>{details}"
            f"{greedy}{_kinds_part(prediction, regime)}{scope}<p class='line'><code>{_e(line)}</code></p></div>")


def _kinds_part(prediction: dict, regime: str) -> str:
    """Per kind of calibration unit: the kinds line, then the candidates' gain and verdict per kind."""
    said = kinds_line(prediction, regime)
    if said is None:
        return ""
    least = prediction["kinds"].get("min_texts")
    word = unit_word(prediction)
    blocks, names = kind_table(prediction)
    head = f"<tr><th class='name'>kind of {word}</th>" + "".join(f"<th>{_e(span(b))}</th>" for b in blocks) + "</tr>"
    rows = "".join(f"<tr><td class='name'>{_e(name)}</td>" + "".join(
        f"<td>{_e((g := b['by_kind'].get(name) or {}).get('verdict', ''))} {_e(kind_figure(g, least, word) if g else 'n/a')}</td>"
        for b in blocks) + "</tr>" for name in names)
    caption = f"<caption>Gain per kind of calibration {word} (nats per {_e(gain_per(prediction))}; bounds hold for all blocks and kinds at once)</caption>"
    return f"<p class='kinds'>{_e(said)}</p><table class='by-kind'>{caption}{head}{rows}</table>"


def _circuits_table(report: dict, top: int) -> str:
    n = report["model"]["num_layers"]
    rows = []
    for method, blocks in top_circuits(report, top).items():
        for rank, b in enumerate(blocks, 1):
            label = f"<td class='name' rowspan='{len(blocks)}'><b>{_e(method)}</b><br><small>{_e(KIND_OF_METHOD.get(method, ''))}</small></td>" if rank == 1 else ""
            rows.append(f"<tr>{label}<td>{rank}</td><td>[{b['start']}, {b['end']})</td><td>{b['start']}&ndash;{b['end'] - 1}</td>"
                        f"<td>{100 * b['start'] / n:.0f}&ndash;{100 * b['end'] / n:.0f}%</td><td>{_num(b['score'])}</td></tr>")
    head = "<tr><th class='name'>method</th><th>rank</th><th>block</th><th>layers</th><th>depth</th><th>score</th></tr>"
    caption = "<caption>Rankings (not recommendations): each method's highest-scoring blocks</caption>"
    return f"<table id='top-circuits'>{caption}{head}{''.join(rows)}</table>"


def _layers_table(report: dict) -> str:
    rows = report["layers"]
    names = [k for k in rows[0] if k != "layer"]
    first = plots.top_blocks(report)
    head = "<tr><th>layer</th>" + "".join(f"<th>{_e(k.replace('_', ' '))}</th>" for k in names) + "<th class='name'>in first-ranked block of</th></tr>"
    body = []
    for row in rows:
        inside = [m for m, (s, e) in first.items() if s <= row["layer"] < e]
        cls = " class='in-block'" if inside else ""
        body.append(f"<tr{cls}><td>{row['layer']}</td>" + "".join(f"<td>{_num(row.get(k))}</td>" for k in names)
                    + f"<td class='name'>{_e(', '.join(inside))}</td></tr>")
    return f"<table id='layer-statistics'>{head}{''.join(body)}</table>"


def _validation_table(report: dict, sweep_rows: list[dict], regime: str) -> str:
    """Per method and metric: its top-1 block's gain over the baseline next to the sweep's best block (rows of one regime)."""
    from cp_onnx.groundtruth.validate import validate

    result = validate(report, sweep_rows)
    head = "<tr><th class='name'>method</th><th class='name'>metric</th><th>top-1</th><th>top-1 gain</th><th>general-text cost</th><th>best block</th><th>best gain</th><th>best's rank</th></tr>"
    rows = []
    for method, by_metric in result["methods"].items():
        for metric, judged in by_metric.items():
            top1, best = judged["top1"] or {}, result["best"].get(metric) or {}
            rows.append(f"<tr><td class='name'>{_e(method)}</td><td class='name'>{_e(metric)}</td><td>{_span(top1)}</td>"
                        f"<td>{_num(top1.get('gain'))}</td><td>{_num(top1.get('general_cost'))}</td><td>{_span(best)}</td>"
                        f"<td>{_num(best.get('gain'))}</td><td>{judged['best_rank'] or '&ndash;'}</td></tr>")
    return f"<table id='validation-{_e(regime)}'>{head}{''.join(rows)}</table>"


def _pruning_table(report: dict) -> str:
    """Per layer method, the layers it would remove for n = 1, 2, ...; then the cheapest heads, when the report has them."""
    rows = pruning_report.html_rows(report)
    head = "<tr><th class='name'>method</th>" + "".join(f"<th>remove {n}</th>" for n in range(1, len(rows[0]))) + "</tr>"
    body = "".join("<tr><td class='name'>" + _e(row[0]) + "</td>" + "".join(f"<td>{_e(cell)}</td>" for cell in row[1:]) + "</tr>" for row in rows)
    heads = ((report.get("pruning") or {}).get("heads") or {}).get("methods") or {}
    cheapest = "".join(f"<p>cheapest heads ({_e(m)}): " + ", ".join(f"L{h['layer']}.H{h['head']} ({_num(h['score'])})" for h in d["cheapest"][:DEFAULT_TOP]) + "</p>"
                       for m, d in heads.items())
    return f"<table id='pruning'>{head}{body}</table>{cheapest}"


def _removal_table(report: dict, sweep_rows: list[dict], regime: str) -> str:
    """Per removal size: the least harmful block the sweep found, and each method's choice and its cost beside it (one regime)."""
    from cp_onnx.groundtruth.validate import validate_removals

    result = validate_removals((report.get("pruning") or {}).get("layers"), sweep_rows)
    head = "<tr><th>layers</th><th class='name'>method</th><th class='name'>removes</th><th>answer log-prob change</th><th>general NLL change</th><th>least harmful</th><th>its change</th></tr>"
    rows = []
    for n, entry in result["sizes"].items():
        best = entry["best"].get("answer_logprob") or {}
        for method, judged in entry["methods"].items():
            choice = judged["answer_logprob"]["choice"]
            rows.append(f"<tr><td>{n}</td><td class='name'>{_e(method)}</td><td class='name'>{_e(choice['layers'])}</td><td>{_num(choice['gain'])}</td>"
                        f"<td>{_num(choice['general_cost'])}</td><td>{_span(best)}</td><td>{_num(best.get('gain'))}</td></tr>")
    return f"<table id='removals-{_e(regime)}'>{head}{''.join(rows)}</table>"


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'><figcaption>{_e(caption)}</figcaption></figure>"


def _span(block: dict) -> str:
    return f"[{block['start']}, {block['end']})" if block.get("start") is not None else "&ndash;"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
