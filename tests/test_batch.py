"""`cp-onnx batch`: every report and the summary, failures recorded, resumable after a kill, sweep and validate."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from cp_onnx.analysis import report as report_mod
from cp_onnx.batch import load_manifest
from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from support import tiny_report, write_tiny_folder

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "[settings]\nn = 6\nblock_sizes = [1, 2]\n"


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch-models")
    return {family: write_tiny_folder(tiny_model, family, root / family) for family in ("llama", "qwen2")}


def manifest(path: Path, folders: dict, *extra: str, settings: str = SETTINGS) -> Path:
    """A manifest of the tiny models (by absolute path) plus ``extra`` [[models]] bodies."""
    entries = [f'source = "{folder}"' for folder in folders.values()] + list(extra)
    path.write_text(settings + "".join(f"\n[[models]]\n{body}\n" for body in entries))
    return path


def statuses(out: Path) -> dict[str, str]:
    return {m["name"]: m["status"] for m in json.loads((out / "batch.json").read_text())["models"]}


def mtimes(out: Path) -> dict[str, tuple[int, int]]:
    """Per model, its report's inode and mtime: an atomic rewrite changes both."""
    return {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/report.json")}


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings"}


def test_batch_reports_summary_failure_and_resume(folders, tmp_path, capsys):
    path = manifest(tmp_path / "m.toml", folders, 'source = "missing/model.onnx"\nname = "broken"')
    assert main(["batch", str(path)]) == 1  # one model failed, the others went on
    err = capsys.readouterr().err
    out = tmp_path / "m-out"
    assert "batch 3/3: broken failed" in err and "ETA" in err

    for family, folder in folders.items():
        written = json.loads((out / family / "report.json").read_text())
        jsonschema.validate(written, report_mod.schema())
        assert without_timings(written) == without_timings(tiny_report(folder))  # what analyze gives on its own

    with open(out / "summary.csv", newline="") as fh:
        rows = {row["name"]: row for row in csv.DictReader(fh)}
    assert [rows[n]["status"] for n in ("llama", "qwen2", "broken")] == ["analyzed", "analyzed", "failed"]
    for family in folders:
        top = json.loads((out / family / "report.json").read_text())["methods"]["stability"]["blocks"][0]
        assert rows[family]["stability_block"] == f"{top['start']}:{top['end']}"
        assert rows[family]["layers"] == "3" and rows[family]["error"] == ""
    assert "does not exist" in rows["broken"]["error"]
    markdown = (out / "summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 3 and markdown[0].startswith("| name | status |")
    batch = json.loads((out / "batch.json").read_text())
    assert [f["name"] for f in batch["failures"]] == ["broken"]
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    # Run again: finished models are skipped (their reports untouched), the failed one is retried.
    before = mtimes(out)
    assert main(["batch", str(path)]) == 1
    assert statuses(out) == {"llama": "skipped", "qwen2": "skipped", "broken": "failed"}
    assert mtimes(out) == before

    # Another calibration setting for one model: its identity differs, so only it is analysed again.
    manifest(path, {"llama": folders["llama"]}, f'source = "{folders["qwen2"]}"\nn = 4')
    assert main(["batch", str(path)]) == 0
    capsys.readouterr()
    assert statuses(out) == {"llama": "skipped", "qwen2": "analyzed"}
    assert json.loads((out / "qwen2" / "report.json").read_text())["calibration"]["n"] == 4


def test_batch_with_every_section_equals_cp_onnx_analyze(folders, tmp_path, capsys):
    """A manifest asking for jacobian, heads and prune writes the report `cp-onnx analyze` writes with the same flags."""
    folder = folders["llama"]
    settings = SETTINGS + "jacobian = true\nheads = true\nprune = true\n"
    path = manifest(tmp_path / "all.toml", {"llama": folder}, settings=settings)
    assert main(["batch", str(path)]) == 0
    alone = tmp_path / "alone"
    assert main(["analyze", str(folder), "-n", "6", "--block-sizes", "1,2", "--jacobian", "--heads", "--prune",
                 "--out", str(alone)]) == 0
    capsys.readouterr()
    batched = json.loads((tmp_path / "all-out" / "llama" / "report.json").read_text())
    single = json.loads((alone / "report.json").read_text())
    assert {"jacobian", "heads", "pruning"} <= set(single)  # the sections were really computed
    assert without_timings(batched) == without_timings(single)
    circuit = sorted(p.name for p in alone.iterdir() if p.name != "report.json")
    assert circuit and circuit == sorted(p.name for p in (tmp_path / "all-out" / "llama").iterdir() if p.name != "report.json")


def test_killed_batch_resumes_without_redoing_or_losing(folders, tmp_path):
    extra = f'source = "{folders["llama"]}"\nname = "llama-n4"\nn = 4'
    path = manifest(tmp_path / "k.toml", folders, extra)
    out = tmp_path / "k-out"
    command = [sys.executable, "-m", "cp_onnx.cli", "batch", str(path)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in process.stderr:
            if line.startswith("batch 1/3"):
                os.kill(process.pid, signal.SIGKILL)  # as hard as a kill gets: no cleanup code runs
                break
    finally:
        process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    finished = mtimes(out)
    assert "llama" in finished and len(finished) < 3

    assert main(["batch", str(path)]) == 0
    done = statuses(out)
    assert done["llama"] == "skipped" and all(done[name] == "analyzed" for name in {"qwen2", "llama-n4"} - set(finished))
    assert {k: v for k, v in mtimes(out).items() if k in finished} == finished  # not redone
    assert set(mtimes(out)) == {"llama", "qwen2", "llama-n4"}  # none lost
    assert not [p for p in out.rglob(".*")]


def test_batch_sweeps_and_validates(folders, tmp_path, capsys):
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps(item) + "\n" for item in (
        {"kind": "arithmetic", "prompt": "Q: 2+3=", "answer": " 5"},
        {"kind": "syllogism", "prompt": "All A are B. x is A. Is x B?", "answer": " yes", "options": [" yes", " no"]},
        {"kind": "arithmetic", "prompt": "Q: 17+1=", "answer": " 18"})))
    path = tmp_path / "s.toml"
    path.write_text(SETTINGS + f'\n[sweep]\nsizes = [1]\nprobes = "suite.jsonl"\ngeneral = false\n\n[[models]]\nsource = "{folders["llama"]}"\n')
    assert main(["batch", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "s-out"
    lines = (out / "llama" / "sweep.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    assert [(r["start"], r["end"]) for r in rows] == [(None, None), (0, 1), (1, 2), (2, 3)]
    assert all(list(r["regimes"]) == ["zero_shot"] for r in rows)  # no item has shots: zero-shot only
    base = rows[0]["regimes"]["zero_shot"]["answer_logprob"]
    gains = {(r["start"], r["end"]): r["regimes"]["zero_shot"]["answer_logprob"] - base for r in rows[1:]}
    best = max(gains, key=gains.get)
    validation = json.loads((out / "llama" / "validation.json").read_text())["regimes"]
    assert list(validation) == ["zero_shot"]
    assert (validation["zero_shot"]["best"]["answer_logprob"]["start"], validation["zero_shot"]["best"]["answer_logprob"]["end"]) == best
    with open(out / "summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["best_block_zero_shot"] == f"{best[0]}:{best[1]}" and float(row["best_gain_zero_shot"]) == pytest.approx(gains[best], rel=1e-3)


def test_manifest_accepts_every_analyze_method(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[settings]\nmethods = ["duplication_loss", "stability", "contrastive"]\n[[models]]\nsource = "a"')
    assert load_manifest(path).jobs[0].settings.methods == ("duplication_loss", "stability", "contrastive")


@pytest.mark.parametrize("body, fragment", [
    ('[settings]\nn = 6\ncolour = "red"\n[[models]]\nsource = "x"', "unknown key 'colour'"),
    ('[[models]]\nname = "a"', "has no source"),
    ('[[models]]\nsource = "a"\nname = "m"\n[[models]]\nsource = "b"\nname = "m"', "distinct name"),
    ('[settings]\nblock_sizes = [0]\n[[models]]\nsource = "a"', "positive whole numbers"),
    ('[settings]\nmethods = ["magic"]\n[[models]]\nsource = "a"', "unknown"),
    ('[sweep]\nregimes = "zero,one"\n[[models]]\nsource = "a"', "unknown regimes 'zero,one'"),
    ('models = 3', "must be a list"),
    ("[[models]\nsource = 'a'", "not valid TOML"),
    ("", "lists no models"),
    ('out = "../elsewhere"\n[[models]]\nsource = "a"', "outside the manifest's folder"),
    ('out = "/tmp/cp-onnx-elsewhere"\n[[models]]\nsource = "a"', "outside the manifest's folder"),
])
def test_manifest_errors_are_one_line(tmp_path, capsys, body, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(CpOnnxError, match=fragment):
        load_manifest(path)
    assert main(["batch", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cp-onnx: error: ")


@pytest.mark.slow
def test_batch_of_two_tiny_models_and_smollm2(folders, tmp_path, capsys):
    path = tmp_path / "three.toml"
    path.write_text("[settings]\nn = 10\n" + "".join(f'\n[[models]]\nsource = "{f}"\nblock_sizes = [1, 2]\n' for f in folders.values())
                    + '\n[[models]]\nsource = "smollm2"\n')
    assert main(["batch", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "three-out"
    assert statuses(out) == {"llama": "analyzed", "qwen2": "analyzed", "smollm2": "analyzed"}
    smol = json.loads((out / "smollm2" / "report.json").read_text())
    jsonschema.validate(smol, report_mod.schema())
    assert smol["model"]["num_layers"] == 30
    assert smol["model"]["weights_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the packaged GGUF
    assert {b["end"] - b["start"] for b in smol["methods"]["stability"]["blocks"]} == {3, 4, 5}
    with open(out / "summary.csv", newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["llama", "qwen2", "smollm2"]
