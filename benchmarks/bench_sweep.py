"""The sweep on the real SmolLM2: layer reuse, with and without the KV-cached few-shot prefixes, against
naive routed models, same configs and items.

Modes: ``prefix`` (what `cp-onnx sweep` runs: the with-past graph, each kind's shared examples run once
per config and fed to its items through the cache), ``reuse`` (the no-past graph: every sequence runs
its examples itself) and ``naive`` (each routed model from scratch). Each mode runs in its own
process, so each peak RSS is its own. Prints the times, the speed-ups, the peak memory, how far the
modes' metrics differ, and an estimate for the full sweep (blocks of 3, 4 and 5 layers) from a
per-config fit of time against the number of layers a config reruns.

    python benchmarks/bench_sweep.py [--items 60] [--threads 2] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp_onnx.groundtruth import probes  # noqa: E402

from cp_onnx.groundtruth.sweep import block_edits, read_sweep, regime_rows, sweep  # noqa: E402
from graph_passes.edit import Edit  # noqa: E402
from cp_onnx.models.model import open_model  # noqa: E402

# Spread over the depth and sizes 3-5, rerunning on average about as many layers as the full sweep's blocks do.
CONFIGS = [Edit.duplicate(i, j) for i, j in ((3, 6), (9, 12), (12, 15), (15, 19), (20, 25), (26, 30))]
METRICS = ("answer_logprob", "greedy_accuracy", "choice_accuracy", "general_nll")
MODES = ("prefix", "reuse", "naive")


def suite(count: int) -> list[probes.ProbeItem]:
    return probes.probe_suite(0, per_kind=math.ceil(count / len(probes.TASK_KINDS)))[:count]


def run_mode(mode: str, count: int, threads: int | None, out: Path) -> dict:
    """One mode's sweep in this process: wall time, per-config seconds, peak RSS."""
    model = open_model("smollm2", with_past=mode == "prefix", log=lambda _: None)
    began = time.perf_counter()
    rows = sweep(model, CONFIGS, suite(count), out=out, mode="naive" if mode == "naive" else "reuse", threads=threads, log=lambda _: None,
                 regimes=("few_shot",))  # the regime its recorded figures were measured in
    rows = regime_rows(rows, "few_shot")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"mode": mode, "seconds": time.perf_counter() - began, "rows": rows, "suite": read_sweep(out)[0]["suite"],
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def reruns(config, num_layers: int) -> int:
    """Layers a config runs after the kept output of layer end - 1 (none for the baseline)."""
    start, end = config
    return 0 if start is None else (end - start) + (num_layers - end)


def estimate_full_sweep(result: dict, num_layers: int) -> float:
    """Seconds for the baseline and every block of 3, 4 and 5 layers: setup + fitted per-config times."""
    rows = [r for r in result["rows"] if r["start"] is not None]
    x = np.array([reruns((r["start"], r["end"]), num_layers) for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    setup = result["seconds"] - sum(r["seconds"] for r in result["rows"])
    configs = block_edits(num_layers, (3, 4, 5))
    return setup + sum(intercept + slope * reruns(c.block or (None, None), num_layers) for c in configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode, result as JSON on stdout
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.items, args.threads, args.out)))
        return
    open_model("smollm2"), open_model("smollm2", with_past=True)  # export once, outside the timings
    load_before = round(os.getloadavg()[0], 2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for mode in MODES:
            command = [sys.executable, __file__, "--mode", mode, "--items", str(args.items), "--out", str(Path(tmp) / f"{mode}.jsonl")]
            command += ["--threads", str(args.threads)] if args.threads else []
            results[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    prefix, reuse, naive = (results[mode] for mode in MODES)

    def differences(one: dict) -> dict:
        return {m: max(abs((a[m] or 0) - (b[m] or 0)) for a, b in zip(one["rows"], naive["rows"])) for m in METRICS}

    num_layers = 30
    blocks = slice(1, None)  # the configs after the baseline
    figures = {
        "configs": len(reuse["rows"]),
        "items": args.items,
        "sequences_tokens": [reuse["suite"]["sequences"], reuse["suite"]["tokens"]],
        "load_average_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "prefix_s": round(prefix["seconds"], 1),
        "reuse_s": round(reuse["seconds"], 1),
        "naive_s": round(naive["seconds"], 1),
        "speedup": round(naive["seconds"] / reuse["seconds"], 2),
        "prefix_speedup": round(naive["seconds"] / prefix["seconds"], 2),
        "prefix_per_block_speedup": round(sum(r["seconds"] for r in naive["rows"][blocks]) / sum(r["seconds"] for r in prefix["rows"][blocks]), 2),
        "per_block_speedup": round(sum(r["seconds"] for r in naive["rows"][blocks]) / sum(r["seconds"] for r in reuse["rows"][blocks]), 2),
        "prefix_peak_rss_mb": round(prefix["peak_rss_mb"]),
        "reuse_cpu_s": round(reuse["cpu_seconds"], 1),
        "naive_cpu_s": round(naive["cpu_seconds"], 1),
        "reuse_peak_rss_mb": round(reuse["peak_rss_mb"]),
        "naive_peak_rss_mb": round(naive["peak_rss_mb"]),
        "reuse_config_s": [r["seconds"] for r in reuse["rows"]],
        "naive_config_s": [r["seconds"] for r in naive["rows"]],
        "max_metric_difference": differences(reuse),
        "prefix_max_metric_difference": differences(prefix),
        "full_sweep_estimate_min": round(estimate_full_sweep(reuse, num_layers) / 60, 1),
        "prefix_full_sweep_estimate_min": round(estimate_full_sweep(prefix, num_layers) / 60, 1),
    }
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if args.json:
        from cp_onnx.files import write_json

        write_json(figures, args.json)


if __name__ == "__main__":
    main()
