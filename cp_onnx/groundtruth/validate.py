"""Predictions against the sweep's ground truth: does each method name the block that really helps?

A block's gain on a metric is its sweep value minus the baseline's (higher is better for every metric
here). Every comparison is made per prompting regime, method and metric, with per-kind gains and the
general-text cost beside it, never as one number alone.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from cp_onnx.errors import CpOnnxError
from cp_onnx.groundtruth.sweep import regime_rows, regimes_of
from cp_onnx.models.scoring import METRICS

TOLERANCE = 2  # "within 2 layers": start and end each off by at most this much


def validate(report: dict, sweep_rows: list[dict], *, top_k: int = 5, metrics: Sequence[str] = METRICS, sweep_header: dict | None = None,
             regime: str | None = None) -> dict:
    """Per method and metric: the sweep's best block, where the method ranks it, and what its top-1 achieves; and, for
    ``regime``, the report's decision for that regime against the sweep (``decision``).

    A method that ranks per regime (the default method's ``by_regime``) is judged on its ``regime`` ranking.
    With ``sweep_header`` (from ``sweep.read_sweep``), a report and sweep of different ONNX files are refused.
    """
    if sweep_header is not None:
        check_same_model(report, sweep_header)
    if top_k < 1:
        raise CpOnnxError(f"top_k must be at least 1, not {top_k}")
    methods = report.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise CpOnnxError("the report has no methods; give a report.json written by `cp-onnx analyze`")
    baseline, blocks = split_rows(sweep_rows)
    metrics = [m for m in metrics if baseline.get(m) is not None]  # choice accuracy is None for a suite without options
    best = {metric: best_block(baseline, blocks, metric) for metric in metrics}
    result = {
        "top_k": top_k,
        "tolerance": TOLERANCE,
        "baseline": {key: baseline.get(key) for key in (*metrics, "general_nll")},
        "best": {metric: {"start": b[0], "end": b[1], **_block_summary(baseline, blocks[b], metric)} if b else None for metric, b in best.items()},
        "methods": {},
    }
    for method, entry in methods.items():
        ranking = (entry.get("by_regime") or {}).get(regime) or entry.get("blocks", [])
        predicted = [(b["start"], b["end"]) for b in ranking]
        result["methods"][method] = {metric: _judge(predicted, baseline, blocks, best[metric], metric, top_k) for metric in metrics}
    prediction = (report.get("predictions") or {}).get(regime)
    if isinstance(prediction, dict):
        result["decision"] = judge_decision(prediction, baseline, blocks, metrics)
    return result


def judge_decision(prediction: dict, baseline: dict, blocks: dict, metrics: Sequence[str]) -> dict:
    """A regime's decision against the sweep: what its first candidate (the named block, or the least harmful) realises
    on each metric, beside the sweep's best; for "help", whether the named block really gains."""
    candidates = prediction.get("candidates") or []
    first = (candidates[0]["start"], candidates[0]["end"]) if candidates else None
    realised = {metric: gain(blocks.get(first), baseline, metric) if first else None for metric in metrics}
    return {"decision": prediction.get("decision"), "block": list(first) if first else None, "realised": realised,
            "in_sweep": first in blocks if first else False,
            "named_block_gains": None if prediction.get("decision") != "help" or realised.get("answer_logprob") is None
            else realised["answer_logprob"] > 0}


def validate_regimes(report: dict, sweep_rows: list[dict], *, top_k: int = 5, sweep_header: dict | None = None, removals: bool = False) -> dict:
    """``{"regimes": {regime: validate(...)}}`` (``validate_removals`` with ``removals``) for every regime the sweep holds.

    The regimes are judged apart: a block that helps zero-shot may be worth nothing once solved examples are shown."""
    if sweep_header is not None:
        check_same_model(report, sweep_header)
    regimes = regimes_of(sweep_rows)
    if not regimes:
        raise CpOnnxError("the sweep has no rows with metrics; run `cp-onnx sweep` first")
    if removals:
        pruning = (report.get("pruning") or {}).get("layers")
        return {"regimes": {r: validate_removals(pruning, regime_rows(sweep_rows, r), top_k=top_k) for r in regimes}}
    return {"regimes": {r: validate(report, regime_rows(sweep_rows, r), top_k=top_k, regime=r) for r in regimes}}


def check_same_model(report: dict, sweep_header: dict) -> None:
    """CpOnnxError unless the report and the sweep (its header, from ``sweep.read_sweep``) were made on the same ONNX file."""
    ours, theirs = (report.get("model") or {}).get("onnx_sha256"), (sweep_header.get("model") or {}).get("onnx_sha256")
    if ours != theirs:
        raise CpOnnxError(f"the report and the sweep were made on different models (onnx sha256 {str(ours)[:12]} vs {str(theirs)[:12]}); analyze and sweep the same model folder")


def validate_removals(pruning: dict, sweep_rows: list[dict], *, top_k: int = 5, metrics: Sequence[str] = METRICS) -> dict:
    """Pruning predictions (report["pruning"]["layers"]) against a sweep of removed blocks, per removal size and metric:
    the sweep's least harmful block, where each method ranks it, and what the method's own choice costs when it is a
    contiguous block the sweep measured (a cost is the metric's loss against the baseline: positive is worse)."""
    methods = (pruning or {}).get("methods")
    if not methods:
        raise CpOnnxError("the report has no pruning predictions; run `cp-onnx analyze --prune` first")
    baseline, blocks = split_rows(sweep_rows)
    metrics = [m for m in metrics if baseline.get(m) is not None]
    result = {"operation": "skip", "top_k": top_k, "tolerance": TOLERANCE, "baseline": {key: baseline.get(key) for key in (*metrics, "general_nll")}, "sizes": {}}
    for n in sorted({end - start for start, end in blocks}):
        sized = {b: row for b, row in blocks.items() if b[1] - b[0] == n}
        best = {metric: best_block(baseline, sized, metric) for metric in metrics}
        entry = {"best": {metric: {"start": b[0], "end": b[1], **_block_summary(baseline, sized[b], metric)} for metric, b in best.items() if b}, "methods": {}}
        for method, data in methods.items():
            ranked = [(b["start"], b["end"]) for b in data.get("blocks", []) if b["end"] - b["start"] == n]
            layers = next((c["layers"] for c in data.get("choices", []) if c["n"] == n), None)
            block = (layers[0], layers[-1] + 1) if layers and layers == list(range(layers[0], layers[-1] + 1)) else None
            judged = {}
            for metric in metrics:
                choice = {"layers": layers, **_block_summary(baseline, sized.get(block), metric)}
                judged[metric] = {**_judge(ranked, baseline, sized, best[metric], metric, top_k), "choice": choice,
                                  **_excess(choice["gain"], gain(sized.get(best[metric]), baseline, metric), baseline[metric])}
            entry["methods"][method] = judged
        result["sizes"][str(n)] = entry
    return result


def _excess(choice_gain: float | None, best_gain: float | None, base: float) -> dict:
    """How much more the choice costs than the sweep's best: as a ratio of the two costs, and as a share of the baseline's loss."""
    if choice_gain is None or best_gain is None:
        return {"cost_ratio": None, "excess_of_baseline": None}
    ratio = (-choice_gain) / (-best_gain) if best_gain < 0 else None
    return {"cost_ratio": ratio, "excess_of_baseline": (best_gain - choice_gain) / abs(base) if base else None}


def split_rows(rows: Sequence[dict]) -> tuple[dict, dict[tuple[int, int], dict]]:
    """The baseline row and the block rows by (start, end); CpOnnxError without a baseline."""
    baseline = next((r for r in rows if r.get("start") is None and r.get("end") is None), None)
    if baseline is None:
        raise CpOnnxError("the sweep has no baseline row (start and end null); run `cp-onnx sweep` again to add it")
    return baseline, {(r["start"], r["end"]): r for r in rows if r.get("start") is not None}


def gain(row: dict | None, baseline: dict, metric: str) -> float | None:
    """``row[metric] - baseline[metric]``, None where either is missing."""
    if row is None or row.get(metric) is None or baseline.get(metric) is None:
        return None
    return row[metric] - baseline[metric]


def best_block(baseline: dict, blocks: Mapping[tuple[int, int], dict], metric: str) -> tuple[int, int] | None:
    """The block with the highest gain; ties go to the smaller block, then the earlier start."""
    scored = [(g, block) for block, row in blocks.items() if (g := gain(row, baseline, metric)) is not None]
    if not scored:
        return None
    return min(scored, key=lambda s: (-s[0], s[1][1] - s[1][0], s[1][0]))[1]


def iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Intersection over union of two layer ranges [start, end)."""
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter)


def _near(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] - b[0]) <= TOLERANCE and abs(a[1] - b[1]) <= TOLERANCE


def _block_summary(baseline: dict, row: dict | None, metric: str) -> dict:
    """A block's gain, per-kind gains and general-text cost (NLL increase: positive is worse)."""
    by_kind = (row or {}).get("by_kind") or {}
    base_kinds = baseline.get("by_kind") or {}
    return {
        "gain": gain(row, baseline, metric),
        "by_kind": {kind: gain(values, base_kinds.get(kind, {}), metric) for kind, values in by_kind.items()},
        "general_cost": gain(row, baseline, "general_nll"),
    }


def _judge(predicted: list[tuple[int, int]], baseline: dict, blocks: dict, best: tuple[int, int] | None, metric: str, top_k: int) -> dict:
    top = predicted[:top_k]
    top1 = predicted[0] if predicted else None
    best_gain = gain(blocks.get(best), baseline, metric) if best else None
    top1_summary = _block_summary(baseline, blocks.get(top1), metric) if top1 else None
    top1_gain = top1_summary["gain"] if top1_summary else None
    return {
        "top1": None if top1 is None else {"start": top1[0], "end": top1[1], **top1_summary},
        "best_in_top_k": best is not None and best in top,
        "near_best_in_top_k": best is not None and any(_near(block, best) for block in top),
        "iou_top1": iou(top1, best) if top1 and best else None,
        "best_rank": predicted.index(best) + 1 if best in predicted else None,
        # Only meaningful when some block helps: a ratio to a loss would reward hurting less.
        "gain_ratio": top1_gain / best_gain if top1_gain is not None and best_gain and best_gain > 0 else None,
    }
