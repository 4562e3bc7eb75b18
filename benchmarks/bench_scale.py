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

FORWARD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from cp_onnx import calibration
from cp_onnx.model import open_model
from cp_onnx.runner import Runner, default_threads
model = open_model(sys.argv[1], log=lambda _: None)
threads = int(sys.argv[2]) or default_threads()
ids, _ = model.encode(calibration.load_calibration(None, n=10), max_length=128)
runner = Runner(model.onnx_path, threads=threads)
order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
times = []
for _ in range(2):  # the first run pages the weights in; the second is the rate
    began = time.perf_counter()
    for out, mask in runner.run_texts([ids[i] for i in order], batch_size=8, outputs=[runner.output_names[0]]):
        pass
    times.append(time.perf_counter() - began)
tokens = int(sum(len(t) for t in ids))
print(json.dumps({"forward_s": min(times), "first_forward_s": times[0], "tokens": tokens}))
"""


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of every initializer, read from the file's protobuf fields (nothing loaded)."""
    from graph_passes.graph_io import tensor_nbytes
    from graph_passes.mapped import load_mapped

    light, arrays = load_mapped(onnx_path)
    return sum(a.nbytes for a in arrays.values()) + sum(tensor_nbytes(t) for t in light.graph.initializer if t.name not in arrays)


def measure(source: str, threads: int) -> dict:
    from cp_onnx.model import open_model

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
    timings = report["timings"]
    work = sum(v for k, v in timings.items() if k.endswith("_layer_tokens"))
    rate = forward_data["tokens"] * report["num_layers"] / forward_data["forward_s"]  # layer tokens per second
    least = work / rate if work else None
    bound = MEMORY_FACTOR * weights / GB + MEMORY_SLACK_GB
    return {
        "model": model.name, "path": str(model.path), "num_layers": report["num_layers"],
        "weight_gb": weights / GB, "peak_rss_gb": analyze["peak_gb"], "rss_over_weights": analyze["peak_gb"] * GB / weights,
        "memory_bound_gb": bound, "within_memory_bound": analyze["peak_gb"] <= bound,
        "analyze_wall_s": analyze["wall_s"], "timings": timings,
        "plain_forward_s": forward_data["forward_s"], "plain_forward_tokens": forward_data["tokens"],
        "plain_forward_peak_rss_gb": forward["peak_gb"], "least_time_s": least,
        "over_least_time": analyze["wall_s"] / least if least else None,
        "decision": report.get("prediction", {}).get("decision"),
        "top3": [[b["start"], b["end"]] for b in report.get("prediction", {}).get("candidates", [])],
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
    args = parser.parse_args()
    load_before = say_load("start")
    results = []
    for source in args.models:
        print(f"\n{source}")
        found = measure(source, args.threads)
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
        ])
    load_after = say_load("end")
    path = write_results(args.name, {"threads": args.threads, "load_average": {"start": load_before, "end": load_after}, "models": results})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
