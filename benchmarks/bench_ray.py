"""The same small sweep in this process and on a local Ray runtime with 2 workers: both times, and equal rows.

In-process, one evaluator uses every core; on Ray, each of the 2 actors builds its own evaluator (one
base-model pass each) with one thread, and the configs are shared between them. Ray's start-up is
timed separately from the sweep.

    python benchmarks/bench_ray.py [--model smollm2] [--items 14] [--configs 6] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp_onnx.executors import RayExecutor  # noqa: E402
from cp_onnx.groundtruth import probes  # noqa: E402
from cp_onnx.groundtruth import sweep as sweep_module  # noqa: E402
from cp_onnx.models.scoring import ProbePlan  # noqa: E402
from cp_onnx.models.model import open_model  # noqa: E402
from cp_onnx.models.runner import default_threads  # noqa: E402

GENERAL_TEXTS = 4  # a few general texts, so general_nll is compared too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="anything open_model accepts (default: smollm2)")
    parser.add_argument("--items", type=int, default=14, help="probe items (default 14: two of each kind)")
    parser.add_argument("--configs", type=int, default=6, help="blocks to sweep besides the baseline (default 6)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    model = open_model(args.model, log=lambda _: None)
    items = probes.probe_suite(0, per_kind=math.ceil(args.items / len(probes.TASK_KINDS)))[: args.items]
    general = probes.general_texts()[:GENERAL_TEXTS]
    num_layers = model.num_layers
    blocks = sweep_module.block_edits(num_layers, (3, 4, 5))[1:]
    configs = blocks[:: max(1, len(blocks) // args.configs)][: args.configs]  # spread over depth and sizes

    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        expected = sweep_module.sweep(model, configs, items, out=Path(folder) / "sweep.jsonl", general=general, log=lambda _: None)
        inprocess_s = time.perf_counter() - began

    plan = ProbePlan(items, lambda text: model.encode([text])[0][0], general)  # only for its token count
    with RayExecutor(num_workers=2) as executor, tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        list(executor.map(abs, [0]))  # start the runtime and one actor
        startup_s = time.perf_counter() - began
        began = time.perf_counter()
        rows = sweep_module.sweep(model, configs, items, out=Path(folder) / "sweep.jsonl", general=general, executor=executor, log=lambda _: None)
        ray_s = time.perf_counter() - began

    def strip(row):
        return {k: v for k, v in row.items() if k != "seconds"}

    figures = {
        "model": model.name, "layers": num_layers, "configs": len(configs) + 1, "items": len(items), "general_texts": len(general),
        "tokens": plan.tokens, "threads_in_process": default_threads(), "ray_workers": 2, "ray_threads_per_worker": 1,
        "in_process_s": round(inprocess_s, 2), "ray_s": round(ray_s, 2), "ray_startup_s": round(startup_s, 2),
        "rows_equal": [strip(r) for r in rows] == [strip(r) for r in expected],
    }
    print(f"{figures['configs']} configs x {figures['items']} items ({figures['tokens']} tokens) on {model.name}:")
    print(f"  in-process ({figures['threads_in_process']} threads): {inprocess_s:7.2f} s")
    print(f"  local Ray, 2 workers x 1 thread:  {ray_s:7.2f} s  (+ {startup_s:.2f} s to start Ray)")
    print(f"  rows equal: {figures['rows_equal']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
