"""Executors: items in order from this process, local processes and a local Ray runtime, with equal results."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cp_onnx.batch import load_manifest, run_batch
from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from cp_onnx.executors import InProcessExecutor, ProcessExecutor, RayExecutor, make_executor
from cp_onnx.groundtruth import sweep as sweep_module
from cp_onnx.models.evaluators import BASELINE
from graph_passes.edit import Edit
from cp_onnx.models.scoring import ProbeItem
from cp_onnx.models.model import open_model
from support import write_tiny_folder

ITEMS = [
    ProbeItem("a-0", "arithmetic", "Q: 2+3=", " 5"),
    ProbeItem("s-0", "syllogism", "All A are B. x is A. Is x B?", " yes", (" yes", " no")),
    ProbeItem("o-0", "ordering", "Ann > Bob > Cy. Who is first?", " Ann", (" Bob", " Ann", " Cy")),
]
GENERAL = ["The harbour was quiet in the early morning."]
CONFIGS = [BASELINE, *(Edit.duplicate(i, j) for i, j in ((0, 1), (1, 2), (2, 3), (0, 2)))]


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cp-onnx[ray]')")
    executor = RayExecutor(num_workers=2)  # a local runtime with 2 CPUs, stopped at the end
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("executor-models")
    return {family: write_tiny_folder(tiny_model, family, root / family) for family in ("llama", "qwen2")}


def test_ray_problems_are_one_line_errors(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[models]]\nsource = "smollm2"\n')
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["batch", str(manifest), "--executor", "ray", "--address", "auto"]) == 2  # no cluster is running
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cp-onnx: error: cannot reach the Ray cluster at auto")
    assert "not run: the executor failed" in json.loads((tmp_path / "m-out" / "batch.json").read_text())["failures"][0]["error"]

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(CpOnnxError, match=r"pip install 'cp-onnx\[ray\]'"):
        list(RayExecutor().map(abs, [1]))


def test_map_keeps_item_order(ray_executor):
    items = [5, -3, 0, -8, 2, -1, 7]
    for executor in (InProcessExecutor(), ProcessExecutor(2), ray_executor):
        assert list(executor.map(abs, items)) == [5, 3, 0, 8, 2, 1, 7]
        assert list(executor.map(abs, [])) == []


def test_make_executor_choices():
    assert isinstance(make_executor("inprocess"), InProcessExecutor)
    assert isinstance(make_executor("inprocess", workers=3), ProcessExecutor)
    ray = make_executor("ray", address="auto")
    assert isinstance(ray, RayExecutor) and (ray.address, ray.num_workers) == ("auto", 2)
    with pytest.raises(CpOnnxError, match="use one of inprocess, ray"):
        make_executor("dask")
    with pytest.raises(CpOnnxError, match="--executor ray"):
        make_executor("inprocess", address="auto")
    with pytest.raises(CpOnnxError, match="workers must be"):
        RayExecutor(num_workers=0)


def test_sweep_on_every_executor_equals_the_in_process_sweep(folders, tmp_path, ray_executor):
    model = open_model(folders["llama"])
    def run(name, executor=None):
        rows = sweep_module.sweep(model, CONFIGS[1:], ITEMS, out=tmp_path / f"{name}.jsonl", general=GENERAL, threads=1,
                                  executor=executor, log=lambda _: None)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    expected = run("default")
    for name, executor in (("inprocess", InProcessExecutor()), ("processes", ProcessExecutor(2)), ("ray", ray_executor)):
        assert run(name, executor) == expected, name


def test_batch_on_ray_equals_in_process(folders, tmp_path, ray_executor):
    manifest = tmp_path / "m.toml"
    manifest.write_text("[settings]\nn = 4\nblock_sizes = [1, 2]\n" + "".join(f'\n[[models]]\nsource = "{f}"\n' for f in folders.values()))
    reports = {}
    for name, executor in (("inprocess", InProcessExecutor()), ("ray", ray_executor)):
        results = run_batch(load_manifest(manifest, out=tmp_path / name), executor, log=lambda _: None)
        assert [r["status"] for r in results] == ["analyzed", "analyzed"]
        reports[name] = [json.loads((tmp_path / name / family / "report.json").read_text()) for family in folders]
        for report in reports[name]:
            report.pop("timings")
    assert reports["ray"] == reports["inprocess"]
