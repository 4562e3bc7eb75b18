"""Jacobians, head influence and Mahalanobis anomaly on the real SmolLM2 with the 10 default calibration texts.

Prints the total time (wall and CPU) beside one plain forward pass of the same texts (one padded
batch), the time split, the Spearman correlations of the first-order head estimates with the exact
ablation effects over all 270 heads, the strongest heads, the top blocks of the two methods and the
peak memory; writes them to benchmarks/results/bench_jacobian_heads.json.

    python benchmarks/bench_jacobian_heads.py [--threads 2] [--estimates-only]

``--estimates-only`` times just what the speed target names (Jacobian scores for every layer and the
first-order influence of every head), without the exact ablations the Spearman check needs; it
writes bench_jacobian_heads_estimates.json.
"""
from __future__ import annotations

import argparse
import sys

from bench_common import Stopwatch, peak_rss_mb, print_table, say_load, write_results

from cp_onnx.calibration import load_calibration
from cp_onnx.circuit import circuit_analysis
from cp_onnx.model import open_model
from cp_onnx.runner import Runner, pad_batch


def plain_forward(model, texts: list[str], threads: int | None) -> Stopwatch:
    """One forward of the texts as one right-padded batch (after a warm-up run)."""
    runner = Runner(model.onnx_path, threads=threads)
    ids, mask = pad_batch(model.encode(texts, max_length=128)[0])
    runner.run(ids, mask, ["logits"])
    with Stopwatch() as watch:
        runner.run(ids, mask, ["logits"])
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--estimates-only", action="store_true", help="no exact ablations (and so no Spearman): the timed target's work only")
    args = parser.parse_args()
    model = open_model("smollm2")  # exported once (cached), outside the timings
    texts = load_calibration(None, n=10)
    load_before = say_load("start")
    forward = plain_forward(model, texts, args.threads)
    with Stopwatch() as total:
        sections = circuit_analysis(model, texts, threads=args.threads, exact_ablations=not args.estimates_only, progress=lambda k, n: print(f"  text {k}/{n}", file=sys.stderr, flush=True))
    load_after = say_load("end")
    heads, timings = sections["heads"]["heads"], sections["timings"]
    ranking = "kl_estimate" if args.estimates_only else "kl_zero"
    strongest = sorted(heads, key=lambda row: -row[ranking])[:5]
    top = {method: [(b["start"], b["end"]) for b in entry["blocks"][:3]] for method, entry in sections["methods"].items()}
    print_table("SmolLM2-135M, 10 calibration texts", [
        ("layers with Jacobian scores", sum(row["frobenius_logits"] is not None for row in sections["jacobian"]["layers"])),
        ("heads with first-order estimates", sum(None not in (row["loss_estimate"], row["kl_estimate"]) for row in heads)),
        ("heads with exact effects", sum(None not in (row.get("loss_zero"), row.get("loss_mean")) for row in heads)),
        ("tokens", sections["jacobian"]["tokens"]),
        ("total wall s", total.wall, f"setup {timings['circuit_setup_s']:.1f}, forwards {timings['circuit_forwards_s']:.1f}, statistics {timings['circuit_statistics_s']:.1f}"),
        ("total CPU s", total.cpu),
        ("plain forward wall s", forward.wall, "the 10 texts as one padded batch"),
        ("plain forward CPU s", forward.cpu),
        ("total / plain forward (wall)", total.wall / forward.wall),
        ("total / plain forward (CPU)", total.cpu / forward.cpu),
        *((f"Spearman {pair}", rho) for pair, rho in (sections["heads"].get("spearman") or {}).items()),
        ("peak RSS MB", peak_rss_mb()),
    ])
    print(f"\nstrongest heads by {ranking}:", ", ".join(f"{r['layer']}.{r['head']} ({r[ranking]:.3g})" for r in strongest))
    print("top blocks:", top)
    path = write_results("bench_jacobian_heads_estimates" if args.estimates_only else "bench_jacobian_heads", {
        "load_average": {"start": load_before, "end": load_after},
        "total": {"wall_s": total.wall, "cpu_s": total.cpu},
        "plain_forward": {"wall_s": forward.wall, "cpu_s": forward.cpu},
        "timings": timings,
        "spearman": sections["heads"].get("spearman"),
        "strongest_heads": [{k: r.get(k) for k in ("layer", "head", "kl_zero", "kl_estimate", "loss_zero", "loss_estimate")} for r in strongest],
        "top_blocks": top,
        "peak_rss_mb": peak_rss_mb(),
    })
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
