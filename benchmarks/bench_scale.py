"""`cp-onnx analyze` at scale: weight bytes, peak resident memory against them, the time of each stage,
and the least time that work can take at the plain forward's own rate, one model after another.

Each model runs in child processes, one at a time (a 1.5B float32 model is 6 GB a copy):
  1. the baseline: one plain forward of the calibration texts (onnxruntime on the file, no cp-onnx);
  2. `cp-onnx analyze MODEL --out DIR` exactly as a user runs it (every default method), its peak RSS
     read from the kernel (ru_maxrss of the child) and its stage timings from report.json.
The memory bound is 1.3 x the weight bytes + 1.5 GB. The least time is the work analyze runs (layer
tokens of the statistics pass and of every duplicated block, as the default method counts them)
at the layer-token rate of the plain forward.

    python benchmarks/bench_scale.py MODEL [MODEL ...] [--threads 2] [--name NAME]

MODEL: an exported folder, .onnx file, or anything `cp-onnx export` accepts (smollm2, gemma3-270m).
Random-weight models with real shapes: benchmarks/scale_models.py builds the HF folders.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, print_table, say_load, write_results

GB = 2**30
MEMORY_FACTOR, MEMORY_SLACK_GB = 1.3, 1.5
# Issue 12's time bounds for `cp-onnx analyze`, by shape (layers, hidden size): Qwen2.5-1.5B's and Llama-3.2-3B's.
TIME_TARGETS_S = {(28, 1536): 150.0, (28, 3072): 300.0}

FORWARD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from cp_onnx import calibration
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import cache_feeds, default_threads, open_graph, pad_batch, position_ids_for
from graph_passes.deployed import cache_dims
model = open_model(sys.argv[1], log=lambda _: None)
dims = cache_dims(open_graph(model.onnx_path)[0])  # sizes a genai build leaves symbolic
options = ort.SessionOptions()  # onnxruntime as a user runs it: its defaults (arena, prepacking), the file as it is
options.intra_op_num_threads = int(sys.argv[2]) or default_threads()
session = ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
names = {i.name for i in session.get_inputs()}
ids, _ = model.encode(calibration.load_calibration(None, n=10), max_length=128)
ids = sorted(ids, key=len, reverse=True)
times = []
for _ in range(2):  # the first run pages the weights in; the second is the rate
    began = time.perf_counter()
    for start in range(0, len(ids), 8):
        batch, mask = pad_batch(ids[start : start + 8])
        feeds = {"input_ids": batch, "attention_mask": mask, "position_ids": position_ids_for(mask), **cache_feeds(session.get_inputs(), len(batch), dims)}
        session.run([session.get_outputs()[0].name], {k: v for k, v in feeds.items() if k in names})
    times.append(time.perf_counter() - began)
print(json.dumps({"forward_s": min(times), "first_forward_s": times[0], "tokens": int(sum(len(t) for t in ids))}))
"""


SWEEP = r"""
import json, sys, tempfile, time
from pathlib import Path
from cp_onnx.groundtruth import probes
from cp_onnx.groundtruth.sweep import sweep
from cp_onnx.models.model import open_model
model = open_model(sys.argv[1], log=lambda _: None)
items = probes.probe_suite(0)[: int(sys.argv[2])] if int(sys.argv[2]) else None
configs = [tuple(int(v) for v in c.split(":")) for c in sys.argv[3].split(",")]
with tempfile.TemporaryDirectory() as out:
    began = time.perf_counter()
    sweep(model, configs, items, out=Path(out) / "sweep.jsonl", log=lambda _: None)
    print(json.dumps({"sweep_s": time.perf_counter() - began, "configs": len(configs) + 1}))
"""


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of every initializer, read from the file's protobuf fields (nothing loaded)."""
    from graph_passes.graph_io import tensor_nbytes
    from graph_passes.mapped import load_mapped

    light, arrays = load_mapped(onnx_path)
    return sum(a.nbytes for a in arrays.values()) + sum(tensor_nbytes(t) for t in light.graph.initializer if t.name not in arrays)


def measure(source: str, threads: int, sweep_items: int | None = None, sweep_configs: str = "") -> dict:
    from cp_onnx.models.model import open_model

    model = open_model(source, log=lambda line: print("  " + line))
    weights = weight_bytes(model.onnx_path)
    env = {**os.environ, "CP_ONNX_THREADS": str(threads)} if threads else dict(os.environ)
    python = sys.executable
    # Each child is its own process tree: ru_maxrss of RUSAGE_CHILDREN is the maximum over children, so every
    # measurement runs under a fresh wrapper whose only child it is.
    forward = _peak(python, ["-c", FORWARD, str(model.path), str(threads)], env)
    forward_data = json.loads(forward["stdout"].strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as out:
        analyze = _peak(python, ["-m", "cp_onnx.cli", "analyze", str(model.path), "--out", out], env)
        if analyze["returncode"] != 0:
            raise SystemExit(f"cp-onnx analyze failed on {source}:\n{analyze['stderr'][-2000:]}")
        report = json.loads((Path(out) / "report.json").read_text())
    swept = None
    if sweep_items is not None:
        run = _peak(python, ["-c", SWEEP, str(model.path), str(sweep_items), sweep_configs], env)
        if run["returncode"] != 0:
            raise SystemExit(f"the sweep failed on {source}:\n{run['stderr'][-2000:]}")
        swept = {**json.loads(run["stdout"].strip().splitlines()[-1]), "peak_rss_gb": run["peak_gb"], "items": sweep_items or "all",
                 "within_memory_bound": run["peak_gb"] <= MEMORY_FACTOR * weights / GB + MEMORY_SLACK_GB}
    timings = report["timings"]
    work = sum(v for k, v in timings.items() if k.endswith("_layer_tokens"))
    rate = forward_data["tokens"] * report["model"]["num_layers"] / forward_data["forward_s"]  # layer tokens per second
    least = work / rate if work else None
    bound = MEMORY_FACTOR * weights / GB + MEMORY_SLACK_GB
    target = TIME_TARGETS_S.get((report["model"]["num_layers"], model.manifest.get("hidden_size")))
    return {
        "model": model.name, "path": str(model.path), "num_layers": report["model"]["num_layers"],
        "precision": model.manifest.get("precision", "fp32"), "graph_format": model.manifest.get("graph_format", "optimum"),
        "time_target_s": target, "within_time_target": None if target is None else analyze["wall_s"] < target,
        "weight_gb": weights / GB, "peak_rss_gb": analyze["peak_gb"], "rss_over_weights": analyze["peak_gb"] * GB / weights,
        "memory_bound_gb": bound, "within_memory_bound": analyze["peak_gb"] <= bound,
        "analyze_wall_s": analyze["wall_s"], "timings": timings,
        "plain_forward_s": forward_data["forward_s"], "plain_forward_tokens": forward_data["tokens"],
        "plain_forward_peak_rss_gb": forward["peak_gb"], "least_time_s": least,
        "over_least_time": analyze["wall_s"] / least if least else None,
        "decision": report.get("prediction", {}).get("decision"),
        "top3": [[b["start"], b["end"]] for b in report.get("prediction", {}).get("candidates", [])],
        "sweep": swept,
    }


WRAPPER = r"""
import json, resource, subprocess, sys, time
began = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                  "wall_s": time.perf_counter() - began,
                  "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""


def _peak(python: str, args: list[str], env: dict) -> dict:
    """Run ``python args`` under a wrapper process and return its output, wall time and peak RSS (GB)."""
    done = subprocess.run([python, "-c", WRAPPER, python, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="exported folders, .onnx files or export sources")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: every core)")
    parser.add_argument("--name", default="bench_scale", help="results/NAME.json")
    parser.add_argument("--sweep-items", type=int, help="also time `sweep` (peak RSS) on the first N probe items (0: the whole suite)")
    parser.add_argument("--sweep-configs", default="2:6,10:14", help="blocks the sweep scores besides the baseline (default 2:6,10:14)")
    args = parser.parse_args()
    load_before = say_load("start")
    results = []
    for source in args.models:
        print(f"\n{source}")
        found = measure(source, args.threads, args.sweep_items, args.sweep_configs)
        results.append(found)
        stages = {k: v for k, v in found["timings"].items() if k.endswith("_s")}
        print_table(f"{found['model']} ({found['num_layers']} layers)", [
            ("weights (GB)", found["weight_gb"]),
            ("peak RSS (GB)", found["peak_rss_gb"], f"{found['rss_over_weights']:.2f}x the weights; bound {found['memory_bound_gb']:.2f} GB"),
            ("analyze wall (s)", found["analyze_wall_s"]),
            *[(f"  {k}", v) for k, v in stages.items()],
            ("plain forward (s)", found["plain_forward_s"], f"{found['plain_forward_tokens']} tokens, the baseline"),
            ("least time (s)", found["least_time_s"] or float("nan"), "analyze's layer tokens at the plain forward's rate"),
            ("analyze / least", found["over_least_time"] or float("nan")),
            ("decision, top 3", f"{found['decision']} {found['top3']}"),
            *([("sweep peak RSS (GB)", found["sweep"]["peak_rss_gb"], f"{found['sweep']['configs']} configs on {found['sweep']['items']} items, "
                f"{found['sweep']['sweep_s']:.0f} s")] if found["sweep"] else []),
        ])
    load_after = say_load("end")
    path = write_results(args.name, {"threads": args.threads, "load_average": {"start": load_before, "end": load_after}, "models": results})
    table = path.with_suffix(".md")
    table.write_text(markdown(results, " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]]), load_before, load_after))
    print(f"\nwritten to {path} and {table}")


def _met(ok: bool | None) -> str:
    return "" if ok is None else (" (met)" if ok else " (NOT met)")


def markdown(results: list[dict], command: str, load_before, load_after) -> str:
    """The committed table: one row per model, its memory and time against the bounds."""
    lines = [f"# `cp-onnx analyze` at scale\n\n`{command}` (2 cores; load average {load_before} at start, {load_after} at end)\n",
             "| model | precision / graph | weights GB | peak RSS GB | x weights | bound GB | analyze s | statistics s | "
             "default method s | plain forward s | least time s | analyze / least | time target s | decision, top 3 |",
             "|" + " --- |" * 14]
    for r in results:
        t = r["timings"]
        least = "n/a" if r["least_time_s"] is None else f"{r['least_time_s']:.1f}"
        over = "n/a" if r["over_least_time"] is None else f"{r['over_least_time']:.2f}"
        lines.append(f"| {r['model']} ({r['num_layers']} layers) | {r['precision']} / {r['graph_format']} | {r['weight_gb']:.2f} | "
                     f"{r['peak_rss_gb']:.2f}{_met(r['within_memory_bound'])} | {r['rss_over_weights']:.2f} | {r['memory_bound_gb']:.2f} | "
                     f"{r['analyze_wall_s']:.1f}{_met(r['within_time_target'])} | {t.get('statistics_s', 0):.1f} | "
                     f"{t.get('duplication_loss_s', 0):.1f} | {r['plain_forward_s']:.2f} | {least} | {over} | "
                     f"{r['time_target_s'] or '-'} | {r['decision']} {r['top3']} |")
    lines.append("\nleast time: the layer tokens analyze runs (statistics and every duplicated block, as the default method "
                 "counts them) at the plain forward's layer-token rate (onnxruntime with its defaults on the same file). "
                 "Bounds: memory 1.3 x weights + 1.5 GB; time 150 s on Qwen2.5-1.5B's shapes, 300 s on Llama-3.2-3B's.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
