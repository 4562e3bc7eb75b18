"""Scoring and the sweep on the tiny llama: against torch (log_softmax, layers repeated), the route pass, resume and workers."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest

from cp_onnx.errors import CpOnnxError
from cp_onnx.groundtruth import sweep as sweep_module
from cp_onnx.models import evaluators
from cp_onnx.models.scoring import ProbeItem
from cp_onnx.models.scoring import ProbePlan, token_scores
from cp_onnx.groundtruth.sweep import read_sweep, sweep
from graph_passes.edit import Edit
from support import GENERAL, ITEMS, SHOT_ITEMS

SMALL_BLOCKS = (1, 2)  # on 3 layers: [0,1) [1,2) [2,3) [0,2) [1,3)


def torch_metrics(hf, encode, path=None, items=ITEMS) -> dict:
    """The sweep's metrics computed independently: each sequence (shots, prompt, continuation) alone through torch,
    optionally with layers repeated."""
    import torch

    model = hf.model
    layers, count = model.layers, hf.config.num_hidden_layers
    if path is not None:
        model.layers, hf.config.num_hidden_layers = torch.nn.ModuleList([layers[k] for k in path]), len(path)
    try:
        def scored(tokens, start):
            with torch.no_grad():
                logits = hf(torch.tensor([tokens]), use_cache=False).logits[0].double()  # a cache would mix repeated layers
            logprobs = torch.log_softmax(logits, dim=-1)
            picks = [(logprobs[p - 1, tokens[p]].item(), int(logits[p - 1].argmax()) == tokens[p]) for p in range(start, len(tokens))]
            return sum(lp for lp, _ in picks), all(hit for _, hit in picks)

        rows = {}
        for item in items:
            prompt = encode(item.shots + item.prompt)
            results = {text: scored(encode(item.shots + item.prompt + text), len(prompt)) for text in (item.options or (item.answer,))}
            logprob, hit = results[item.answer]
            choice = float(max(results, key=lambda t: results[t][0]) == item.answer) if item.options else None
            rows[item.id] = (item.kind, logprob, float(hit), choice)
        general = [scored(encode(text), 1)[0] for text in GENERAL]
        general_nll = -sum(general) / sum(len(encode(text)) - 1 for text in GENERAL)
    finally:
        model.layers, hf.config.num_hidden_layers = layers, count

    def summary(kind=None):
        chosen = [r for r in rows.values() if kind in (None, r[0])]
        choices = [r[3] for r in chosen if r[3] is not None]
        return {"answer_logprob": np.mean([r[1] for r in chosen]), "greedy_accuracy": np.mean([r[2] for r in chosen]),
                "choice_accuracy": np.mean(choices) if choices else None, "items": len(chosen)}

    return {**summary(), "general_nll": general_nll, "by_kind": {kind: summary(kind) for kind in dict.fromkeys(item.kind for item in items)}}


def zero_shot(items):
    return [replace(item, shots="") for item in items]


def few_shot(items):
    return [item for item in items if item.shots]


def regime(row: dict, name: str = "zero_shot") -> dict:
    """One regime's metrics of a sweep row (items without shots, like ITEMS, are zero-shot only)."""
    assert set(row["regimes"]) <= {"zero_shot", "few_shot"}
    return row["regimes"][name]


def assert_metrics_close(got: dict, expected: dict, atol: float = 1e-4) -> None:
    if "regimes" in got:  # a sweep row of ITEMS: zero-shot only
        assert list(got["regimes"]) == ["zero_shot"]
        got = got["regimes"]["zero_shot"]
    if "regimes" in expected:
        expected = expected["regimes"]["zero_shot"]
    for key in ("answer_logprob", "greedy_accuracy", "choice_accuracy", "general_nll"):
        assert got[key] == pytest.approx(expected[key], abs=atol), key
    for kind, values in expected["by_kind"].items():
        for key, value in values.items():
            assert got["by_kind"][kind][key] == (pytest.approx(value, abs=atol) if value is not None else None), (kind, key)


def encoder(model):
    return lambda text: model.encode([text])[0][0]


@pytest.mark.parametrize("cached", [False, True], ids=["whole-sequences", "kv-cached-shots"])
def test_both_regimes_match_torch_with_layers_repeated(tiny_llama, tiny_llama_cached, cached, tmp_path):
    """Zero-shot: every item's question alone; few-shot: its shots first (run once per kind through the KV cache when cached)."""
    hf, model = tiny_llama_cached if cached else tiny_llama
    configs = [Edit.duplicate(0, 2), Edit.duplicate(1, 3)]
    rows = sweep(model, configs, SHOT_ITEMS, out=tmp_path / "sweep.jsonl", general=GENERAL, batch_size=3, log=lambda _: None)
    assert [(r["start"], r["end"], r["path"]) for r in rows] == [(None, None, "0..2"), (0, 2, "0..1,0..2"), (1, 3, "0..2,1..2")]
    encode = encoder(model)
    assert encode("x")[0] == encode("y")[0] != encode("x")[1]  # BOS first, the text after it
    for row, path in zip(rows, (None, [0, 1, 0, 1, 2], [0, 1, 2, 1, 2])):
        assert list(row["regimes"]) == ["zero_shot", "few_shot"]
        assert_metrics_close(regime(row, "zero_shot"), torch_metrics(hf, encode, path, zero_shot(SHOT_ITEMS)))
        assert_metrics_close(regime(row, "few_shot"), torch_metrics(hf, encode, path, few_shot(SHOT_ITEMS)))
    assert regime(rows[0], "few_shot")["items"] == 5 and "comparison" not in regime(rows[0], "few_shot")["by_kind"]
    assert regime(rows[1], "zero_shot") != regime(rows[1], "few_shot")


def test_removed_blocks_match_torch_without_those_layers_and_naive_routed_models(tiny_llama_cached, tmp_path):
    """Removal sweeps (pruning's ground truth): from the embedding (block 0:1) and mid-model, with the KV-cached prefixes."""
    hf, model = tiny_llama_cached
    kwargs = dict(general=GENERAL, batch_size=3, operation="skip", log=lambda _: None)
    rows = sweep(model, [Edit.skip(0, 1), Edit.skip(1, 3)], ITEMS, out=tmp_path / "skip.jsonl", **kwargs)
    assert [(r["start"], r["end"], r["path"], r["operation"]) for r in rows] == [(None, None, "0..2", "skip"), (0, 1, "1..2", "skip"), (1, 3, "0", "skip")]
    encode = encoder(model)
    assert_metrics_close(rows[1], torch_metrics(hf, encode, [1, 2]))
    assert_metrics_close(rows[2], torch_metrics(hf, encode, [0]))
    naive = sweep(model, [Edit.skip(0, 1), Edit.skip(1, 3)], ITEMS, out=tmp_path / "naive.jsonl", mode="naive", **kwargs)
    for fast, slow in zip(rows, naive):
        assert_metrics_close(fast, slow, atol=1e-5)
    assert read_sweep(tmp_path / "skip.jsonl")[0]["operation"] == "skip"
    with pytest.raises(CpOnnxError, match="holds a sweep of removed blocks, not duplicated ones"):
        sweep(model, [Edit.duplicate(0, 1)], ITEMS, out=tmp_path / "skip.jsonl", general=GENERAL, batch_size=3, log=lambda _: None)
    with pytest.raises(CpOnnxError, match="remove all 3 layers"):
        sweep(model, [Edit.skip(0, 3)], ITEMS, out=tmp_path / "all.jsonl", **kwargs)
    with pytest.raises(CpOnnxError, match="either duplicates blocks or removes them"):
        sweep(model, [Edit.skip(0, 1), Edit.duplicate(0, 1)], ITEMS, out=tmp_path / "mixed.jsonl", **kwargs)


def test_layer_outputs_kept_in_files_past_the_budget_give_the_same_rows(tiny_llama, tmp_path, monkeypatch):
    _, model = tiny_llama
    kwargs = dict(general=GENERAL, batch_size=3, log=lambda _: None)
    in_memory = sweep(model, [Edit.duplicate(0, 2), Edit.duplicate(1, 3)], ITEMS, out=tmp_path / "memory.jsonl", **kwargs)
    created = []
    monkeypatch.setattr(evaluators.KeptOutputs, "BUDGET", 1)  # the first batch already passes it
    def folder(**kwargs):
        made = TemporaryDirectory(**kwargs)
        created.append(made.name)
        return made

    monkeypatch.setattr(evaluators.tempfile, "TemporaryDirectory", folder)
    in_files = sweep(model, [Edit.duplicate(0, 2), Edit.duplicate(1, 3)], ITEMS, out=tmp_path / "files.jsonl", **kwargs)
    assert len(created) == 1 and not Path(created[0]).exists()  # used, then removed with the sweep's evaluator
    for kept, spilled in zip(in_memory, in_files):
        assert {k: v for k, v in kept.items() if k != "seconds"} == {k: v for k, v in spilled.items() if k != "seconds"}


def test_shared_prefixes_run_once_with_the_kv_cache_and_match_torch(tiny_llama_cached, tmp_path):
    hf, model = tiny_llama_cached
    encode = encoder(model)
    plan = ProbePlan(ITEMS, encode, GENERAL, share_prefixes=True)
    # The arithmetic items share BOS + "Q: " (4 tokens), the syllogisms BOS; general texts share nothing.
    assert {len(b.prefix) for b in plan.batches} >= {0, 1, 4} and plan.tokens_run < plan.tokens
    assert model.with_past_path is not None
    rows = sweep(model, [Edit.duplicate(0, 2), Edit.duplicate(1, 3)], ITEMS, out=tmp_path / "sweep.jsonl", general=GENERAL, batch_size=3, log=lambda _: None)
    assert_metrics_close(rows[0], torch_metrics(hf, encode))
    assert_metrics_close(rows[1], torch_metrics(hf, encode, [0, 1, 0, 1, 2]))
    assert_metrics_close(rows[2], torch_metrics(hf, encode, [0, 1, 2, 1, 2]))


def test_reuse_equals_naive_routed_models(tiny_llama, tmp_path):
    _, model = tiny_llama
    kwargs = dict(sizes=SMALL_BLOCKS, general=GENERAL, batch_size=2, log=lambda _: None)
    reuse = sweep(model, None, ITEMS, out=tmp_path / "reuse.jsonl", **kwargs)
    naive = sweep(model, None, ITEMS, out=tmp_path / "naive.jsonl", mode="naive", **kwargs)
    assert len(reuse) == 6
    for fast, slow in zip(reuse, naive):
        assert (fast["start"], fast["end"]) == (slow["start"], slow["end"])
        assert_metrics_close(fast, slow, atol=1e-5)


def test_resume_after_a_kill_runs_each_config_once(tiny_llama, tmp_path, monkeypatch):
    _, model = tiny_llama
    out = tmp_path / "sweep.jsonl"
    evaluated = []
    real_run = sweep_module._run_edit
    monkeypatch.setattr(sweep_module, "_run_edit", lambda edit: evaluated.append(edit) or real_run(edit))

    def killed_after_3(done, total):
        if done == 3:
            raise KeyboardInterrupt

    kwargs = dict(sizes=SMALL_BLOCKS, general=GENERAL, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        sweep(model, None, ITEMS, out=out, progress=killed_after_3, **kwargs)
    first_lines = out.read_text().splitlines()
    assert len(first_lines) == 4  # header + 3 configs
    with open(out, "a") as fh:
        fh.write('{"start": 2, "end": 3, "answer_lo')  # a line cut short by the kill
    calls = []
    rows = sweep(model, None, ITEMS, out=out, progress=lambda done, total: calls.append((done, total)), **kwargs)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert len(evaluated) == 6 and len(set(evaluated)) == 6  # nothing evaluated twice
    header, stored = read_sweep(out)
    assert out.read_text().splitlines()[:4] == first_lines
    assert header["suite"]["items"] == len(ITEMS)
    assert sorted((r["start"] or -1, r["end"] or -1) for r in stored) == sorted((r["start"] or -1, r["end"] or -1) for r in rows)
    assert len(stored) == 6
    assert sweep(model, None, ITEMS, out=out, **kwargs) == rows  # all done: nothing left to run
    assert len(evaluated) == 6
    with pytest.raises(CpOnnxError, match="another probe suite"):
        sweep(model, None, ITEMS[:3], out=out, **kwargs)
    lines = out.read_text().splitlines()
    lines[0] = lines[0].replace(header["model"]["onnx_sha256"], "0" * 64)
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(CpOnnxError, match="another model"):
        sweep(model, None, ITEMS, out=out, **kwargs)


def test_two_workers_give_the_same_rows(tiny_llama, tmp_path):
    _, model = tiny_llama
    kwargs = dict(sizes=SMALL_BLOCKS, general=GENERAL, log=lambda _: None)
    one = sweep(model, None, ITEMS, out=tmp_path / "one.jsonl", **kwargs)
    two = sweep(model, None, ITEMS, out=tmp_path / "two.jsonl", workers=2, **kwargs)

    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_time(one) == without_time(two)
    lines = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()[1:]]
    assert without_time(lines) == without_time(one)  # written in config order


def test_options_share_a_sequence_when_all_but_their_last_token_match(tiny_llama):
    _, model = tiny_llama
    plan = ProbePlan(ITEMS, encoder(model))
    hosted = {ITEMS[plan.continuations[s.continuations[0]].item].id: len(s.continuations) for s in plan.sequences}
    # " yes" / " no" differ in their second byte, so each needs a sequence; " 1" is read off " 2"'s sequence.
    assert len(plan.sequences) == 2 + 2 * 2 + 3 + 1 and hosted["c-0"] == 2
    assert len(plan.continuations) == 2 + 4 + 3 + 2
    for batch in plan.batches:  # every row stops at its last scored token's predictor: the last token predicts nothing
        width = batch.input_ids.shape[1]
        for row, length in enumerate(batch.attention_mask.sum(axis=1)):
            assert length - 1 == max(p % width for p in batch.positions if p // width == row)


def test_answer_tokens_must_follow_the_prompt_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 2, "bc": 3}, merges=[("b", "c")]))
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    assert ProbePlan([ProbeItem("ok", "k", "ab", "a")], encode).sequences[0].start == 2
    with pytest.raises(CpOnnxError, match="probe item 'merged'"):
        ProbePlan([ProbeItem("merged", "k", "ab", "c")], encode)  # "abc" is a, bc: the prompt's b is gone


def test_bad_edits_are_refused(tiny_llama, tmp_path):
    _, model = tiny_llama
    with pytest.raises(CpOnnxError, match=r"cannot duplicate block 2:5"):
        sweep(model, [Edit.duplicate(2, 5)], ITEMS, out=tmp_path / "s.jsonl", general=GENERAL, log=lambda _: None)
    with pytest.raises(CpOnnxError, match="blocks duplicated or removed"):
        sweep(model, [(0, 2)], ITEMS, out=tmp_path / "s.jsonl", general=GENERAL, log=lambda _: None)


def test_a_user_suite_gives_shots_per_kind_and_per_item(tiny_llama_cached, tmp_path):
    """A kind's shots line applies to its items without their own; an item's "shots" win, "" keeps it zero-shot only."""
    from cp_onnx.groundtruth.probes import load_suite, save_suite

    suite = tmp_path / "mine.jsonl"
    lines = [{"kind": "arithmetic", "shots": "Q: 1+1= 2\n"},
             {"id": "a-0", "kind": "arithmetic", "prompt": "Q: 2+3=", "answer": " 5"},
             {"id": "a-1", "kind": "arithmetic", "prompt": "Q: 17+1=", "answer": " 18", "shots": "Q: 4+4= 8\n"},
             {"id": "a-2", "kind": "arithmetic", "prompt": "Q: 3+3=", "answer": " 6", "shots": ""},
             {"id": "s-0", "kind": "syllogism", "prompt": "All A are B. x is A. Is x B?", "answer": " yes", "options": [" yes", " no"],
              "shots": "No C are D. y is C. Is y D? no\n"},
             {"id": "c-0", "kind": "comparison", "prompt": "Which is larger, 1 or 2?", "answer": " 2", "options": [" 1", " 2"]}]
    suite.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = load_suite(suite)
    assert [item.shots for item in items] == ["Q: 1+1= 2\n", "Q: 4+4= 8\n", "", "No C are D. y is C. Is y D? no\n", ""]
    assert load_suite(save_suite(items, tmp_path / "again.jsonl")) == items
    assert load_suite(save_suite(SHOT_ITEMS, tmp_path / "kinds.jsonl")) == SHOT_ITEMS  # one shots line per kind
    assert sum('"shots"' in line for line in (tmp_path / "kinds.jsonl").read_text().splitlines()) == 3
    hf, model = tiny_llama_cached
    rows = sweep(model, [Edit.duplicate(1, 3)], items, out=tmp_path / "sweep.jsonl", general=GENERAL, batch_size=2, log=lambda _: None)
    encode = encoder(model)
    for row, path in zip(rows, (None, [0, 1, 2, 1, 2])):
        assert_metrics_close(regime(row, "zero_shot"), torch_metrics(hf, encode, path, zero_shot(items)))
        assert_metrics_close(regime(row, "few_shot"), torch_metrics(hf, encode, path, few_shot(items)))
    assert regime(rows[0], "few_shot")["items"] == 3


def test_bad_shots_lines_are_one_line_errors(tmp_path):
    from cp_onnx.groundtruth.probes import load_suite

    for lines, fragment in (([{"kind": "k", "shots": 3}], '"kind" and "shots" must be non-empty strings'),
                            ([{"kind": "k", "shots": "a"}, {"kind": "k", "shots": "b"}], "gives the shots of kind 'k' again"),
                            ([{"kind": "k", "prompt": "p", "answer": " a", "shots": ["x"]}], '"shots" that are not a string')):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(CpOnnxError, match=fragment) as err:
            load_suite(path)
        assert "\n" not in str(err.value)


def test_regimes_option_and_resume_of_a_two_regime_sweep(tiny_llama_cached, tmp_path, monkeypatch):
    """A sweep killed half-way and resumed writes the same file as one run straight through; --regimes picks one."""
    _, model = tiny_llama_cached
    kwargs = dict(sizes=SMALL_BLOCKS, general=GENERAL, batch_size=3, log=lambda _: None)
    whole = sweep(model, None, SHOT_ITEMS, out=tmp_path / "whole.jsonl", **kwargs)

    def killed_after_2(done, total):
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        sweep(model, None, SHOT_ITEMS, out=out, progress=killed_after_2, **kwargs)
    with open(out, "a") as fh:
        fh.write('{"start": 0, "end": 2, "regimes": {"zero_')  # cut short by the kill
    resumed = sweep(model, None, SHOT_ITEMS, out=out, **kwargs)

    def without_time(lines):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert without_time(out.read_text().splitlines()) == without_time((tmp_path / "whole.jsonl").read_text().splitlines())
    assert [regime(r, "few_shot") for r in resumed] == [regime(r, "few_shot") for r in whole]
    assert read_sweep(out)[0]["regimes"] == ["zero_shot", "few_shot"] and read_sweep(out)[0]["version"] == 2
    with pytest.raises(CpOnnxError, match="regimes zero_shot, few_shot, not few_shot; pass the same --regimes"):
        sweep(model, None, SHOT_ITEMS, out=out, regimes=("few_shot",), **kwargs)
    few = sweep(model, None, SHOT_ITEMS, out=tmp_path / "few.jsonl", regimes=("few_shot",), **kwargs)
    assert [list(r["regimes"]) for r in few] == [["few_shot"]] * len(whole)
    assert [regime(r, "few_shot") for r in few] == [regime(r, "few_shot") for r in whole]  # the same numbers without the zero-shot items
    with pytest.raises(CpOnnxError, match="no probe item has shots"):
        sweep(model, None, ITEMS, out=tmp_path / "none.jsonl", regimes=("few_shot",), **kwargs)


def test_version_1_files_are_read_as_few_shot_and_not_resumed(tiny_llama, tmp_path):
    from cp_onnx.regimes import parse_regimes

    out = tmp_path / "old.jsonl"
    metrics = {"answer_logprob": -2.0, "greedy_accuracy": 0.5, "choice_accuracy": None, "items": 2, "general_nll": 3.0, "by_kind": {}}
    header = {"format": "cp-onnx-sweep", "version": 1, "model": {"onnx_sha256": "0" * 64}, "suite": {"identity": "x"}}
    out.write_text("".join(json.dumps(r) + "\n" for r in [header, {"start": None, "end": None, "path": "0..2", **metrics, "seconds": 1.0}]))
    header, rows = read_sweep(out)
    assert header["regimes"] == ["few_shot"] and rows == [{"start": None, "end": None, "path": "0..2", "seconds": 1.0, "regimes": {"few_shot": metrics}}]
    _, model = tiny_llama
    with pytest.raises(CpOnnxError, match=r"version 1 sweep \(few-shot only, written before regimes\) and cannot be resumed"):
        sweep(model, None, ITEMS, out=out, general=GENERAL, log=lambda _: None)
    assert parse_regimes("few, zero") == ("zero_shot", "few_shot") and parse_regimes("zero_shot") == ("zero_shot",)
    with pytest.raises(CpOnnxError, match="unknown regimes 'one'"):
        parse_regimes("one")


@pytest.mark.parametrize("graph", ["plain", "kv_cache"])
def test_paths_scored_together_equal_each_path_scored_alone(tiny_llama, tiny_llama_cached, graph, monkeypatch):
    """paths_scores stacks the duplicated blocks' rows and runs each layer once for all of them (path_scores, which
    the tests above check against torch, runs one path at a time); a skip, and the base model, run alone."""
    _, model = tiny_llama if graph == "plain" else tiny_llama_cached
    onnx_path = model.onnx_path if graph == "plain" else model.path / "with_past" / "model.onnx"
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731
    plan = ProbePlan(ITEMS, encode, GENERAL, batch_size=2)
    evaluator = evaluators.ReuseEvaluator(onnx_path, plan, threads=1)
    evaluator.stack_tokens = 2 * max(b.input_ids.size for b in plan.batches)  # two paths a call
    streams = max(evaluator.base_context(b)[evaluator.embed].nbytes for b in range(len(plan.batches)))
    monkeypatch.setattr(evaluators, "STACK_BYTES", 3 * streams)  # groups of three paths or fewer
    edits = [Edit.duplicate(0, 1), Edit.duplicate(1, 3), Edit.skip(0, 1), Edit.duplicate(0, 2), Edit.duplicate(2, 3),
             Edit.duplicate(1, 2), Edit()]
    paths = [edit.path(evaluator.num_layers) for edit in edits]
    chosen = list(range(len(plan.batches)))[::-1][: max(2, len(plan.batches) - 1)]
    together = evaluator.paths_scores(paths, chosen)
    for edit, path, scores in zip(edits, paths, together):
        alone = evaluator.path_scores(path, chosen)
        assert len(scores) == len(alone) == len(chosen)
        for (logprob, hit), (expected_logprob, expected_hit) in zip(scores, alone):
            np.testing.assert_allclose(logprob, expected_logprob, atol=1e-5, err_msg=str(edit))
            np.testing.assert_array_equal(hit, expected_hit)


@pytest.mark.parametrize("workers", [1, 3])
def test_token_scores_equal_a_float64_log_softmax_whatever_the_workers(workers):
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((100, 5000)) * 4).astype(np.float32)
    targets = rng.integers(0, 5000, 100)
    targets[:10] = logits[:10].argmax(axis=1)  # some hits
    logprob, hit = token_scores(logits, targets, workers)
    np.testing.assert_allclose(logprob, log_softmax(logits.astype(np.float64), axis=1)[np.arange(100), targets], rtol=1e-6)
    assert hit.tolist() == (logits.argmax(axis=1) == targets).tolist() and hit[:10].all()
