"""Fuzzing: every input kind mutated (seeded), each case a cp-onnx command in a child process; every case must
end in success or exit 2 with one line `cp-onnx: error: ...`: no traceback, native crash, hang or partial
output (tests/fuzzing.py says how each is told apart). The default run takes a fast subset of each kind;
the full run (marked slow, >= 10,000 cases) writes its counts where $CP_ONNX_FUZZ_RESULTS says."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import onnx
import pytest

import fuzzing
from cp_onnx.calibration import shipped_texts
from cp_onnx.cli import main
from cp_onnx.groundtruth import probes
from test_embed import tiny_folder

ANALYZE = ["--method", "stability", "-n", "3", "--max-length", "12", "--block-sizes", "1", "--threads", "1"]
FAST = {"model": 16, "report": 20, "sweep": 12, "manifest": 8, "batch": 12, "calibration": 10, "probes": 4}
# About 10 minutes on 2 cores: most cases are the cheap kinds (a report or sweep read in 50 ms); a case that
# analyses the tiny model costs 0.8 s, and a probe suite's sweep 1 s.
FULL = {"model": 1000, "report": 4600, "sweep": 2000, "manifest": 350, "batch": 1400, "calibration": 450, "probes": 200}


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """The tiny llama folder, its report and a sweep of it: the inputs every mutation starts from."""
    root = tmp_path_factory.mktemp("fuzz-base")
    folder = tiny_folder(tiny_model, "llama", root / "llama")
    assert main(["analyze", str(folder), "--out", str(root / "a"), *ANALYZE]) == 0
    suite = probes.probe_suite(0, per_kind=1)
    probes.save_suite(suite, root / "suite.jsonl")
    assert main(["sweep", str(folder), "--suite", str(root / "suite.jsonl"), "--blocks", "1", "--threads", "1",
                 "--out", str(root / "sweep.jsonl")]) == 0
    return {"root": root, "folder": folder, "report": json.loads((root / "a" / "report.json").read_text()),
            "sweep": (root / "sweep.jsonl").read_text().splitlines(), "suite": (root / "suite.jsonl").read_text().splitlines(),
            "model": onnx.load(str(folder / "model.onnx")), "manifest": _manifest(folder)}


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
        mutated, how = fuzzing.mutate_model(base["model"], rng)
        folder = _model_folder(base, case, mutated)
        return fuzzing.Case(kind, ["analyze", str(folder), "--out", str(out), *ANALYZE], case, [out / "report.json"], how)
    if kind == "report":
        text, how = fuzzing.mutate_json(base["report"], rng)
        report.write_bytes(fuzzing.as_bytes(text, rng) if how == "text" else text.encode())
        command = rng.choice([["report", str(report), "--text"], ["report", str(report)],
                              ["embed", str(report), str(base["folder"] / "model.onnx"), "--out", str(out / "m.onnx"), "--force"]])
        return fuzzing.Case(kind, command, case, [out / "m.onnx"], how)
    if kind == "sweep":
        header, *rows = base["sweep"]
        target = rng.randrange(len(base["sweep"]))
        text, how = fuzzing.mutate_json(json.loads(base["sweep"][target]), rng)
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
        text, how = fuzzing.mutate_json(base["manifest"], rng)
        (folder / "cp_onnx.json").write_bytes(fuzzing.as_bytes(text, rng) if how == "text" else text.encode())
        return fuzzing.Case(kind, ["analyze", str(folder), "--out", str(out), *ANALYZE], case, [out / "report.json"], how)
    if kind == "batch":
        data = {"out": "batch-out", "settings": {"methods": ["stability"], "n": 3, "max_length": 12, "block_sizes": [1], "threads": 1},
                "models": [{"source": str(base["folder"]), "name": "tiny"}]}
        text, how = fuzzing.mutate_json(data, rng)
        try:
            toml = fuzzing.toml_text(json.loads(text))
        except (ValueError, RecursionError):  # a damaged or too deep JSON text: TOML gets damaged text too
            toml, how = fuzzing.damage_text(fuzzing.toml_text(data), rng), how + "+text"
        (case / "batch.toml").write_bytes(toml.encode("utf-8", "surrogatepass"))
        return fuzzing.Case(kind, ["batch", str(case / "batch.toml")], case, [], how, failed_ok=True)
    if kind == "calibration":
        jsonl = rng.random() < 0.5
        texts = shipped_texts("reasoning")[:6]
        lines = [json.dumps({"text": t}) for t in texts] if jsonl else texts
        text, how = fuzzing.mutate_lines(lines, rng)
        path = case / ("texts.jsonl" if jsonl else "texts.txt")
        path.write_bytes(fuzzing.as_bytes(text, rng))
        folder = _model_folder(base, case)
        return fuzzing.Case(kind, ["analyze", str(folder), "--calibration", str(path), "--out", str(out), *ANALYZE], case,
                            [out / "report.json"], how)
    if kind == "probes":
        text, how = fuzzing.mutate_lines(base["suite"], rng)
        (case / "suite.jsonl").write_bytes(fuzzing.as_bytes(text, rng))
        return fuzzing.Case(kind, ["sweep", str(base["folder"]), "--suite", str(case / "suite.jsonl"), "--blocks", "3", "--threads", "1",
                                   "--out", str(case / "sweep.jsonl")], case, [case / "sweep.jsonl"], how)
    raise ValueError(kind)


def fuzz(base, root: Path, counts: dict[str, int], seed: int) -> fuzzing.Tally:
    rng = random.Random(seed)
    tally = fuzzing.Tally()
    for kind, count in counts.items():
        cases = (make_case(kind, base, rng, root / kind / str(i)) for i in range(count))
        fuzzing.run_cases(cases, tally)
    return tally


def _report(tally: fuzzing.Tally) -> str:
    return tally.table() + "\n\n" + "\n".join(f"{k}: {line}" for k, v in tally.bad().items() for line in v[:40])


def test_fuzz_fast_subset(base, tmp_path):
    tally = fuzz(base, tmp_path, FAST, seed=1)
    assert not tally.bad(), _report(tally)
    for kind, count in FAST.items():
        assert sum(tally.counts[kind].values()) == count
        assert tally.counts[kind]["error"] > 0  # the mutations do reach the checks


@pytest.mark.slow
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
    ('{"format": "cp-onnx-report", "version": 1, "model": {"name": "m", "num_layers": 1e400}, "layers": [], "methods": {}}',
     "model.num_layers should be integer, not Infinity"),
    ('{"format": "cp-onnx-report", "version": 1, "model": {"name": "m", "num_layers": 3}, "layers": [{"layer": 0}], '
     '"methods": {"m": {"blocks": [{"start": 0, "end": 9, "score": 1, "metrics": {}}]}}}', r"names block \[0, 9\), not a block"),
    ('{"format": "cp-onnx-report", "version": 1, "model": {"name": "m", "num_layers": 3}, "layers": [{"layer": 0, "x": NaN}], '
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
