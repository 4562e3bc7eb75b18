"""validate: a hand-made report and sweep (6 layers), every answer worked out by hand in the comments."""
from __future__ import annotations

import sys

import pytest

from cp_onnx.errors import CpOnnxError
from cp_onnx.groundtruth.validate import best_block, iou, validate
from cp_onnx.outputs.plots import heatmap


def row(start, end, logprob, greedy, choice, nll, kinds=None):
    return {"start": start, "end": end, "answer_logprob": logprob, "greedy_accuracy": greedy, "choice_accuracy": choice,
            "general_nll": nll, "by_kind": kinds or {}}


def kinds(a, b):
    return {"a": {"answer_logprob": a}, "b": {"answer_logprob": b}}


ROWS = [
    row(None, None, -2.0, 0.5, 0.5, 3.0, kinds(-1.5, -2.5)),
    row(0, 3, -1.5, 0.5, 0.75, 3.5, kinds(-1.25, -1.75)),  # logprob +0.5, greedy 0, choice +0.25
    row(1, 4, -1.0, 0.625, 0.5, 3.0),                      # logprob +1.0 (best), greedy +0.125
    row(2, 5, -2.5, 1.0, 0.25, 3.0),                       # logprob -0.5, greedy +0.5 (best), choice -0.25
    row(3, 6, -1.75, 0.5, 1.0, 3.25, kinds(-1.0, -2.75)),  # logprob +0.25, greedy 0, choice +0.5 (best)
    row(0, 4, -1.25, 0.25, 0.5, 3.0),                      # logprob +0.75
]
REPORT = {"methods": {
    "stability": {"blocks": [{"start": 3, "end": 6}, {"start": 1, "end": 4}, {"start": 0, "end": 3}]},
    "anomaly": {"blocks": [{"start": 0, "end": 3}, {"start": 2, "end": 5}, {"start": 3, "end": 6}, {"start": 0, "end": 4}]},
}}


def test_best_blocks_and_baseline():
    result = validate(REPORT, ROWS, top_k=2)
    assert result["baseline"] == {"answer_logprob": -2.0, "greedy_accuracy": 0.5, "choice_accuracy": 0.5, "general_nll": 3.0}
    assert {m: (b["start"], b["end"], b["gain"]) for m, b in result["best"].items()} == {
        "answer_logprob": (1, 4, 1.0), "greedy_accuracy": (2, 5, 0.5), "choice_accuracy": (3, 6, 0.5)}
    assert result["best"]["choice_accuracy"]["general_cost"] == 0.25


def test_stability_method_judged_per_metric():
    judged = validate(REPORT, ROWS, top_k=2)["methods"]["stability"]
    # answer_logprob: best (1,4) is 2nd of [(3,6), (1,4)]; top-1 (3,6) gains 0.25 of the best's 1.0;
    # IoU of [3,6) and [1,4): one shared layer (3) over five (1..5).
    lp = judged["answer_logprob"]
    assert (lp["best_in_top_k"], lp["near_best_in_top_k"], lp["best_rank"]) == (True, True, 2)
    assert lp["iou_top1"] == pytest.approx(1 / 5)
    assert lp["gain_ratio"] == pytest.approx(0.25)
    # top-1 (3,6): kind a -1.0 vs -1.5, kind b -2.75 vs -2.5; general NLL 3.25 vs 3.0.
    assert lp["top1"] == {"start": 3, "end": 6, "gain": 0.25, "by_kind": {"a": 0.5, "b": -0.25}, "general_cost": 0.25}
    # greedy: best (2,5) is not predicted at all; (3,6) is within 2 layers of it; top-1 gains nothing.
    gr = judged["greedy_accuracy"]
    assert (gr["best_in_top_k"], gr["near_best_in_top_k"], gr["best_rank"], gr["gain_ratio"]) == (False, True, None, 0.0)
    assert gr["iou_top1"] == pytest.approx(2 / 4)
    # choice: top-1 is the best block.
    ch = judged["choice_accuracy"]
    assert (ch["best_in_top_k"], ch["best_rank"], ch["iou_top1"], ch["gain_ratio"]) == (True, 1, 1.0, 1.0)


def test_anomaly_method_judged_per_metric():
    judged = validate(REPORT, ROWS, top_k=2)["methods"]["anomaly"]
    # answer_logprob: top-2 [(0,3), (2,5)] misses (1,4) but (0,3) is 1 layer off at both ends; (1,4) is not listed.
    lp = judged["answer_logprob"]
    assert (lp["best_in_top_k"], lp["near_best_in_top_k"], lp["best_rank"]) == (False, True, None)
    assert lp["iou_top1"] == pytest.approx(2 / 4) and lp["gain_ratio"] == pytest.approx(0.5)
    assert lp["top1"]["by_kind"] == {"a": 0.25, "b": 0.75} and lp["top1"]["general_cost"] == 0.5
    gr = judged["greedy_accuracy"]
    assert (gr["best_in_top_k"], gr["best_rank"], gr["gain_ratio"]) == (True, 2, 0.0)
    assert gr["iou_top1"] == pytest.approx(1 / 5)
    ch = judged["choice_accuracy"]  # best (3,6) is 3rd; (2,5) in the top-2 is 1 layer off at both ends
    assert (ch["best_in_top_k"], ch["near_best_in_top_k"], ch["best_rank"], ch["gain_ratio"]) == (False, True, 3, 0.5)


def test_no_block_helps_gives_no_ratio():
    rows = [row(None, None, -1.0, 0.5, None, 3.0), row(0, 2, -1.5, 0.25, None, 3.0), row(1, 3, -1.25, 0.5, None, 3.0)]
    result = validate({"methods": {"m": {"blocks": [{"start": 0, "end": 2}]}}}, rows)
    assert set(result["best"]) == {"answer_logprob", "greedy_accuracy"}  # no choice accuracy in this suite
    assert result["best"]["answer_logprob"]["gain"] == -0.25
    assert result["methods"]["m"]["answer_logprob"]["gain_ratio"] is None


def test_ties_and_iou():
    baseline = row(None, None, 0.0, 0, 0, 0)
    blocks = {(2, 5): row(2, 5, 1.0, 0, 0, 0), (0, 2): row(0, 2, 1.0, 0, 0, 0), (1, 3): row(1, 3, 1.0, 0, 0, 0)}
    assert best_block(baseline, blocks, "answer_logprob") == (0, 2)  # smaller blocks first, then earlier start
    assert iou((0, 3), (3, 6)) == 0.0 and iou((2, 4), (0, 6)) == pytest.approx(2 / 6)


def test_bad_inputs():
    with pytest.raises(CpOnnxError, match="no baseline row"):
        validate(REPORT, ROWS[1:])
    with pytest.raises(CpOnnxError, match="no methods"):
        validate({}, ROWS)


def test_heatmap_writes_png(tmp_path):
    out = heatmap(ROWS, {m: v["blocks"] for m, v in REPORT["methods"].items()}, tmp_path / "plots" / "gain.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["gain.png"]  # no temporary file left behind


def test_heatmap_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(CpOnnxError, match=r"cp-onnx\[plots\]"):
        heatmap(ROWS, {}, tmp_path / "gain.png")


def test_report_and_sweep_of_different_models_are_refused():
    report = {**REPORT, "model": {"onnx_sha256": "a" * 64}}
    assert validate(report, ROWS, sweep_header={"model": {"onnx_sha256": "a" * 64}})["top_k"] == 5
    with pytest.raises(CpOnnxError, match="different models"):
        validate(report, ROWS, sweep_header={"model": {"onnx_sha256": "b" * 64}})


def test_a_sweep_whose_gains_are_absurd_is_a_one_line_error(tmp_path):
    """Found by fuzzing: a metric of 1e308 in one sweep line overflowed matplotlib's colour bar (a traceback)."""
    from cp_onnx.errors import CpOnnxError
    from cp_onnx.outputs.plots import heatmap

    rows = [{"start": None, "end": None, "answer_logprob": -3.0}, {"start": 0, "end": 2, "answer_logprob": 1e308},
            {"start": 1, "end": 3, "answer_logprob": -2.0}]
    with pytest.raises(CpOnnxError, match="the sweep file is damaged"):
        heatmap(rows, {}, tmp_path / "heatmap.png")
    assert not (tmp_path / "heatmap.png").exists()


def test_each_regime_is_judged_on_its_own_rows():
    """A sweep of both regimes: the best block and each method's realised gain differ by regime, and are reported apart."""
    from cp_onnx.outputs.validation_text import format_validation
    from cp_onnx.groundtruth.sweep import regime_rows
    from cp_onnx.groundtruth.validate import validate_regimes

    zero = [row(None, None, -4.0, 0.0, 0.5, 3.0), row(0, 3, -3.0, 0.25, 0.5, 3.5), row(1, 4, -3.5, 0.0, 0.5, 3.0)]  # (0,3) +1.0
    two = {(r["start"], r["end"]): r for r in ROWS}
    rows = [{"start": z["start"], "end": z["end"], "regimes": {"zero_shot": strip(z), "few_shot": strip(two[(z["start"], z["end"])])}} for z in zero]
    rows += [{"start": r["start"], "end": r["end"], "regimes": {"few_shot": strip(r)}} for r in ROWS if (r["start"], r["end"]) not in {(0, 3), (1, 4)} and r["start"] is not None]
    result = validate_regimes(REPORT, rows, top_k=2)
    assert list(result["regimes"]) == ["zero_shot", "few_shot"]
    assert result["regimes"]["few_shot"] == validate(REPORT, ROWS, top_k=2)  # few-shot alone: as before regimes
    best = result["regimes"]["zero_shot"]["best"]["answer_logprob"]
    assert (best["start"], best["end"], best["gain"]) == (0, 3, 1.0)
    assert result["regimes"]["zero_shot"]["methods"]["anomaly"]["answer_logprob"]["gain_ratio"] == 1.0  # its top-1 is (0, 3)
    assert result["regimes"]["few_shot"]["methods"]["anomaly"]["answer_logprob"]["gain_ratio"] == pytest.approx(0.5)
    assert regime_rows(rows, "zero_shot")[1] == {"start": 0, "end": 3, **strip(zero[1])}
    assert "answer_logprob: best block [0, 3), gain +1.0000" in format_validation(result["regimes"]["zero_shot"])
    with pytest.raises(CpOnnxError, match="no rows with metrics"):
        validate_regimes(REPORT, [])


def strip(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k not in ("start", "end")}
