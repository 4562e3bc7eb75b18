"""Fuzzing: every input kind mutated (seeded, tests/mutators.py), each case a cp-onnx command in a child process; every
case must end in success or exit 2 with one line `cp-onnx: error: ...`: no traceback, native crash, hang, kill or
partial output (tests/fuzzing.py says how each is told apart). The default run takes a subset of each kind (a few
hundred cases of each new format: GGUF, TOML, calibration questions, tokenizer.json); the full run is a hardening
run (marker `hardening`, deselected by default: docs/SECURITY.md) that writes its counts where
$CP_ONNX_FUZZ_RESULTS says."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import onnx
import pytest

import fuzzing
import mutators
from cp_onnx.calibration import DATA_DIR, shipped_texts
from cp_onnx.cli import main
from cp_onnx.groundtruth import probes
from support import build_hf_model, places, save_tokenizer, tiny_tokenizer, write_tiny_folder

ANALYZE = ["--method", "stability", "-n", "3", "--max-length", "12", "--block-sizes", "1", "--threads", "1"]
# The zero-shot prediction on the questions (a byte-level tokenizer: the shipped questions are under 400 tokens with answers).
ZERO_SHOT = ["--regime", "zero", "--method", "duplication_loss", "-n", "3", "--max-length", "400", "--block-sizes", "1", "--threads", "1"]
QUESTION_LINES = "1000"  # CP_ONNX_MAX_LINES in the questions' cases: a file of 1,500 lines reaches it
# The default run's subset, about 2 minutes on 2 busy cores: the cheap formats by the hundred (a TOML manifest or a JSON
# report is read in tens of ms), fewer of those whose valid cases run an analysis (about 1 s) or an export (2 s).
FAST = {"model": 16, "report": 60, "sweep": 16, "manifest": 12, "batch": 200, "calibration": 10, "probes": 4,
        "gguf": 100, "questions": 50, "tokenizer": 50}
# The hardening run: cheap kinds most (a report or sweep read in 50 ms); a case that analyses the tiny model costs 0.6 s,
# a probe suite's sweep 1 s, a GGUF that passes the header walk an export (2 to 4 s).
FULL = {"model": 1000, "report": 4600, "sweep": 2000, "manifest": 350, "batch": 1400, "calibration": 450, "probes": 200,
        "gguf": 1000, "questions": 600, "tokenizer": 600}


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """The tiny llama folder, its report, a sweep of it, a GGUF of a tiny llama (and where its fields lie), the shipped
    questions: the inputs every mutation starts from."""
    from exporters.hf_gguf import write_gguf

    root = tmp_path_factory.mktemp("fuzz-base")
    folder = write_tiny_folder(tiny_model, "llama", root / "llama")
    build_hf_model("llama", root / "hf")
    save_tokenizer(root / "hf", tiny_tokenizer())
    gguf = write_gguf(root / "hf", root / "tiny.gguf", add_bos=True)
    questions = [json.loads(line) for line in (DATA_DIR / "calibration" / "reasoning_en.jsonl").read_text().splitlines()]
    assert main(["analyze", str(folder), "--out", str(root / "a"), *ANALYZE]) == 0
    suite = probes.probe_suite(0, per_kind=1)
    probes.save_suite(suite, root / "suite.jsonl")
    assert main(["sweep", str(folder), "--suite", str(root / "suite.jsonl"), "--blocks", "1", "--threads", "1",
                 "--out", str(root / "sweep.jsonl")]) == 0
    return {"root": root, "folder": folder, "report": json.loads((root / "a" / "report.json").read_text()),
            "sweep": (root / "sweep.jsonl").read_text().splitlines(), "suite": (root / "suite.jsonl").read_text().splitlines(),
            "model": onnx.load(str(folder / "model.onnx")), "manifest": _manifest(folder), "gguf": gguf.read_bytes(), "places": places(gguf),
            "questions": [q for q in questions if "answer" in q][:12], "tokenizer": json.loads((folder / "tokenizer.json").read_text())}


def _manifest(folder: Path) -> dict:
    """A cp_onnx.json for the tiny folder as export writes it (the fixture's folder has none)."""
    return {"format": "cp-onnx-model/1", "source": "tiny", "source_kind": "hf", "weights_sha256": "0" * 64, "family": "llama",
            "kind": "decoder", "num_layers": 3, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 256,
            "bos_token_id": None, "add_bos": False, "exporter": {}, "layer_path": None, "cache_key": "tiny",
            "onnx": {"model": "model.onnx", "with_past": None, "model_data": None, "with_past_data": None}}


def _model_folder(base, case: Path, model=None) -> Path:
    folder = case / "model"
    folder.mkdir()
    if isinstance(model, bytes):
        (folder / "model.onnx").write_bytes(model)
    elif model is not None:
        onnx.save_model(model, str(folder / "model.onnx"))
    else:
        shutil.copy(base["folder"] / "model.onnx", folder / "model.onnx")
    shutil.copy(base["folder"] / "tokenizer.json", folder / "tokenizer.json")
    return folder


def make_case(kind: str, base: dict, rng: random.Random, case: Path) -> fuzzing.Case:
    """One mutated input of ``kind`` written under ``case``, and the command that reads it."""
    case.mkdir(parents=True)
    out = case / "out"
    report = case / "report.json"
    if kind == "model":
        mutated, how = mutators.mutate_model(base["model"], rng)
        folder = _model_folder(base, case, mutated)
        return fuzzing.Case(kind, ["analyze", str(folder), "--out", str(out), *ANALYZE], case, [out / "report.json"], how)
    if kind == "report":
        text, how = mutators.mutate_json(base["report"], rng)
        report.write_bytes(mutators.as_bytes(text, rng) if how == "text" else text.encode())
        command = rng.choice([["report", str(report), "--text"], ["report", str(report)],
                              ["embed", str(report), str(base["folder"] / "model.onnx"), "--out", str(out / "m.onnx"), "--force"]])
        return fuzzing.Case(kind, command, case, [out / "m.onnx"], how)
    if kind == "sweep":
        header, *rows = base["sweep"]
        target = rng.randrange(len(base["sweep"]))
        text, how = mutators.mutate_json(json.loads(base["sweep"][target]), rng)
        lines = list(base["sweep"])
        lines[target] = text.replace("\n", " ") if how != "text" else text
        (case / "sweep.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
        report.write_text(json.dumps(base["report"]))
        if rng.random() < 0.7:  # reading and checking, as the HTML page's validation table does first (cheap)
            command = ["report", str(report), "--sweep", str(case / "sweep.jsonl"), "--text"]
        else:  # and validate's tables and heatmap
            command = ["validate", str(report), str(case / "sweep.jsonl"), "--out", str(out)]
        return fuzzing.Case(kind, command, case, [out / "validation.json", *(out / f"sweep_heatmap_{r}.png" for r in ("zero_shot", "few_shot"))], f"line {target + 1} {how}")
    if kind == "manifest":
        folder = _model_folder(base, case)
        text, how = mutators.mutate_json(base["manifest"], rng)
        (folder / "cp_onnx.json").write_bytes(mutators.as_bytes(text, rng) if how == "text" else text.encode())
        return fuzzing.Case(kind, ["analyze", str(folder), "--out", str(out), *ANALYZE], case, [out / "report.json"], how)
    if kind == "batch":
        data = {"out": "batch-out", "settings": {"methods": ["stability"], "n": 3, "max_length": 12, "block_sizes": [1], "threads": 1},
                "models": [{"source": str(base["folder"]), "name": "tiny"}]}
        toml, how = mutators.mutate_toml(data, rng)
        (case / "batch.toml").write_bytes(toml.encode("utf-8", "surrogatepass"))
        return fuzzing.Case(kind, ["batch", str(case / "batch.toml")], case, [case / "batch-out" / "tiny" / "report.json"], how, failed_ok=True)
    if kind == "gguf":
        data, how = mutators.mutate_gguf(base["gguf"], base["places"], rng)
        (case / "model.gguf").write_bytes(data)
        return fuzzing.Case(kind, ["export", str(case / "model.gguf"), "--out", str(out)], case, [out], how)
    if kind == "questions":
        data, how = mutators.mutate_questions(base["questions"], rng)
        (case / "questions.jsonl").write_bytes(data)
        return fuzzing.Case(kind, ["analyze", str(base["folder"]), "--calibration", str(case / "questions.jsonl"), "--out", str(out), *ZERO_SHOT],
                            case, [out / "report.json"], how, env={"CP_ONNX_MAX_LINES": QUESTION_LINES})
    if kind == "tokenizer":
        folder = _model_folder(base, case)
        text, how = mutators.mutate_tokenizer(base["tokenizer"], rng)
        (folder / "tokenizer.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        return fuzzing.Case(kind, ["analyze", str(folder), "--out", str(out), *ANALYZE], case, [out / "report.json"], how)
    if kind == "calibration":
        jsonl = rng.random() < 0.5
        texts = shipped_texts("reasoning")[:6]
        lines = [json.dumps({"text": t}) for t in texts] if jsonl else texts
        if jsonl and rng.random() < 0.5:  # one line's JSON damaged: its types, depth, size
            text, how = _damaged_line(lines, rng)
        else:
            text, how = mutators.mutate_lines(lines, rng)
        path = case / ("texts.jsonl" if jsonl else "texts.txt")
        path.write_bytes(mutators.as_bytes(text, rng))
        folder = _model_folder(base, case)
        return fuzzing.Case(kind, ["analyze", str(folder), "--calibration", str(path), "--out", str(out), *ANALYZE], case,
                            [out / "report.json"], how)
    if kind == "probes":
        if rng.random() < 0.5:  # one item's JSON damaged: its types (options among them), depth, size
            text, how = _damaged_line(base["suite"], rng)
        else:
            text, how = mutators.mutate_lines(base["suite"], rng)
        (case / "suite.jsonl").write_bytes(mutators.as_bytes(text, rng))
        return fuzzing.Case(kind, ["sweep", str(base["folder"]), "--suite", str(case / "suite.jsonl"), "--blocks", "3", "--threads", "1",
                                   "--out", str(case / "sweep.jsonl")], case, [case / "sweep.jsonl"], how)
    raise ValueError(kind)


def _damaged_line(lines: list[str], rng: random.Random) -> tuple[str, str]:
    """A JSONL file of ``lines`` with one line's JSON damaged (mutators.mutate_json), and what was done."""
    k = rng.randrange(len(lines))
    damaged, how = mutators.mutate_json(json.loads(lines[k]), rng)
    return "\n".join(lines[:k] + [damaged.replace("\n", " ")] + lines[k + 1 :]) + "\n", f"line {k + 1} {how}"


def fuzz(base, root: Path, counts: dict[str, int], seed: int) -> fuzzing.Tally:
    """``counts`` cases of each kind, made in that order from one seeded generator, run by one pair of fork servers
    (importing what an export needs too: starting servers costs seconds, a case tens of milliseconds)."""
    rng = random.Random(seed)
    tally = fuzzing.Tally()
    cases = (make_case(kind, base, rng, root / kind / str(i)) for kind, count in counts.items() for i in range(count))
    began = time.monotonic()
    fuzzing.run_cases(cases, tally, preload=fuzzing.EXPORT_PRELOAD)
    tally.wall = time.monotonic() - began
    return tally


def _report(tally: fuzzing.Tally) -> str:
    return tally.table() + "\n\n" + "\n".join(f"{k}: {line}" for k, v in tally.bad().items() for line in v[:40])


def test_fuzz_fast_subset(base, tmp_path):
    tally = fuzz(base, tmp_path, FAST, seed=1)
    assert not tally.bad(), _report(tally)
    for kind, count in FAST.items():
        assert sum(tally.counts[kind].values()) == count
        assert tally.counts[kind]["error"] > 0  # the mutations do reach the checks
    for kind in ("gguf", "batch", "questions", "tokenizer"):
        assert tally.counts[kind]["ok"] > 0  # and some inputs stay valid: the commands still work on them


@pytest.mark.hardening
def test_fuzz_full(base, tmp_path):
    tally = fuzz(base, tmp_path, FULL, seed=2)
    results = os.environ.get("CP_ONNX_FUZZ_RESULTS")
    if results:
        Path(results).write_text(fuzzing.tally_to_json(tally) + "\n\n" + _report(tally) + "\n")
    assert sum(FULL.values()) >= 10_000
    assert not tally.bad(), _report(tally)


# What the fuzzing found, each kept as a plain test of the check that now stops it.

def _tiny_graph(tensor: onnx.TensorProto, name: str = "add") -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", tensor.name], ["y"], name=name)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("damage, message", [
    ("name", "not UTF-8 text"),  # flipped bytes in a name: protobuf hands over bytes, and discovery's regexes fail
    ("string_raw", "holds strings as raw bytes"),  # a dtype changed to STRING: numpy cannot read the weight
    ("typed_count", "holds 3 values but its shape [4] needs 4"),  # a dtype changed: the values sit in another field
    ("undefined", "has no known element type"),
])
def test_damaged_graphs_found_by_fuzzing_are_one_line_errors(tmp_path, damage, message):
    from onnx import TensorProto, helper

    from graph_passes.errors import GraphPassError
    from graph_passes.mapped import load_mapped

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    if damage == "string_raw":
        tensor = TensorProto(name="w", data_type=TensorProto.STRING, dims=[4], raw_data=b"\0" * 16)
    elif damage == "typed_count":
        del tensor.float_data[-1]
    elif damage == "undefined":
        tensor.data_type = TensorProto.UNDEFINED
    data = _tiny_graph(tensor, "NODE").SerializeToString()
    if damage == "name":
        data = data.replace(b"NODE", b"\xff\xfe\xfd\xfc")
    (tmp_path / "model.onnx").write_bytes(data)
    with pytest.raises(GraphPassError, match=re.escape(message)):
        load_mapped(tmp_path / "model.onnx")


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
    ('{"format": "cp-onnx-report", "version": 2, "model": {"name": "m", "num_layers": 1e400}, "layers": [], "methods": {}}',
     "model.num_layers should be integer, not Infinity"),
    ('{"format": "cp-onnx-report", "version": 2, "model": {"name": "m", "num_layers": 3}, "layers": [{"layer": 0}], '
     '"methods": {"m": {"blocks": [{"start": 0, "end": 9, "score": 1, "metrics": {}}]}}}', r"names block \[0, 9\), not a block"),
    ('{"format": "cp-onnx-report", "version": 2, "model": {"name": "m", "num_layers": 3}, "layers": [{"layer": 0, "x": NaN}], '
     '"methods": {}}', r"layers\[0\].x should be number or null, not NaN"),
])
def test_damaged_reports_found_by_fuzzing_are_one_line_errors(tmp_path, text, message):
    from cp_onnx.analysis.report import read_report
    from cp_onnx.errors import CpOnnxError

    (tmp_path / "report.json").write_text(text)
    with pytest.raises(CpOnnxError, match=message):
        read_report(tmp_path / "report.json")


@pytest.mark.parametrize("onnx_entry, sizes, message", [
    ({"model": "x" * 5000}, {}, "names an impossible path"),
    ({"model": "model\u0000.onnx"}, {}, "names an impossible path"),
    ({"model": None}, {"num_heads": 10**100}, r"num_heads should be at most 2147483648"),  # it fed the memory estimate
])
def test_damaged_manifests_found_by_fuzzing_are_one_line_errors(tmp_path, onnx_entry, sizes, message):
    from cp_onnx.errors import CpOnnxError
    from cp_onnx.models.model import open_model

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "cp_onnx.json").write_text(json.dumps({"source": "m", "onnx": onnx_entry, **sizes}))
    with pytest.raises(CpOnnxError, match=message):
        open_model(tmp_path)


def test_a_manifest_with_a_null_model_path_means_model_onnx(tmp_path):
    from cp_onnx.models.model import open_model

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "cp_onnx.json").write_text(json.dumps({"source": "m", "onnx": {"model": None}}))
    assert open_model(tmp_path).onnx_path == (tmp_path / "model.onnx").resolve()


@pytest.mark.parametrize("line", ['out = "' + "x" * 5000 + '"', 'out = "\\u0000\\u001b[31m"', 'out = "a\\u0000b"', 'settings = {calibration = "' + "y" * 5000 + '.txt"}'])
def test_batch_manifests_with_impossible_paths_found_by_fuzzing(tmp_path, line):
    from cp_onnx.batch import load_manifest
    from cp_onnx.errors import CpOnnxError

    (tmp_path / "batch.toml").write_text(f'{line}\n[[models]]\nsource = "smollm2"\nname = "ok"\n')
    with pytest.raises(CpOnnxError, match="not a usable path"):
        load_manifest(tmp_path / "batch.toml")


def test_batch_model_names_are_short_file_names(tmp_path):
    from cp_onnx.batch import load_manifest
    from cp_onnx.errors import CpOnnxError

    (tmp_path / "batch.toml").write_text(f'[[models]]\nsource = "smollm2"\nname = "{"n" * 101}"\n')
    with pytest.raises(CpOnnxError, match="use up to 100 letters"):
        load_manifest(tmp_path / "batch.toml")


@pytest.mark.parametrize("change, outcome", [
    # an empty-matching regex in a Replace normalizer: a Rust panic (PanicException, a BaseException) in every encode
    ({"normalizer": {"type": "Replace", "pattern": {"Regex": ""}, "content": "aa"}}, "PanicException: index out of bounds"),
    # truncation whose stride is not below its length: a panic too; cp-onnx now switches the file's truncation off
    ({"truncation": {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 256}}, None),
    # an added token of 100,000 characters: the library took 21 s to build its matcher (a hang at 60 s with a few more)
    ({"added_tokens": [{"id": 256, "content": "a" * 100_000, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True}]}, "added_tokens[0].content should be 1 to 1000 characters long, not 100,000"),
    # a pre-tokenizer regex that backtracks: Oniguruma stops at its retry limit, and the library panics
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}},
     "PanicException: Onig: Regex search error: retry-limit-in-match over"),
])
def test_tokenizers_found_by_fuzzing(base, tmp_path, capsys, change, outcome):
    folder = _model_folder(base, tmp_path)
    (folder / "tokenizer.json").write_text(json.dumps({**base["tokenizer"], **change}))
    texts = tmp_path / "texts.txt"
    texts.write_text("Tom has 3 apples and buys 4 more.\n" + "a" * 40 + "b\n")  # a run that (a+)+$ backtracks over
    code = main(["analyze", str(folder), "--calibration", str(texts), "--out", str(tmp_path / "out"), *ANALYZE])
    err = capsys.readouterr().err.strip().splitlines()
    if outcome is None:
        assert code == 0 and (tmp_path / "out" / "report.json").is_file()
    else:
        assert code == 2 and err[-1].startswith(f"cp-onnx: error: {folder / 'tokenizer.json'}") and outcome in err[-1]
        assert not (tmp_path / "out").exists()


def test_a_constant_declaring_more_than_it_holds_found_by_fuzzing(tmp_path):
    """A Constant node's int64 value of shape [2**30] holding 8 bytes (an attribute's dims mutated): its declaration
    (8.6 GB) is within the per-tensor limit, and ONNX shape inference's data propagation, which discovery runs,
    materialised it: 5.5 GB resident before onnxruntime refused the graph (a kill on a smaller machine). Inline bytes
    are now checked against the shape at every size, before discovery."""
    from onnx import TensorProto, helper

    from graph_passes.errors import GraphPassError
    from graph_passes.mapped import load_mapped

    value = TensorProto(name="c", data_type=TensorProto.INT64, dims=[1 << 30], raw_data=b"\0" * 8)
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], name="shape", value=value),
                               helper.make_node("Reshape", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    with pytest.raises(GraphPassError, match=re.escape("Constant node 'shape' holds 8 bytes but its shape [1073741824] needs 8589934592")):
        load_mapped(tmp_path / "model.onnx")


def test_an_error_quoting_a_file_stays_one_line_found_by_fuzzing(tmp_path, capsys):
    """A report whose "version" was 600,000 characters of U+2028 (a line separator) and U+D7FF: the error quoted it whole,
    1.8 MB over 300,000 lines. Values are now quoted shortened, and every message is printed as one line: what breaks
    a line or drives a terminal escaped, a long one cut in its middle."""
    from cp_onnx.errors import MESSAGE_CHARS, one_line

    (tmp_path / "report.json").write_text(json.dumps({"format": "cp-onnx-report", "version": "\u2028\ud7ff" * 300_000}))
    assert main(["report", str(tmp_path / "report.json"), "--text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 500 and 'is report version "\\u2028\\ud7ff' in err
    assert one_line("a\nb\u2028c\x1b[2Jd\x00") == "a\\nb\\u2028c\\x1b[2Jd\\x00"
    long = one_line("what is wrong " + "x" * 10_000 + " what to do")
    assert len(long) == MESSAGE_CHARS + 5 and long.startswith("what is wrong") and long.endswith("what to do")
