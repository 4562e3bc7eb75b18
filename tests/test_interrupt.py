"""Interruptions: SIGKILL at seeded random moments of export, analyze, sweep, batch and apply, then a rerun
that must complete with the outputs of an uninterrupted run; two exports racing into one cache; a full
disk (a file-size limit in the child) during writes: a one-line error and the previous file intact."""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.manifest import read_manifest
from test_embed import tiny_folder
from test_export import save_tokenizer, tiny_tokenizer
from tiny import build_hf_model

ANALYZE = ["--method", "stability", "-n", "4", "--block-sizes", "1,2", "--threads", "1"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "CP_ONNX_THREADS": "1"}
SEED = 14


def cli(args, *, kill_after: float | None = None, file_size: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess | None:
    """Run ``cp-onnx args`` in a child; SIGKILL it after ``kill_after`` seconds (None returned if it was killed)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))) if file_size else None
    child = subprocess.Popen([sys.executable, "-m", "cp_onnx.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env or ENV, preexec_fn=limit)
    if kill_after is not None:
        try:
            child.wait(kill_after)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return None
    out, err = child.communicate(timeout=600)
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def ok(args, **kwargs) -> subprocess.CompletedProcess:
    done = cli(args, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def timed(args) -> float:
    began = time.monotonic()
    ok(args)
    return time.monotonic() - began


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
    return tiny_folder(tiny_model, "llama", tmp_path_factory.mktemp("interrupt") / "llama")


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


def _kill_points(count: int, duration: float, seed: int) -> list[float]:
    """Seeded moments within a run of ``duration`` seconds (its first third is mostly imports: no kills there)."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0.3, 0.95) * duration for _ in range(count))


def _kill_and_rerun(name: str, args: list, outcome, tmp_path: Path, count: int, reset=lambda: None) -> list[str]:
    """Kill ``args`` at ``count`` moments, rerun each time, compare ``outcome()`` with an uninterrupted run's."""
    duration = timed(args)
    expected = outcome()
    notes = []
    for point in _kill_points(count, duration, SEED + len(name)):
        reset()
        killed = cli(args, kill_after=point) is None
        ok(args)
        assert outcome() == expected, f"{name}: rerun after a kill at {point:.2f} s differs"
        notes.append(f"{point:.2f}s {'killed' if killed else 'finished first'}")
    return notes


def _analyze(folder, out):
    return ["analyze", folder, "--out", out, *ANALYZE], lambda: (no_temporaries(out), report_without_timings(out / "report.json"))[1]


def _sweep(folder, suite, out):
    return (["sweep", folder, "--suite", suite, "--blocks", "1,2", "--threads", "1", "--out", out],
            lambda: (no_temporaries(out.parent), sweep_rows(out))[1])


def test_kill_analyze_and_sweep_then_rerun(folder, suite, tmp_path):
    """The fast subset: one kill point each."""
    args, outcome = _analyze(folder, tmp_path / "a")
    _kill_and_rerun("analyze", args, outcome, tmp_path, 1)
    out = tmp_path / "s.jsonl"
    args, outcome = _sweep(folder, suite, out)
    _kill_and_rerun("sweep", args, outcome, tmp_path, 1, reset=lambda: out.unlink(missing_ok=True))


@pytest.mark.slow
def test_kill_points_across_commands(folder, suite, hf_folder, tmp_path):
    """52 kill points: analyze 14, sweep 14 (resumed, not restarted), batch 8, apply 10, export 6."""
    notes = {}
    args, outcome = _analyze(folder, tmp_path / "a")
    notes["analyze"] = _kill_and_rerun("analyze", args, outcome, tmp_path, 14)
    out = tmp_path / "s.jsonl"
    args, outcome = _sweep(folder, suite, out)  # each killed run starts a new file; its rerun resumes what it appended
    notes["sweep"] = _kill_and_rerun("sweep", args, outcome, tmp_path, 14, reset=lambda: out.unlink(missing_ok=True))

    manifest = tmp_path / "batch.toml"
    manifest.write_text(f'[settings]\nmethods = ["stability"]\nn = 4\nblock_sizes = [1, 2]\nthreads = 1\n'
                        f'[[models]]\nsource = "{folder}"\nname = "one"\n[[models]]\nsource = "{folder}"\nname = "two"\n')
    batch_out = tmp_path / "batch-out"
    reports = lambda: (no_temporaries(batch_out), [report_without_timings(batch_out / n / "report.json") for n in ("one", "two")])[1]
    notes["batch"] = _kill_and_rerun("batch", ["batch", manifest, "--out", batch_out], reports, tmp_path, 8,
                                     reset=lambda: shutil.rmtree(batch_out, ignore_errors=True))

    cache = tmp_path / "cache"
    env = {**ENV, "CP_ONNX_CACHE": str(cache)}
    export_args = ["export", hf_folder, "--with-past"]
    began = time.monotonic()
    entry = Path(ok(export_args, env=env).stdout.strip())
    duration, expected = time.monotonic() - began, digest(entry)
    notes["export"] = []
    for point in _kill_points(6, duration, SEED):
        shutil.rmtree(cache)
        killed = cli(export_args, kill_after=point, env=env) is None
        again = Path(ok(export_args, env=env).stdout.strip())
        assert again == entry and read_manifest(entry)  # a complete entry, never a half-written one
        assert set(digest(entry)) == set(expected)  # the same files (Optimum's protobufs are not byte-stable across runs)
        notes["export"].append(f"{point:.2f}s {'killed' if killed else 'finished first'}")

    applied = tmp_path / "applied"
    # A killed apply leaves its hidden staging folder (.applied.tmp-*) beside the output: never read, and the
    # rerun writes a complete folder of its own. Inside the output there is nothing temporary.
    notes["apply"] = _kill_and_rerun("apply", ["apply", entry, "--duplicate", "0:2", "--out", applied],
                                     lambda: (no_temporaries(applied), digest(applied))[1], tmp_path, 10,
                                     reset=lambda: shutil.rmtree(applied, ignore_errors=True))
    counts = {name: len(points) for name, points in notes.items()}
    assert sum(counts.values()) >= 50, counts
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
