"""Predictions per kind of calibration text: the labelled texts, the per-kind gains and bounds, and what the outputs say."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from cp_onnx.analysis import predict as predict_module
from cp_onnx.analysis import report as report_mod
from cp_onnx.analysis.kinds import kind_gains
from cp_onnx.analysis.predict import predict
from cp_onnx.calibration import YOUR_TEXTS, load_calibration, load_kinds, read_labelled
from cp_onnx.errors import CpOnnxError
from cp_onnx.calibration import TASK_KINDS
from support import GENERAL, TINY_ARGS, run, torch_token_logprob

# Two kinds, the second text of each without a number in one of them (it is left out of that kind's gain).
LABELLED = [("2 + 3 = 5, and 5 + 4 = 9.", "arithmetic"), ("7, 9, 11: the next is 13.", "sequence"),
            ("Half of 18 is 9.", "arithmetic"), ("All cats purr. Tom is a cat.", "sequence"), ("3, 6, 12: then 24.", "sequence")]


# --- the labelled texts ---

def test_every_shipped_english_text_names_a_probe_kind_with_enough_texts_holding_numbers():
    texts, kinds = load_calibration(n=None), load_kinds(n=None)
    assert len(kinds) == len(texts) and set(kinds) == set(TASK_KINDS)
    for kind in TASK_KINDS:
        with_numbers = [t for t, k in zip(texts, kinds) if k == kind and re.search(r"\d", t)]
        assert len(with_numbers) >= predict_module.MIN_TEXTS + 4, kind  # a kind alone can reach a decision


def test_translations_take_their_kinds_from_the_english_file_line_for_line():
    english = load_kinds(n=None)
    for language in ("hi", "zh", "fr"):
        kinds = load_kinds(n=None, language=language)
        assert kinds == english[: len(kinds)] and len(kinds) == len(load_calibration(n=None, language=language))
    assert load_kinds("mixed", n=4) == [english[0], "general", english[1], "general"]


def test_a_labelled_file_round_trips(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"text": "Half of 18 is 9.", "kind": "arithmetic"}, {"text": "My own task, 4 steps."}, {"text": "Add 2 and 2 to get 4.", "kind": "arith"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_labelled(path) == [("Half of 18 is 9.", "arithmetic"), ("My own task, 4 steps.", YOUR_TEXTS), ("Add 2 and 2 to get 4.", "arith")]
    assert load_calibration(path, n=2) == ["Half of 18 is 9.", "My own task, 4 steps."] and load_kinds(path, n=2) == ["arithmetic", YOUR_TEXTS]
    text = tmp_path / "mine.txt"
    text.write_text("one 1\n\ntwo 2\n", encoding="utf-8")
    assert load_kinds(text, n=None) == [YOUR_TEXTS, YOUR_TEXTS]


@pytest.mark.parametrize("kind", [3, "", "  ", None])
def test_a_bad_kind_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "Half of 18 is 9.", "kind": kind}) + "\n", encoding="utf-8")
    with pytest.raises(CpOnnxError, match='line 1 of .* has a "kind"') as caught:
        load_kinds(path)
    assert "\n" not in str(caught.value)


# --- the per-kind gains ---

def test_kind_gains_worked_by_hand():
    gains = np.array([[2.0, -4.0], [6.0, -2.0], [1.0, 1.0], [0.0, 0.0]])  # [texts, blocks]
    tokens = np.array([2.0, 2.0, 1.0, 0.0])
    found = kind_gains(gains, tokens, ["a", "a", "b", "b"], confidence=0.95, min_texts=1)
    assert found[0]["a"].gain == pytest.approx(8 / 4) and found[1]["a"].gain == pytest.approx(-6 / 4)
    assert found[0]["b"].gain == pytest.approx(1.0) and (found[0]["b"].texts, found[0]["b"].with_numbers) == (2, 1)
    for block in found:
        for g in block.values():
            assert g.lower <= g.gain <= g.upper
    # Every text of "a" gains under block 0 and loses under block 1, so every resample does: clear verdicts.
    assert (found[0]["a"].verdict, found[1]["a"].verdict) == ("helps", "hurts")
    # The same gains with too few texts per kind are unclear and have no bounds (a bootstrap over 2 texts cannot give one).
    few = kind_gains(gains, tokens, ["a", "a", "b", "b"], confidence=0.95, min_texts=3)
    assert all((g.verdict, g.lower, g.upper) == ("unclear", None, None) for block in few for g in block.values())
    assert few[0]["a"].gain == pytest.approx(2.0)


def test_kind_bounds_hold_for_all_kinds_at_once():
    # One kind alone has a narrower interval than beside a second kind of the same noise: the critical value covers both.
    rng = np.random.default_rng(1)
    gains, tokens = rng.normal(0.3, 1.0, size=(20, 5)) * 3, np.full(20, 3.0)
    alone = kind_gains(gains[:10], tokens[:10], ["a"] * 10, confidence=0.95, min_texts=8)
    both = kind_gains(gains, tokens, ["a"] * 10 + ["b"] * 10, confidence=0.95, min_texts=8)
    for block in range(5):
        assert both[block]["a"].gain == pytest.approx(alone[block]["a"].gain)
        assert both[block]["a"].upper - both[block]["a"].lower > alone[block]["a"].upper - alone[block]["a"].lower


SHIPPED_ZERO_SHOT_KINDS = [14, 19, 8, 10, 12, 13]  # answered questions per kind in the shipped English set (with 8 or more)


def _simulated_gains(rng, blocks: int, draw) -> tuple[np.ndarray, list[str]]:
    """Per-question gains [questions, blocks] with no effect anywhere: a question effect the blocks share, plus each block's own."""
    kinds = [f"k{i}" for i, n in enumerate(SHIPPED_ZERO_SHOT_KINDS) for _ in range(n)]
    shared = draw((len(kinds), 1)) * rng.uniform(0.5, 1.5, size=(1, blocks))
    return 0.8 * shared + 0.5 * draw((len(kinds), blocks)), kinds


@pytest.mark.parametrize("name", ["skewed", "heavy-tailed"])
def test_kind_verdicts_rarely_claim_an_effect_that_is_not_there(name):
    # The verdicts' 95% bounds hold for every block and kind at once, so on gains with no effect at all, a run
    # should claim "helps" or "hurts" for any block and kind in at most about 5% of runs. A bootstrap of the mean
    # scaled by the fixed standard error (not studentised) claimed one in 38% (skewed) and 47% (heavy-tailed)
    # of such runs with 8-19 questions per kind.
    rng = np.random.default_rng(7)
    draw = {"skewed": lambda size: rng.exponential(1.0, size=size) - 1.0, "heavy-tailed": lambda size: rng.standard_t(3, size=size)}[name]
    runs, claimed = 40, 0
    for _ in range(runs):
        gains, kinds = _simulated_gains(rng, 39, draw)
        found = kind_gains(gains, np.ones(len(kinds)), kinds, confidence=0.95, min_texts=8)
        claimed += any(g.verdict != "unclear" for block in found for g in block.values())
    assert claimed <= 5  # 12.5% of 40 runs: room for sampling error around 5%, far below 38%


def test_kind_verdicts_find_a_clear_effect_in_one_kind():
    rng = np.random.default_rng(3)
    gains, kinds = _simulated_gains(rng, 39, lambda size: rng.standard_normal(size))
    gains[np.array(kinds) == "k1", 4] += 2.5  # block 4 helps the 19 questions of k1 by 2.5 nats each, nothing else
    found = kind_gains(gains, np.ones(len(kinds)), kinds, confidence=0.95, min_texts=8)
    assert found[4]["k1"].verdict == "helps"
    assert all(g.verdict == "unclear" for b, block in enumerate(found) for k, g in block.items() if (b, k) != (4, "k1"))


def test_per_kind_gains_match_torch_on_each_kinds_texts(tiny_llama, monkeypatch):
    monkeypatch.setattr(predict_module, "MIN_TEXTS", 2)
    hf, model = tiny_llama
    texts, kinds = [t for t, _ in LABELLED], [k for _, k in LABELLED]
    result = predict(model, texts, GENERAL, regimes=("few_shot",), block_sizes=(1, 2), kinds=kinds)["few_shot"]
    decode = model.tokenizer.id_to_token
    for block in result.blocks:
        path = [*range(block.end), *range(block.start, 3)]
        for kind in ("arithmetic", "sequence"):
            total = count = 0.0
            for text in (t for t, k in LABELLED if k == kind):  # the digit tokens of the kind's texts, each text alone in torch
                ids = model.encode([text])[0][0]
                at = [p for p in range(1, len(ids)) if decode(ids[p]).isdigit()]
                total += sum(torch_token_logprob(hf, ids, path, p) - torch_token_logprob(hf, ids, None, p) for p in at)
                count += len(at)
            found = result.by_kind[block.start, block.end][kind]
            assert found.gain == pytest.approx(total / count, abs=1e-5)
            assert (found.texts, found.with_numbers) == ((2, 2) if kind == "arithmetic" else (3, 2))
    shown = result.as_dict()["kinds"]
    assert [(b["start"], b["end"]) for b in shown["blocks"]] == [(c["start"], c["end"]) for c in result.as_dict()["candidates"]]
    assert list(shown["blocks"][0]["by_kind"]) == ["arithmetic", "sequence"]  # the probe suite's order


def test_unlabelled_texts_are_your_texts_and_their_gain_is_the_score(tiny_llama):
    result = predict(tiny_llama[1], [t for t, _ in LABELLED], GENERAL, regimes=("few_shot",), block_sizes=(1, 2))["few_shot"]
    for block in result.blocks:
        assert list(result.by_kind[block.start, block.end]) == [YOUR_TEXTS]
        assert result.by_kind[block.start, block.end][YOUR_TEXTS].gain == pytest.approx(block.score)


# --- the outputs ---

def test_cli_prints_the_per_kind_line_and_the_report_validates(tiny_folder, tmp_path, capsys):
    calibration = tmp_path / "labelled.jsonl"
    calibration.write_text("".join(json.dumps({"text": t, "kind": k}) + "\n" for t, k in LABELLED), encoding="utf-8")
    code, out, _ = run(["analyze", tiny_folder, "--calibration", calibration, "--regime", "few", "--out", tmp_path / "out", *TINY_ARGS], capsys)
    assert code == 0
    decision, said = out.split("\n\n")[:2]  # the per-kind line follows the decision (after the greedy line, when there is one)
    said = said if said.startswith("few-shot per kind") else out.split("\n\n")[2]
    assert decision.startswith("few-shot decision: ") and said.startswith("few-shot per kind of calibration text, [") and "(the least harmful block)" in said
    assert "arithmetic" in out and "too few texts to tell (8 needed) for arithmetic" in " ".join(said.split()) and "per kind, few-shot (gain" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    jsonschema.validate(data, report_mod.schema())
    kinds = data["predictions"]["few_shot"]["kinds"]
    assert {kind for b in kinds["blocks"] for kind in b["by_kind"]} == {"arithmetic", "sequence"}
    assert all(g["verdict"] == "unclear" for b in kinds["blocks"] for g in b["by_kind"].values())  # 2 texts each, below MIN_TEXTS
    code, out, _ = run(["report", tmp_path / "out" / "report.json", "--html", tmp_path / "page.html"], capsys)
    assert code == 0
    page = (tmp_path / "page.html").read_text()
    assert page.index("class='by-kind'") < page.index("Rankings by method") and "per kind of calibration text" in page


def test_a_users_unlabelled_texts_are_named_your_texts_in_the_output(tiny_folder, tmp_path, capsys):
    calibration = tmp_path / "mine.txt"
    calibration.write_text("".join(t + "\n" for t, _ in LABELLED), encoding="utf-8")
    code, out, _ = run(["analyze", tiny_folder, "--calibration", calibration, "--regime", "few", "--out", tmp_path / "out", *TINY_ARGS], capsys)
    assert code == 0
    said = next(part for part in out.split("\n\n") if part.startswith("few-shot per kind"))
    assert "too few texts to tell (8 needed) for your texts" in " ".join(said.split())


def test_a_trimmed_or_older_report_gets_no_per_kind_line_and_no_traceback():
    from cp_onnx.outputs.decision import kinds_line

    for prediction in ({}, None, {"decision": "abstain"}, {"kinds": 3}, {"kinds": {"blocks": [1]}}):
        assert kinds_line(prediction, "few_shot") is None
    bare = {"kinds": {"blocks": [{"start": 1, "end": 2, "by_kind": {"a": {"gain": 0.5, "verdict": "helps"}}}]}}
    assert kinds_line(bare, "few_shot").startswith("few-shot per kind of calibration text, [1, 2) (the least harmful block): helps for a +0.500")
