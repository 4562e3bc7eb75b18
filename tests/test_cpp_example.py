"""examples/cpp: built with CMake against nlohmann/json, its printout equals `cp-onnx report --text`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cp_onnx.files import write_json
from cp_onnx.cli import main
from cp_onnx.outputs.decision import NO_PREDICTION, decision_line, decision_lines
from support import ABSTAIN, HELP, ZERO, cpp_tools_missing, run_reader, tiny_report, write_tiny_folder

pytestmark = pytest.mark.skipif(cpp_tools_missing() is not None, reason=cpp_tools_missing() or "")


def cli_text(report_path: Path, top: int, capsys) -> str:
    assert main(["report", str(report_path), "--text", "--top", str(top)]) == 0
    return capsys.readouterr().out


def test_cpp_prints_what_the_cli_prints(reader, tiny_model, tmp_path, capsys):
    folder = write_tiny_folder(tiny_model, "qwen2", tmp_path / "qwen2")
    path = write_json(tiny_report(folder), tmp_path / "report.json")
    for top in (5, 2):
        done = run_reader(reader, path, top)
        assert done.returncode == 0, done.stderr
        expected = cli_text(path, top, capsys)
        assert done.stdout == expected
        assert expected.count("\n  1 [") == 5  # a first-ranked block for the default method and the paper's four
        lines = expected.splitlines()
        assert lines[:2] == decision_lines(json.loads(path.read_text()))  # the answers first: zero-shot, few-shot
        at = 4
        for regime in ("zero_shot", "few_shot"):  # each regime's decision, then its decided block per kind
            assert lines[at] in (f"prediction {regime} abstain", *(f"prediction {regime} help {s}:{e}" for s in range(3) for e in range(s + 1, 4)))
            first = json.loads(path.read_text())["predictions"][regime]["kinds"]["blocks"][0]
            kinds = lines[at + 1 : at + 2 + len(first["by_kind"])]
            assert kinds[0] == f"kinds {first['start']}:{first['end']}" and first["by_kind"]
            assert [line.rsplit(" kind ", 1)[1] for line in kinds[1:]] == list(first["by_kind"])
            at += 2 + len(first["by_kind"])


def test_cpp_decision_line_equals_pythons(reader, tmp_path, capsys):
    """Every branch of the decision line: help and abstain with their figures, trimmed and older predictions, a line
    break in a hand-edited reason, null costs, a one-layer block, a missing confidence, a zero-shot gain per question."""
    base = {"format": "cp-onnx-report", "version": 2, "model": {"name": "toy", "num_layers": 30}, "methods": {}, "layers": []}
    no_cost = {**ABSTAIN, "candidates": [{**ABSTAIN["candidates"][0], "metrics": {"gain_lower_bound": -0.1, "general_nll_change": None}}]}
    predictions = [HELP, ABSTAIN, no_cost, {**HELP, "block": {"start": 4, "end": 5}, "confidence": None, "metric": ""},
                   {**ABSTAIN, "reason": "two\nlines\r", "method": None, "candidates": []},
                   {"decision": "help", "block": {"start": 1, "end": 3}}, {"decision": "abstain", "block": None},
                   {**HELP, "predicted_gain": 1e300, "gain_lower_bound": -2.5e-300},
                   {**ABSTAIN, "regime": "zero_shot", "gain_per": "question"}, {**HELP, "gain_per": ""}]
    path = tmp_path / "report.json"
    for prediction in predictions:
        for regime in ("zero_shot", "few_shot"):
            path.write_text(json.dumps({**base, "predictions": {regime: prediction}}))
            done = run_reader(reader, path)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == decision_line(prediction, regime), prediction
    path.write_text(json.dumps({**base, "predictions": {"few_shot": ABSTAIN, "zero_shot": ZERO}}))  # both, zero-shot first
    assert run_reader(reader, path).stdout.splitlines()[:2] == [decision_line(ZERO, "zero_shot"), decision_line(ABSTAIN, "few_shot")]


def test_cpp_null_scores_and_bad_input(reader, tmp_path, capsys):
    data = {"format": "cp-onnx-report", "version": 2, "model": {"name": "toy", "num_layers": 4},
            "methods": {"boundary": {"blocks": [{"start": 0, "end": 3, "score": None, "metrics": {}}]}},
            "layers": [{"layer": 0, "norm_growth": None}, {"layer": 1, "norm_growth": 2}]}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(data))
    done = run_reader(reader, path)
    assert done.stdout == NO_PREDICTION + "\nmodel toy\nlayers 4\nmethod boundary\n  1 [0, 3) 0.0-75.0% score n/a\nper-layer statistics\n  layer 0 norm_growth=n/a\n  layer 1 norm_growth=2\n"

    helped = {**data, "predictions": {"few_shot": {"decision": "help", "block": {"start": 1, "end": 3}}}}
    path.write_text(json.dumps(helped))
    assert run_reader(reader, path).stdout.splitlines()[3] == "prediction few_shot help 1:3" == cli_text(path, 5, capsys).splitlines()[3]
    path.write_text(json.dumps({**data, "predictions": {"zero_shot": {"decision": "abstain", "block": None}}}))
    assert run_reader(reader, path).stdout.splitlines()[3] == "prediction zero_shot abstain"

    # Per-kind lines: a block without figures skipped, a null gain and bounds, a kind holding a line break.
    kinds = {"blocks": [{"start": 0, "end": 2, "by_kind": {}},
                        {"start": 1, "end": 3, "by_kind": {"arithmetic": {"texts": 9, "with_numbers": 8, "gain": 0.25, "lower": 0.01, "upper": 0.5, "verdict": "helps"},
                                                           "your\ntexts": {"texts": 2, "with_numbers": 0, "gain": None, "lower": None, "upper": None, "verdict": "unclear"}}}]}
    path.write_text(json.dumps({**data, "predictions": {"few_shot": {"decision": "help", "block": {"start": 1, "end": 3}, "kinds": kinds}}}))
    assert run_reader(reader, path).stdout.splitlines()[4:7] == cli_text(path, 5, capsys).splitlines()[4:7] == [
        "kinds 1:3", "  helps gain 0.25 bounds 0.01 0.5 texts 9 numbers 8 kind arithmetic", "  unclear gain n/a bounds n/a n/a texts 2 numbers 0 kind your texts"]

    pruned = {**data, "pruning": {
        "layers": {"default": "removal_loss", "num_layers": 4, "base_nll": 2.5,
                   "methods": {"removal_loss": {"choices": [{"n": 1, "layers": [2], "score": 0.1}, {"n": 2, "layers": [1, 3], "score": 0.3}], "blocks": []}}},
        "heads": {"default": "head_ablation", "methods": {"head_ablation": {"cheapest": [{"layer": 3, "head": k, "score": 0.0} for k in range(7)]}}}}}
    path.write_text(json.dumps(pruned))
    lines = run_reader(reader, path).stdout.splitlines()
    assert lines[5:12] == ["prune removal_loss 1 2", "prune removal_loss 2 1,3", *(f"prune_head head_ablation 3 {k}" for k in range(5))]
    assert run_reader(reader, path).stdout == cli_text(path, 5, capsys)

    path.write_text(json.dumps({**data, "format": "something-else"}))
    assert run_reader(reader, path).returncode == 2
    path.write_text("{ not json")
    done = run_reader(reader, path)
    assert done.returncode == 2 and "not valid JSON" in done.stderr
