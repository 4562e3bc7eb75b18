"""Issue 2 on the real SmolLM2: export, discovery, expose, session and one batch, with peak memory.

The export runs in a child process (its peak RSS is its own; with --fresh it exports into a temporary
cache, otherwise the user cache is honoured and a hit is reported). The rest runs here, in order:
load the ONNX file, discover the layers, expose embed + 30 resid_out + 30 attention patterns, open an
onnxruntime session on the exposed graph and run one batch of 10 calibration texts. Baseline, in the
same run: plain onnxruntime on the exported file (no expose), the same batch, logits only.
Also timed: ActivationReader, the path `cp-onnx analyze` takes (weights detached before the passes).
Target: discovery + expose under 10 s on 2 cores.

    python benchmarks/bench_foundation.py [--fresh] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_common import Stopwatch, peak_rss_mb, print_table, run_json, say_load, write_results

TARGET_S = 10.0  # discovery + expose
TEXTS = 10


def export_child(cache: str | None) -> None:
    """In the child: export smollm2 (cached or into ``cache``) and print what happened as JSON."""
    from exporters import export
    from exporters.pipeline import cache_root

    root = cache_root(Path(cache) if cache else None)
    before = set(root.iterdir()) if root.is_dir() else set()
    began = time.perf_counter()
    folder = Path(export("smollm2", cache_dir=Path(cache) if cache else None, log=lambda m: print(m, file=sys.stderr)))
    print(json.dumps({"folder": str(folder), "cache_hit": folder in before, "seconds": time.perf_counter() - began}))


def measure(folder: Path, threads: int) -> tuple[list[tuple], dict]:
    """Every stage after the export, timed in this process; returns table rows and figures."""
    import graph_passes
    from cp_onnx.analysis.activations import ActivationReader
    from cp_onnx.calibration import load_calibration
    from cp_onnx.models.model import open_folder
    from cp_onnx.models.runner import Runner, pad_batch
    from graph_passes.layer_map import block_name

    model = open_folder(folder)
    token_lists, _ = model.encode(load_calibration(n=TEXTS), max_length=128)
    ids, mask = pad_batch(token_lists)
    rows, fig = [], {"batch_shape": list(ids.shape)}

    def stage(key: str, label: str, watch: Stopwatch) -> None:
        fig[key] = {"wall_s": round(watch.wall, 3), "cpu_s": round(watch.cpu, 3), "peak_rss_mb": round(peak_rss_mb())}
        rows.append((label, watch.wall, f"cpu {watch.cpu:6.2f} s, peak RSS {fig[key]['peak_rss_mb']} MB"))

    with Stopwatch() as t:
        plain = Runner(model.onnx_path, threads=threads)  # a path goes to onnxruntime as it is
    stage("baseline_session", "baseline: onnxruntime session on the file", t)
    with Stopwatch() as t:
        plain.run(ids, mask)
    stage("baseline_batch", f"baseline: one batch {ids.shape[0]}x{ids.shape[1]}, logits", t)
    del plain

    with Stopwatch() as t:
        proto = graph_passes.graph_io.load(model.onnx_path)
    stage("load", "load model.onnx (onnx.load)", t)
    with Stopwatch() as t:
        layer_map = graph_passes.discover(proto)
    stage("discover", f"discover ({layer_map.family}, {layer_map.num_layers} layers)", t)
    names = ["embed"] + [block_name(l, role) for role in ("resid_out", "attn.pattern") for l in range(layer_map.num_layers)]
    with Stopwatch() as t:
        exposed = graph_passes.expose(proto, layer_map, names)
    stage("expose", f"expose ({len(names)} activations)", t)
    del proto
    with Stopwatch() as t:
        runner = Runner(exposed, threads=threads)
    stage("session", "Runner session on the exposed graph", t)
    del exposed
    with Stopwatch() as t:
        out = runner.run(ids, mask, names)
    stage("batch", f"one batch {ids.shape[0]}x{ids.shape[1]}, {len(out)} activations", t)
    del runner, out

    with Stopwatch() as t:
        reader = ActivationReader(model, threads=threads)
    stage("activation_reader", "ActivationReader (analyze's path)", t)
    with Stopwatch() as t:
        next(reader.batches(token_lists, batch_size=TEXTS))
    stage("reader_batch", "ActivationReader: the same batch", t)
    return rows, fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="export into a temporary cache, to time a real export")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--export-child", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child is not None:
        export_child(args.export_child or None)
        return

    load_start = say_load("start")
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp:
        command = [sys.executable, __file__, "--export-child"] + ([str(Path(tmp) / "cache")] if args.fresh else [])
        with Stopwatch() as t:
            exported = run_json(command)
        export_rss = peak_rss_mb(resource.RUSAGE_CHILDREN)
        rows, fig = measure(Path(exported["folder"]), args.threads)
    hit = "cache hit" if exported["cache_hit"] else "real export"
    rows.insert(0, (f"export ({hit}, child process)", t.wall, f"peak RSS of the child {export_rss:.0f} MB"))
    passes = fig["discover"]["wall_s"] + fig["expose"]["wall_s"]
    verdict = "PASS" if passes < TARGET_S else "FAIL"
    ratios = {
        "session_vs_baseline": round(fig["session"]["wall_s"] / fig["baseline_session"]["wall_s"], 2),
        "batch_vs_baseline": round(fig["batch"]["wall_s"] / fig["baseline_batch"]["wall_s"], 2),
    }
    rows += [
        ("discovery + expose", passes, f"target < {TARGET_S:.0f} s: {verdict}"),
        ("session / baseline session", ratios["session_vs_baseline"]),
        ("exposed batch / baseline batch", ratios["batch_vs_baseline"]),
    ]
    print_table(f"SmolLM2 foundation ({args.threads} onnxruntime threads); seconds", rows)
    load_end = say_load("end")
    path = write_results("bench_foundation", {
        "threads": args.threads,
        "export": {"wall_s": round(t.wall, 3), "cache_hit": exported["cache_hit"], "fresh": args.fresh, "child_peak_rss_mb": round(export_rss)},
        **fig,
        "discover_plus_expose_s": round(passes, 3),
        "target_s": TARGET_S,
        "passed": passes < TARGET_S,
        "ratios": ratios,
        "load_average": {"start": load_start, "end": load_end},
    })
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
