"""Interruptions: SIGKILL in the middle of export, analyze, sweep, batch and apply, then a rerun that must complete
with the outputs of an uninterrupted run; two exports racing into one cache, two analyses into one folder; a full
disk (a file-size limit in the child) during writes: a one-line error and the previous file intact.

Every kill is proven to have interrupted work: the run is stopped (SIGSTOP) once it has shown that it is under way
(a progress line, a sweep row, a staging folder) and a seeded moment later; its outputs are then seen incomplete,
and only then is it killed, which must end it by SIGKILL. A run that finished first is retried earlier, never
counted as a kill."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from exporters.manifest import read_manifest
from support import build_hf_model, save_tokenizer, tiny_tokenizer, write_tiny_folder

ANALYZE = ["--method", "stability", "-n", "4", "--block-sizes", "1,2", "--threads", "1"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "CP_ONNX_THREADS": "1"}
SEED = 14


def cli(args, *, file_size: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cp-onnx args`` in a child (under a file-size limit of ``file_size`` bytes)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))) if file_size else None
    done = subprocess.run([sys.executable, "-m", "cp_onnx.cli", *map(str, args)], capture_output=True, text=True, env=env or ENV,
                          preexec_fn=limit, timeout=600)
    return done


def ok(args, **kwargs) -> subprocess.CompletedProcess:
    done = cli(args, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not left, left


def report_without_timings(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timings")
    return data


def sweep_rows(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [lines[0]] + sorted(({k: v for k, v in r.items() if k != "seconds"} for r in lines[1:]), key=lambda r: (r["start"] or -1, r["end"] or -1))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory) -> Path:
    return write_tiny_folder(tiny_model, "llama", tmp_path_factory.mktemp("interrupt") / "llama")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    from cp_onnx.groundtruth import probes

    return probes.save_suite(probes.probe_suite(0, per_kind=1), tmp_path_factory.mktemp("suite") / "suite.jsonl")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    build_hf_model("llama", folder)
    save_tokenizer(folder, tiny_tokenizer())
    return folder


@dataclass(frozen=True)
class Stage:
    """A moment of a run to kill it at: once ``ready`` holds on its stderr so far (or on files it has written), and
    ``partial()`` then describes its outputs as incomplete (None: they are complete, the run got past the work)."""

    name: str
    ready: Callable[[str], bool]
    partial: Callable[[], str | None]


class FinishedFirst(Exception):
    """The run ended (or completed its outputs) before it could be stopped: no interruption happened."""


def kill_mid_run(args, stage: Stage, delay: float, *, env: dict | None = None) -> str:
    """Run ``cp-onnx args``; ``delay`` seconds after ``stage.ready``, stop it, see its outputs incomplete, kill it: the
    description of what it left (FinishedFirst if it ended or completed first). It must end by SIGKILL."""
    child = subprocess.Popen([sys.executable, "-m", "cp_onnx.cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env or ENV)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        while not stage.ready("".join(lines)):
            if child.poll() is not None:
                raise FinishedFirst(f"ended (exit {child.returncode}) before {stage.name}: {''.join(lines)[-500:]}")
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGSTOP)
        if child.poll() is not None:
            raise FinishedFirst(f"ended (exit {child.returncode}) within {delay:.2f} s of {stage.name}")
        left = stage.partial()
        if left is None:
            raise FinishedFirst(f"its outputs were complete {delay:.2f} s after {stage.name}")
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(60)
        reader.join(10)
    assert child.returncode == -signal.SIGKILL, child.returncode  # killed by the signal, mid-run
    return left


def _kill_and_rerun(name: str, args: list, outcome, stages: list[Stage], count: int, reset=lambda: None, env=None) -> list[str]:
    """Kill ``args`` at ``count`` seeded (stage, delay) points, each proven mid-run, rerun each time, and compare
    ``outcome()`` with an uninterrupted run's. A point that finished first is retried with a quarter of its delay."""
    reset()
    began = time.monotonic()
    ok(args, env=env)
    duration, expected = time.monotonic() - began, outcome()
    rng, notes = random.Random(f"{SEED} {name}"), []
    for _ in range(count):
        stage, delay = rng.choice(stages), rng.uniform(0, 0.1 * duration)
        for attempt in range(4):
            reset()
            try:
                left = kill_mid_run(args, stage, delay, env=env)
                break
            except FinishedFirst as first:
                delay, why = delay / 4 if attempt < 2 else 0.0, str(first)
        else:
            pytest.fail(f"{name}: no kill landed mid-run at {stage.name}: {why}")
        ok(args, env=env)
        assert outcome() == expected, f"{name}: rerun after a kill {delay:.2f} s after {stage.name} differs"
        notes.append(f"{stage.name} +{delay:.2f}s: killed, left {left}")
    return notes


def _absent(path: Path, what: str) -> Callable[[], str | None]:
    return lambda: None if path.exists() else f"no {what}"


def _analyze(folder, out):
    """analyze with the default prediction (its blocks run after the statistics: the work a kill interrupts)."""
    args = ["analyze", folder, "--out", out, "-n", "8", "--block-sizes", "1,2", "--threads", "1"]
    stages = [Stage("the statistics", lambda err: "calibration texts:" in err, _absent(out / "report.json", "report.json")),
              Stage("the screened blocks", lambda err: "duplicated blocks, " in err, _absent(out / "report.json", "report.json"))]
    return args, lambda: (no_temporaries(out), report_without_timings(out / "report.json"))[1], stages


def _rows(path: Path) -> int:
    return len(path.read_bytes().split(b"\n")) - 1 if path.exists() else 0  # complete lines


def _sweep(folder, suite, out):
    args = ["sweep", folder, "--suite", suite, "--blocks", "1,2", "--threads", "1", "--out", out]
    total = 1 + 6  # the header, then the baseline and the blocks of sizes 1 and 2 of a 3-layer model
    partial = lambda: f"{_rows(out) - 1} of {total - 1} rows" if _rows(out) < total else None  # noqa: E731
    stages = [Stage(f"row {k}", lambda err, k=k: _rows(out) >= 1 + k, partial) for k in range(0, 5)]
    return args, lambda: (no_temporaries(out.parent), sweep_rows(out))[1], stages


def test_kill_analyze_and_sweep_then_rerun(folder, suite, tmp_path):
    """The default run's subset: one proven kill each."""
    out = tmp_path / "a"
    args, outcome, stages = _analyze(folder, out)
    notes = _kill_and_rerun("analyze", args, outcome, stages, 1, reset=lambda: shutil.rmtree(out, ignore_errors=True))
    assert notes[0].endswith("killed, left no report.json")
    out = tmp_path / "s.jsonl"
    args, outcome, stages = _sweep(folder, suite, out)
    notes = _kill_and_rerun("sweep", args, outcome, stages, 1, reset=lambda: out.unlink(missing_ok=True))
    assert re.search(r"killed, left [0-5] of 6 rows$", notes[0]), notes


@pytest.mark.hardening
def test_kill_points_across_commands(folder, suite, hf_folder, tmp_path):
    """52 proven kill points: analyze 14, sweep 14 (resumed, not restarted), batch 8, export 6, apply 10."""
    notes = {}
    out = tmp_path / "a"
    args, outcome, stages = _analyze(folder, out)
    notes["analyze"] = _kill_and_rerun("analyze", args, outcome, stages, 14, reset=lambda: shutil.rmtree(out, ignore_errors=True))
    sweep_out = tmp_path / "s.jsonl"
    args, outcome, stages = _sweep(folder, suite, sweep_out)  # each killed run starts a new file; its rerun resumes what it appended
    notes["sweep"] = _kill_and_rerun("sweep", args, outcome, stages, 14, reset=lambda: sweep_out.unlink(missing_ok=True))

    manifest = tmp_path / "batch.toml"
    manifest.write_text(f'[settings]\nmethods = ["stability"]\nn = 4\nblock_sizes = [1, 2]\nthreads = 1\n'
                        f'[[models]]\nsource = "{folder}"\nname = "one"\n[[models]]\nsource = "{folder}"\nname = "two"\n')
    batch_out = tmp_path / "batch-out"
    reports = lambda: (no_temporaries(batch_out), [report_without_timings(batch_out / n / "report.json") for n in ("one", "two")])[1]
    stages = [Stage("the first model", lambda err: "batch 1/2" in err, _absent(batch_out / "two" / "report.json", "second report")),
              Stage("the start", lambda err: "batch: 2 models" in err, _absent(batch_out / "two" / "report.json", "second report"))]
    notes["batch"] = _kill_and_rerun("batch", ["batch", manifest, "--out", batch_out], reports, stages, 8,
                                     reset=lambda: shutil.rmtree(batch_out, ignore_errors=True))

    cache = tmp_path / "cache"
    env = {**ENV, "CP_ONNX_CACHE": str(cache)}
    entry = lambda: next((p for p in cache.iterdir() if not p.name.startswith(".") and p.name != "packages"), None) if cache.exists() else None  # noqa: E731
    no_entry = lambda: None if entry() else "no cache entry"  # noqa: E731
    stages = [Stage("the graph export", lambda err: "graph with Optimum" in err, no_entry),
              Stage("the generation graph", lambda err: "generation graph" in err, no_entry)]
    export_args = ["export", hf_folder, "--with-past"]
    # The same entry, complete (a manifest that reads), with the same files (Optimum's protobufs are not byte-stable across runs).
    notes["export"] = _kill_and_rerun("export", export_args, lambda: (read_manifest(entry())["cache_key"], sorted(digest(entry()))), stages, 6,
                                      reset=lambda: shutil.rmtree(cache, ignore_errors=True), env=env)

    exported = Path(ok(export_args, env=env).stdout.strip())
    applied = tmp_path / "applied"
    # A killed apply leaves its hidden staging folder (.applied.tmp-*) beside the output: never read, and the
    # rerun writes a complete folder of its own. Inside the output there is nothing temporary.
    stages = [Stage("the first graph", lambda err: "routing model.onnx" in err, _absent(applied, "applied folder")),
              Stage("the generation graph", lambda err: "routing with_past" in err, _absent(applied, "applied folder"))]
    notes["apply"] = _kill_and_rerun("apply", ["apply", exported, "--duplicate", "0:2", "--out", applied],
                                     lambda: (no_temporaries(applied), digest(applied))[1], stages, 10,
                                     reset=lambda: shutil.rmtree(applied, ignore_errors=True))
    counts = {name: len(points) for name, points in notes.items()}
    assert sum(counts.values()) >= 50 and all("killed, left" in note for points in notes.values() for note in points), counts
    results = os.environ.get("CP_ONNX_KILL_RESULTS")
    if results:
        Path(results).write_text(json.dumps(notes, indent=1) + "\n")


@pytest.mark.slow
def test_two_exports_into_one_cache_at_once(hf_folder, tmp_path):
    env = {**ENV, "CP_ONNX_CACHE": str(tmp_path / "cache")}
    children = [subprocess.Popen([sys.executable, "-m", "cp_onnx.cli", "export", str(hf_folder)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(c.wait(600), *c.communicate()) for c in children]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    paths = {r[1].strip() for r in results}
    assert len(paths) == 1
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert entries == [Path(paths.pop())] and read_manifest(entries[0])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no staging folder left behind
    ok(["analyze", entries[0], "--tokenizer", entries[0], "--calibration", "general", *ANALYZE, "--out", tmp_path / "a"])


def test_two_analyses_into_one_folder_at_once(folder, tmp_path):
    """No lock: each file is written under a temporary name and renamed, so the folder holds one complete report.json, the
    last finisher's, never a mix or a torn file. Two runs of different settings (-n 4 and -n 6) each give a report, both
    exit 0, and the folder's is one of the two, as each makes it alone."""
    alone = {}
    for n in ("4", "6"):
        ok(["analyze", folder, "--out", tmp_path / n, *ANALYZE[:2], "-n", n, *ANALYZE[4:]])
        alone[n] = report_without_timings(tmp_path / n / "report.json")
    assert alone["4"] != alone["6"]
    shared = tmp_path / "shared"
    for _ in range(3):
        children = [subprocess.Popen([sys.executable, "-m", "cp_onnx.cli", "analyze", str(folder), "--out", str(shared), *ANALYZE[:2], "-n", n,
                                      *ANALYZE[4:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV) for n in ("4", "6")]
        assert [c.wait(300) for c in children] == [0, 0], [c.stderr.read()[-2000:] for c in children]
        found = report_without_timings(shared / "report.json")
        assert found in (alone["4"], alone["6"])
        no_temporaries(shared)
        assert sorted(p.name for p in shared.iterdir()) == ["report.json"]


def _full_disk(args, existing: Path, file_size: int = 4096) -> str:
    """Run ``args`` under a file-size limit; the one-line error it gives, with ``existing`` unchanged."""
    before = existing.read_bytes()
    done = cli(args, file_size=file_size)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cp-onnx: error: cannot ") and "Traceback" not in done.stderr
    assert existing.read_bytes() == before
    no_temporaries(existing.parent)
    return last


def test_full_disk_leaves_the_previous_file(folder, suite, tmp_path):
    out = tmp_path / "a"
    ok(["analyze", folder, "--out", out, *ANALYZE])
    (out / "report.json").write_text((out / "report.json").read_text() + " ")  # marked: a new report would differ
    assert "report.json (File too large)" in _full_disk(["analyze", folder, "--out", out, *ANALYZE], out / "report.json", 1000)

    page = tmp_path / "page.html"
    page.write_text("previous page")
    assert "page.html (File too large)" in _full_disk(["report", out / "report.json", "--html", page], page, 2000)

    sweep = tmp_path / "s.jsonl"
    args = ["sweep", folder, "--suite", suite, "--blocks", "1", "--threads", "1", "--out", sweep]
    ok(args)
    expected = sweep_rows(sweep)
    lines = sweep.read_text().splitlines(keepends=True)
    sweep.write_text("".join(lines[:2]))  # two configs left to run: appending them crosses the limit
    done = cli(args, file_size=len("".join(lines[:2])) + 50)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("cp-onnx: error: cannot append to the sweep")
    ok(args)  # with room again, the sweep resumes past the cut line
    assert sweep_rows(sweep) == expected
