"""Jacobians, head influence and Mahalanobis anomaly on the real SmolLM2 with the 10 default calibration texts.

Prints the total time (wall and CPU) beside one plain forward pass of the same texts (one padded
batch), the time split, the Spearman correlations of the first-order head estimates with the exact
ablation effects over the heads ablated exactly (``--exact-heads``: the 16 the estimates rank highest,
as `cp-onnx analyze --heads` does, or all 270), the strongest heads, the top blocks of the two methods
and the peak memory; writes them to benchmarks/results/bench_jacobian_heads.json
(bench_jacobian_heads_all.json with ``--exact-heads all``).

    python benchmarks/bench_jacobian_heads.py [--threads 2] [--exact-heads N|all] [--estimates-only]

``--estimates-only`` times just what the speed target names (Jacobian scores for every layer and the
first-order influence of every head): no exact ablations (the Spearman check needs them) and no
Mahalanobis neuron probes; it writes bench_jacobian_heads_estimates.json. It also prints the least
time that work can take at the plain forward's own rate: the matrix products each perturbed row runs
(layers from its start, then the head, per token), over those of the plain forward, times its time.
"""
from __future__ import annotations

import argparse
import sys

from bench_common import Stopwatch, peak_rss_mb, print_table, say_load, write_results

import numpy as np

from cp_onnx.analysis.circuit import circuit_analysis
from cp_onnx.analysis.heads import EXACT_HEADS
from cp_onnx.analysis.jacobian import NUM_PROBES
from cp_onnx.analysis.linear_head import TOP_TOKENS
from cp_onnx.analysis.mahalanobis import NEURONS_PER_LAYER
from cp_onnx.calibration import load_calibration
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import Runner, pad_batch
from graph_passes import discover, graph_io
from graph_passes.segment import segment, split_unembedding


def plain_forward(model, texts: list[str], threads: int | None) -> tuple[Stopwatch, list, int]:
    """One forward of the texts as one right-padded batch (the fastest of 5 runs, after a warm-up); its token lists and padded size."""
    runner = Runner(model.onnx_path, threads=threads)
    token_lists = model.encode(texts, max_length=128)[0]
    ids, mask = pad_batch(token_lists)
    runner.run(ids, mask, ["logits"])
    watches = []
    for _ in range(5):
        with Stopwatch() as watch:
            runner.run(ids, mask, ["logits"])
        watches.append(watch)
    return min(watches, key=lambda w: w.wall), token_lists, ids.size


def matmul_weights(model) -> int:
    """Elements of the matrices an onnx.ModelProto segment multiplies by: its multiply-adds per token."""
    products = {name for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in products and len(t.dims) >= 2)


def work_floor(model, token_lists: list, padded_slots: int, plain_s: float) -> tuple[float, float]:
    """(multiply-adds of the estimates' rows, in tera; their least time at the plain forward's rate).

    Rows per text: NUM_PROBES central pairs at each layer's input and at the head's (Jacobian), one
    row per head at each layer (first-order influence); a row starting at layer l runs l..L-1 and the
    head; where the logits are a plain product (split_unembedding) a Jacobian pair runs only the final
    norm and a head's row the product with its top tokens' columns (linear_head)."""
    proto = graph_io.load(model.onnx_path, weights=False)
    layer_map = discover(proto)
    parts = segment(proto, layer_map)
    layer, head = [matmul_weights(m) for m in parts.layers], matmul_weights(parts.head)
    from_layer = [sum(layer[l:]) for l in range(len(layer) + 1)]  # layers a row starting at l runs
    split = split_unembedding(parts.head)
    pair_head = 0 if split else head
    row_head = split[1].dims[0] * min(TOP_TOKENS, split[1].dims[1]) if split else head
    per_token = 2 * NUM_PROBES * (sum(from_layer) + len(from_layer) * pair_head) + (layer_map.num_heads or 0) * (sum(from_layer[:-1]) + len(layer) * row_head)
    tokens = sum(len(t) for t in token_lists)
    rate = padded_slots * (from_layer[0] + head) / plain_s  # multiply-adds per second of the plain forward
    return per_token * tokens / 1e12, per_token * tokens / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--exact-heads", default=str(EXACT_HEADS), help=f"heads ablated exactly: a number or 'all' (default {EXACT_HEADS}, as analyze)")
    parser.add_argument("--estimates-only", action="store_true", help="no exact ablations (and so no Spearman): the timed target's work only")
    args = parser.parse_args()
    exact_heads = 0 if args.estimates_only else None if args.exact_heads == "all" else int(args.exact_heads)
    model = open_model("smollm2")  # exported once (cached), outside the timings
    texts = load_calibration(None, n=10)
    load_before = say_load("start")
    forward, token_lists, padded = plain_forward(model, texts, args.threads)
    tera, floor = work_floor(model, token_lists, padded, forward.wall)
    with Stopwatch() as total:
        sections = circuit_analysis(model, texts, threads=args.threads, exact_heads=exact_heads,
                                    neurons_per_layer=0 if args.estimates_only else NEURONS_PER_LAYER,
                                    progress=lambda k, n: print(f"  text {k}/{n}", file=sys.stderr, flush=True))
    load_after = say_load("end")
    heads, timings = sections["heads"]["heads"], sections["timings"]
    ranking = "kl_estimate" if args.estimates_only else "kl_zero"
    strongest = sorted((row for row in heads if row[ranking] is not None), key=lambda row: -row[ranking])[:5]
    top = {method: [(b["start"], b["end"]) for b in entry["blocks"][:3]] for method, entry in sections["methods"].items()}
    print_table("SmolLM2-135M, 10 calibration texts", [
        ("layers with Jacobian scores", sum(row["frobenius_logits"] is not None for row in sections["jacobian"]["layers"])),
        ("heads with first-order estimates", sum(None not in (row["loss_estimate"], row["kl_estimate"]) for row in heads)),
        ("heads with exact effects", sum(None not in (row.get("loss_zero"), row.get("loss_mean")) for row in heads), sections["heads"]["exact_selection"]),
        ("tokens", sections["jacobian"]["tokens"]),
        ("total wall s", total.wall, f"setup {timings['circuit_setup_s']:.1f}, forwards {timings['circuit_forwards_s']:.1f}, statistics {timings['circuit_statistics_s']:.1f}"),
        ("total CPU s", total.cpu),
        ("plain forward wall s", forward.wall, "the 10 texts as one padded batch, fastest of 5"),
        ("plain forward CPU s", forward.cpu),
        ("total / plain forward (wall)", total.wall / forward.wall),
        ("total / plain forward (CPU)", total.cpu / forward.cpu),
        *((("estimates' multiply-adds (tera)", tera), ("their least wall s", floor, "at the plain forward's multiply-add rate"),
           ("total / least", total.wall / floor)) if args.estimates_only else ()),
        *((f"Spearman {pair}", rho) for pair, rho in (sections["heads"].get("spearman") or {}).items()),
        ("peak RSS MB", peak_rss_mb()),
    ])
    print(f"\nstrongest heads by {ranking}:", ", ".join(f"{r['layer']}.{r['head']} ({r[ranking]:.3g})" for r in strongest))
    print("top blocks:", top)
    name = "bench_jacobian_heads_estimates" if args.estimates_only else "bench_jacobian_heads_all" if exact_heads is None else "bench_jacobian_heads"
    path = write_results(name, {
        "load_average": {"start": load_before, "end": load_after},
        "total": {"wall_s": total.wall, "cpu_s": total.cpu},
        "plain_forward": {"wall_s": forward.wall, "cpu_s": forward.cpu, "padded_tokens": padded},
        **({"least": {"multiply_adds_tera": tera, "wall_s": floor}} if args.estimates_only else {}),
        "timings": timings,
        "exact_heads": sections["heads"]["exact_heads"],
        "spearman": sections["heads"].get("spearman"),
        "strongest_heads": [{k: r.get(k) for k in ("layer", "head", "kl_zero", "kl_estimate", "loss_zero", "loss_estimate")} for r in strongest],
        "top_blocks": top,
        "peak_rss_mb": peak_rss_mb(),
    })
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
