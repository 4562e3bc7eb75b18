"""The answers come first: every output opens with the default prediction's decision per regime (or says the report has none)."""
from __future__ import annotations

import copy
import json
import textwrap
from html.parser import HTMLParser

import pytest

from cp_onnx.files import write_json
from cp_onnx.cli import main
from cp_onnx.outputs.decision import NO_PREDICTION, decision_line, decision_lines, greedy_line
from cp_onnx.outputs.embed import metadata
from support import ABSTAIN, HELP, ZERO, tiny_report, write_tiny_folder

SCOPE = "metric answer log-probability (digit tokens), method duplication_loss"


def test_decision_lines_worked_by_hand():
    assert decision_line(HELP, "few_shot") == (
        "few-shot decision: duplicate [9, 14) (layers 9 to 13 run twice); gain +0.1266 nats per digit token (lower 95% bound +0.0123), "
        f"cost on general text +0.2297 nats per token; {SCOPE}")
    assert decision_line(ABSTAIN, "few_shot") == (
        "few-shot decision: no block is predicted to help (no block's gain is above zero in 95% of 2000 resamples of the texts); "
        "least harmful [9, 14), [9, 13); top gain +0.1266 nats per digit token (lower 95% bound -0.0079), "
        f"cost on general text +0.2297 nats per token; {SCOPE}")
    # A zero-shot prediction's gain is per question, and its line names the regime.
    assert decision_line(ZERO, "zero_shot") == (
        "zero-shot decision: duplicate [9, 14) (layers 9 to 13 run twice); gain +0.1266 nats per question (lower 95% bound +0.0123), "
        "cost on general text +0.2297 nats per token; metric answer log-probability (the stated answer), method duplication_loss")
    # Both, zero-shot first whatever the report's order; trimmed reports lose the parts whose fields are missing; none fails.
    assert decision_lines({"predictions": {"few_shot": ABSTAIN, "zero_shot": ZERO}}) == [decision_line(ZERO, "zero_shot"), decision_line(ABSTAIN, "few_shot")]
    assert decision_line({"decision": "help", "block": {"start": 3, "end": 4}}, "few_shot") == (
        "few-shot decision: duplicate [3, 4) (layer 3 run twice); metric not recorded, method duplication_loss")
    assert decision_line({"decision": "abstain", "block": None, "reason": "a\nb"}, "zero_shot").startswith(
        "zero-shot decision: no block is predicted to help (a b); metric not recorded")
    assert decision_lines({}) == [NO_PREDICTION] and "\n" not in NO_PREDICTION
    assert decision_lines({"predictions": {"zero_shot": None, "few_shot": 3}}) == [NO_PREDICTION]


def test_greedy_line_worked_by_hand():
    zero = {**ZERO, "texts": {"questions": 83}, "greedy": {"base": 0.0361, "change": 0.0843, "lower": 0.036, "upper": 0.1446,
                                                            "changed_units": 7, "bounded": True, "confidence": 0.95}}
    assert greedy_line(zero, "zero_shot") == (
        "zero-shot greedy (the model's own answer): right on 3 of 83 (4%) questions; "
        "with [9, 14) (the block to duplicate) duplicated 10 of 83 (12%), +8.4 points [95% bounds +3.6, +14.5]")
    few = {**ABSTAIN, "texts": {"digit_tokens": 45}, "greedy": {"base": 0.0361, "change": -0.0222, "lower": None, "upper": None,
                                                                 "changed_units": 2, "bounded": False}}
    assert greedy_line(few, "few_shot").endswith(
        "right on 2 of 45 (4%) digit tokens; with [9, 14) (the least harmful block) duplicated 1 of 45 (1%), -2.2 points "
        "(the calibration set cannot bound it: only 2 texts changed)")
    assert greedy_line({**few, "texts": {}}, "few_shot").startswith("few-shot greedy (the model's own answer): right on 4% of the digit tokens")
    assert greedy_line(HELP, "few_shot") is None and greedy_line({**few, "candidates": []}, "few_shot") is None  # figures missing
    assert greedy_line({**few, "greedy": {"base": True, "change": 0.1}}, "few_shot") is None


@pytest.fixture(scope="module")
def reports(tiny_model, tmp_path_factory):
    """Report paths by case: the tiny llama's own report, with its decision set to help, and without a prediction."""
    root = tmp_path_factory.mktemp("decision")
    data = tiny_report(write_tiny_folder(tiny_model, "llama", root / "llama"))
    helped = copy.deepcopy(data)
    for prediction in helped["predictions"].values():
        top = prediction["candidates"][0]
        prediction |= {"decision": "help", "block": {"start": top["start"], "end": top["end"]}}
    bare = {**data, "predictions": {}}
    return {name: write_json(report, root / f"{name}.json") for name, report in (("analysed", data), ("help", helped), ("none", bare))}


@pytest.mark.parametrize("case", ["analysed", "help", "none"])
def test_summary_text_and_metadata_open_with_the_decisions(reports, case, capsys):
    data = json.loads(reports[case].read_text())
    lines = decision_lines(data)
    assert len(lines) == (1 if case == "none" else 2)  # one decision per regime: zero-shot, then few-shot
    assert main(["report", str(reports[case])]) == 0
    summary = capsys.readouterr().out
    assert summary.split("\n\n")[0] == "\n".join(textwrap.fill(line, 100, subsequent_indent="  ", break_on_hyphens=False) for line in lines)
    assert main(["report", str(reports[case]), "--text"]) == 0
    assert capsys.readouterr().out.splitlines()[: len(lines)] == lines
    entries = metadata(data)
    keys = ["cp_onnx.decision"] if case == "none" else ["cp_onnx.decision.zero_shot", "cp_onnx.decision.few_shot"]
    assert list(entries)[: len(keys)] == keys and [entries[k] for k in keys] == lines
    for regime, prediction in data["predictions"].items():  # the tiny model's own figures, after the decisions
        said = greedy_line(prediction, regime)
        assert said and " ".join(said.split()) in " ".join(summary.split())


class Page(HTMLParser):
    """Where the decision section starts and ends and where each table starts (in parse order), and its text."""

    def __init__(self):
        super().__init__()
        self.events, self.depth, self.text, self.inside = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        if tag == "section" and dict(attrs).get("id") == "decision":
            self.events.append("decision")
            self.inside = True
        elif tag == "table":
            self.events.append(("table", dict(attrs).get("id"), self.inside))

    def handle_endtag(self, tag):
        if tag == "section":
            self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.text.append(data)


def _page(path, tmp_path, capsys) -> Page:
    out = tmp_path / "page.html"
    assert main(["report", str(path), "--html", str(out)]) == 0
    capsys.readouterr()
    page = Page()
    page.feed(out.read_text())
    return page


@pytest.mark.parametrize("case", ["analysed", "help", "none"])
def test_html_opens_with_the_decision_panel(reports, case, tmp_path, capsys):
    data = json.loads(reports[case].read_text())
    page = _page(reports[case], tmp_path, capsys)
    assert page.events[0] == "decision"  # before every table of the page
    outside = [e for e in page.events[1:] if not e[2]]
    assert [e[1] for e in outside][:1] == ["top-circuits"] and all(e[2] is False for e in outside)
    text = " ".join(" ".join(page.text).split())  # elements' texts apart, spaces normalised
    for line in decision_lines(data):
        assert " ".join(line.split()) in text
    if not data["predictions"]:
        assert text.startswith("Decision No prediction in this report.")
        return
    assert text.startswith("Decisions Zero-shot ")  # both regimes, zero-shot first
    assert text.index("Zero-shot") < text.index("Few-shot")
    for regime, prediction in data["predictions"].items():
        if prediction["decision"] == "help":
            block = prediction["block"]
            assert f"Duplicate block [{block['start']}, {block['end']})" in text
            assert f"expected gain {prediction['predicted_gain']:+.4f} nats per {prediction['gain_per']}" in text
            assert f"{prediction['gain_lower_bound']:+.4f}" in text and "cost on general text" in text
        else:
            assert "No block is predicted to help." in text and prediction["reason"] in text
            for block in prediction["candidates"]:
                assert f"[{block['start']}, {block['end']})" in text
        assert f"metric {prediction['metric']}" in text
        assert " ".join(greedy_line(prediction, regime).split()) in text


def test_rankings_are_labelled_as_rankings(reports, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(reports["analysed"]), "--html", str(out)]) == 0
    capsys.readouterr()
    markup = out.read_text()
    table = markup.index("<table id='top-circuits'>")
    assert "<h2>Rankings by method</h2>" in markup[:table] and "not recommendations" in markup[markup.index("<h2>Rankings"):table]
    assert "Top circuits" not in markup


def test_a_reader_that_stops_after_the_decision_gets_no_traceback(reports):
    """`cp-onnx report REPORT | head -1`: the pipe closes while cp-onnx still writes; it stops quietly (exit 141)."""
    import subprocess
    import sys

    reader = subprocess.Popen([sys.executable, "-m", "cp_onnx.cli", "report", str(reports["analysed"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    reader.stdout.close()  # the reader went away (as head does after its lines) before cp-onnx wrote anything
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
