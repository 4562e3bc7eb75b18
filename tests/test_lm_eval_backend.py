"""The lm-eval backend on the tiny Llama, through lm-eval itself (a local YAML task and JSONL file): log-likelihoods
against torch (layers repeated) and cp-onnx's own scoring, rolling log-likelihoods, greedy generation, the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'cp-onnx[lm-eval]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from cp_onnx.cli import main  # noqa: E402
from cp_onnx.errors import CpOnnxError  # noqa: E402
from cp_onnx.models.scoring import ProbeItem  # noqa: E402
from cp_onnx.models.scoring import ProbePlan, token_scores  # noqa: E402
from cp_onnx.lm_eval_backend import CpOnnxLM, join_layer_path, quote_layer_paths  # noqa: E402
from cp_onnx.models.model import open_model  # noqa: E402
from cp_onnx.models.runner import Runner  # noqa: E402
from support import repeated_layers, torch_generate, torch_token_logprob  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
DOCS = [json.loads(line) for line in (TASKS / "items.jsonl").read_text().splitlines()]
ORIGINAL, DUPLICATE = [0, 1, 2], [0, 1, 2, 1, 2]


@pytest.fixture
def in_tasks(monkeypatch):
    monkeypatch.chdir(TASKS)  # the YAML's data_files path is relative to the working directory


def evaluate(model_args, tasks, **kwargs) -> dict:
    results = simple_evaluate(model="cp-onnx", model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                              log_samples=True, batch_size=3, **kwargs)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in results["samples"].items()} | {"results": results["results"]}


def torch_logprob(hf, tokens: list[int], start: int, path: list[int]) -> float:
    """log p(tokens[start:] | tokens[:start]) under torch with the layers of ``path``."""
    return sum(torch_token_logprob(hf, tokens, path, p) for p in range(start, len(tokens)))


def cp_onnx_scores(runner: Runner, model, pairs: list[tuple[str, str]], texts: list[str]) -> list[float]:
    """cp-onnx's own teacher-forced scores: each (context, continuation) as a probe item, each text as a general text."""
    plan = ProbePlan([ProbeItem(str(k), "lm-eval", c, a) for k, (c, a) in enumerate(pairs)], lambda t: model.encode([t])[0][0], texts)
    results = []
    for batch in plan.batches:
        logits = runner.run(batch.input_ids, batch.attention_mask, ["logits"])["logits"]
        results.append(token_scores(logits.reshape(-1, logits.shape[-1])[batch.positions], batch.targets))
    return list(plan.continuation_scores(results)[0])


CONFIGS = {
    "original": (lambda source, applied: f"model={source}", ORIGINAL),
    "duplicate": (lambda source, applied: f"model={source},duplicate=1:3", DUPLICATE),
    "path": (lambda source, applied: f"model={source},path=0..2,1,2", DUPLICATE),  # the path's commas stay in it
    "applied": (lambda source, applied: f"model={applied}", DUPLICATE),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_loglikelihoods_equal_torch_and_cp_onnx_scoring(llama_folder, duplicated, config, in_tasks):
    hf, source = llama_folder
    args, path = CONFIGS[config]
    samples = evaluate(args(source, duplicated), ["cp_onnx_choice", "cp_onnx_text"])
    model = open_model(source)
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731

    pairs, got = [], []
    for doc, sample in zip(DOCS, samples["cp_onnx_choice"], strict=True):
        assert [tuple(a) for a in sample["arguments"]] == [(doc["question"], " " + c) for c in doc["choices"]]
        pairs += [tuple(a) for a in sample["arguments"]]
        got += [float(r[0][0]) for r in sample["resps"]]
    texts = [doc["text"] for doc in DOCS]
    rolling = [float(s["resps"][0][0]) for s in samples["cp_onnx_text"]]

    expected = [torch_logprob(hf, encode(c + a), len(encode(c)), path) for c, a in pairs]
    expected_rolling = [torch_logprob(hf, encode(t), 1, path) for t in texts]  # every token after BOS
    assert got == pytest.approx(expected, abs=1e-4) and rolling == pytest.approx(expected_rolling, abs=1e-4)
    runner = Runner(open_model(duplicated).onnx_path if path == DUPLICATE else model.onnx_path)
    assert got + rolling == pytest.approx(cp_onnx_scores(runner, model, pairs, texts), abs=1e-4)
    picks = [max(range(len(s["resps"])), key=lambda c: float(s["resps"][c][0][0])) for s in samples["cp_onnx_choice"]]
    accuracy = sum(pick == doc["answer"] for pick, doc in zip(picks, DOCS)) / len(DOCS)
    assert samples["results"]["cp_onnx_choice"]["acc,none"] == pytest.approx(accuracy)


def test_generation_equals_torch_greedy_cut_at_stop_strings(llama_folder, in_tasks):
    hf, source = llama_folder
    samples = evaluate(f"model={source},duplicate=1:3", ["cp_onnx_answer"])
    model = open_model(source)
    for doc, sample in zip(DOCS, samples["cp_onnx_answer"], strict=True):
        prompt = f"Q: {doc['question']} A:"
        assert sample["arguments"][0][0] == prompt
        text = model.tokenizer.decode(torch_generate(hf, model.encode([prompt])[0][0], DUPLICATE, 6), skip_special_tokens=True)
        assert sample["resps"][0][0] == text.split("?")[0].split("Q:")[0]


def test_stop_strings_end_generation_early(llama_folder):
    hf, source = llama_folder
    lm = CpOnnxLM(model=str(source), path="0..2,1..2")
    model = open_model(source)
    prompt = "Q: Is seven larger than five? A:"
    full = model.tokenizer.decode(torch_generate(hf, model.encode([prompt])[0][0], DUPLICATE, 12), skip_special_tokens=True)
    stop = full[3:5]  # two characters the greedy text holds, so the cut is certain
    request = Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)
    again = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)
    assert lm.generate_until([request, again]) == [full.split(stop)[0], full]  # one decoder, restarted per prompt


def test_context_longer_than_max_length_loses_its_oldest_tokens(llama_folder):
    hf, source = llama_folder
    lm = CpOnnxLM(model=str(source), max_length=8)
    model = open_model(source)
    context, continuation = "Seven is larger than five", " and"
    tokens = model.encode([context + continuation])[0][0]
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    kept = tokens[-9:]  # 8 inputs: the last 9 tokens less the one predicted last
    assert logprob == pytest.approx(torch_logprob(hf, kept, len(kept) - len(" and"), ORIGINAL), abs=1e-4)


def test_the_command_line_runs_lm_eval_with_the_backend(llama_folder, tmp_path):
    _, source = llama_folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "cp_onnx.cli", "lm-eval", "--model", "cp-onnx", "--model_args",
               f"model={source},path=0..2,1,2", "--tasks", "cp_onnx_choice", "--include_path", str(TASKS), "--output_path", str(tmp_path)]
    done = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [written] = list(tmp_path.rglob("results_*.json"))
    results = json.loads(written.read_text())
    assert results["config"]["model"] == "cp-onnx" and results["config"]["cp_onnx_layer_path"] == "0..2,1..2"
    assert "cp_onnx_choice" in results["results"] and "cp_onnx_choice" in done.stdout


def test_bad_model_args_are_one_line_errors(llama_folder, capsys):
    source = str(llama_folder[1])
    assert main(["lm-eval", "--model", "cp-onnx", "--model_args", f"model={source},duplicate=2:5", "--tasks", "cp_onnx_choice",
                 "--include_path", str(TASKS)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("cp-onnx: error: cannot duplicate block 2:5") and "3 layers" in error
    with pytest.raises(CpOnnxError, match="at most one of duplicate"):
        CpOnnxLM(model=source, duplicate="1:3", path="0..2")
    with pytest.raises(CpOnnxError, match="unknown cp-onnx model_args pretrained"):
        CpOnnxLM.create_from_arg_string(f"model={source},pretrained=gpt2")
    with pytest.raises(CpOnnxError, match="max_length must be a whole number >= 1, not 'long'"):
        CpOnnxLM.create_from_arg_string(f"model={source},max_length=long")
    with pytest.raises(CpOnnxError, match="decodes greedily"):
        CpOnnxLM(model=source).generate_until([Instance("generate_until", {}, ("Q:", {"do_sample": True}), 0)])


def test_layer_paths_keep_their_commas():
    assert join_layer_path("model=m,path=0..14,12,13,14,15..29,batch_size=4") == ["model=m", "path=0..14,12,13,14,15..29", "batch_size=4"]
    assert quote_layer_paths(["--model", "cp-onnx", "--model_args", "model=m,path=0..2,1", "threads=1", "--tasks", "a,b"]) == [
        "--model", "cp-onnx", "--model_args", 'model=m,path="0..2,1"', "threads=1", "--tasks", "a,b"]
    assert quote_layer_paths(["-a", 'path="0..2,1"']) == ["-a", 'path="0..2,1"']  # already quoted: left alone


# ---- the shipped task: cp-onnx's probes asked zero-shot --------------------------------------------------------


def test_shipped_task_is_generated_from_its_seed(tmp_path):
    from cp_onnx.groundtruth import lm_eval_task
    from cp_onnx.groundtruth.probes import probe_suite

    first = lm_eval_task.write_task(tmp_path / "a", per_kind=4)
    again = lm_eval_task.write_task(tmp_path / "b", per_kind=4)
    data = (first / "cp_onnx_probes.jsonl").read_text()
    assert data == (again / "cp_onnx_probes.jsonl").read_text()
    docs = [json.loads(line) for line in data.splitlines()]
    assert [(d["prompt"], d["answer"]) for d in docs] == [(i.prompt, i.answer) for i in probe_suite(lm_eval_task.SEED, 4)]
    assert all(d["prompt"].endswith("\nAnswer:") and d["answer"].startswith(" ") for d in docs)  # zero-shot, no shots
    import yaml

    config = yaml.safe_load((first / "cp_onnx_probes.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(first / "cp_onnx_probes.jsonl")  # found from any directory
    assert config["output_type"] == "loglikelihood" and config["target_delimiter"] == ""


def test_shipped_task_scores_each_answer_as_torch_does(llama_folder, tmp_path):
    """acc: every answer token is torch's greedy choice; perplexity: exp of minus the mean answer log-probability."""
    import math

    import torch

    from cp_onnx.groundtruth import lm_eval_task

    hf, source = llama_folder
    folder = lm_eval_task.write_task(tmp_path / "task", per_kind=3)
    results = simple_evaluate(model="cp-onnx", model_args=f"model={source},duplicate=1:3", tasks=["cp_onnx_probes"],
                              task_manager=TaskManager(include_path=str(folder), include_defaults=False), batch_size=4, bootstrap_iters=200)
    docs = [json.loads(line) for line in (folder / "cp_onnx_probes.jsonl").read_text().splitlines()]
    model = open_model(source)
    greedy, logprobs = [], []
    for doc in docs:
        context, whole = model.encode([doc["prompt"]])[0][0], model.encode([doc["prompt"] + doc["answer"]])[0][0]
        answer = len(whole) - len(context)
        whole = whole[-129:]  # the backend keeps the last max_length (128, the tiny model's positions) inputs
        with repeated_layers(hf, "llama", DUPLICATE), torch.no_grad():
            logits = hf(torch.tensor([whole[:-1]]), use_cache=False).logits[0, -answer:]
        targets = torch.tensor(whole[-answer:])
        greedy.append(bool((logits.argmax(-1) == targets).all()))
        logprobs.append(float(torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets].sum()))
    scores = results["results"]["cp_onnx_probes"]
    assert scores["acc,none"] == pytest.approx(sum(greedy) / len(docs))
    assert scores["perplexity,none"] == pytest.approx(math.exp(-sum(logprobs) / len(docs)), rel=1e-4)
    assert scores["acc_stderr,none"] > 0 or sum(greedy) in (0, len(docs))


def test_the_command_line_finds_the_shipped_task_by_itself(llama_folder, tmp_path):
    _, source = llama_folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "CP_ONNX_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "cp_onnx.cli", "lm-eval", "--model", "cp-onnx", "--model_args", f"model={source}",
               "--tasks", "cp_onnx_probes", "--limit", "8"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cp_onnx_probes" in done.stdout and "acc" in done.stdout and "perplexity" in done.stdout
    assert (tmp_path / "cache" / "lm_eval_tasks" / "seed2" / "cp_onnx_probes.jsonl").is_file()
