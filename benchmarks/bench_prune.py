"""Pruning's trade on one model (issue 15): what each method removes, what it costs, how much faster and smaller it gets.

    python benchmarks/bench_prune.py [MODEL] --name NAME --sweep SKIP.jsonl [--sizes 1,2,3,4] [--fractions 0.1,0.2,0.3]
                                     [--threads 2] [--rounds 7] [--prompt-tokens 256] [--decode-tokens 32]

1. Predictions from the calibration texts alone (10 reasoning, 10 general): every layer method's choice of
   n layers (``cp_onnx.analysis.prune``) and both head methods' scores on the reasoning texts (``cp_onnx.analysis.head_pruning``), timed.
2. Removals of ``--sizes`` layers: each method's choice scored on the probe suite (seed 0, the sweep's
   evaluator and plan, so its numbers are the sweep's), beside the sweep's least harmful block of that
   size: the cost (baseline answer log-prob minus the choice's), its ratio to the best's cost, and the
   excess as a share of the baseline's loss (-answer log-prob).
3. The trade at ``--fractions`` of the layers and of the heads: every method's choice scored the same way
   (heads: the pruned model itself), and the default's pruned model (and each head method's) written by
   ``prune_folder`` and timed against the unpruned model in the same run: file size; prefill tokens/s (the
   ``--prompt-tokens`` prompt into an empty KV cache, as `cp-onnx generate` runs it: the last position's logits
   only), forward tokens/s (the no-cache graph over the prompt with every position's logits, as scoring runs
   it) and decode tokens/s (KV-cached greedy steps after that prompt). Baseline and pruned model alternate for ``--rounds`` rounds; the speed-up is
   the median over rounds of the per-round ratio, from wall time and from this process's CPU time (the
   CPU-time ratio stays meaningful on a busy machine).
Writes results/bench_prune_NAME.json, results/prune_NAME.md and results/prune_NAME.png (cost against speed-up).

    python benchmarks/bench_prune.py [MODEL] --name NAME --speed-only I:J [--rounds 15] ...

times only: the model without layers I..J-1 (`cp-onnx prune --skip I:J`) beside the original, as in 3;
writes results/prune_speed_NAME.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import RESULTS, Stopwatch, say_load, write_results

from cp_onnx.analysis import head_pruning, prune
from cp_onnx.calibration import load_calibration
from cp_onnx.groundtruth import probes
from cp_onnx.groundtruth.sweep import regime_rows
from cp_onnx.models.scoring import ProbePlan
from cp_onnx.groundtruth.sweep import ReuseEvaluator, read_sweep
from cp_onnx.groundtruth.validate import best_block, split_rows
from cp_onnx.models.generate import CachedDecoder, generation_runner
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import Runner
from cp_onnx.models.apply import prune_folder
from graph_passes.edit import Edit
from graph_passes.layer_path import format_path

METRIC = "answer_logprob"


class Quality:
    """Probe-suite metrics of any layer path of the model, or of a pruned folder: the sweep's plan and evaluator."""

    def __init__(self, model, sweep_rows: list[dict], threads: int | None):
        self.items = probes.probe_suite(0)
        self.encode = lambda text: model.encode([text])[0][0]
        self.plan = ProbePlan(self.items, self.encode, probes.general_texts(), batch_size=16, max_length=256, share_prefixes=True)
        self.threads, self.graph = threads, model.with_past_path
        self.known = {row["path"]: row for row in sweep_rows}  # the sweep already scored these paths, identically
        self.evaluator = None

    def path(self, path: list[int]) -> dict:
        text = format_path(path)
        if text not in self.known:
            self.evaluator = self.evaluator or ReuseEvaluator(self.graph, self.plan, self.threads)
            self.known[text] = self.evaluator.evaluate(path)
        return self.known[text]

    def folder(self, folder: Path) -> dict:
        pruned = open_model(folder)
        evaluator = ReuseEvaluator(pruned.with_past_path, self.plan, self.threads)
        return evaluator.evaluate(list(range(evaluator.num_layers)))


PHASES = ("prefill", "forward", "decode")


def speed(base: Path, pruned: Path, *, threads: int, rounds: int, prompt_tokens: int, decode_tokens: int) -> dict:
    """Throughput of ``pruned`` against ``base`` per phase (PHASES, see _Timed), alternating; medians over rounds."""
    runs = {"base": _Timed(open_model(base), threads), "pruned": _Timed(open_model(pruned), threads)}
    vocab = open_model(base).manifest.get("vocab_size") or 256
    ids = np.random.default_rng(0).integers(3, min(vocab, 20000), size=(1, prompt_tokens))  # what the tokens are does not change the work
    for timed in runs.values():
        timed.prefill(ids), timed.forward(ids), timed.decode(ids[0, :16].tolist(), 2)  # warm up
    samples = {name: {phase: [] for phase in PHASES} for name in runs}
    for _ in range(rounds):
        for name, timed in runs.items():
            samples[name]["prefill"].append(timed.prefill(ids))
            samples[name]["forward"].append(timed.forward(ids))
            samples[name]["decode"].append(timed.decode(ids[0].tolist(), decode_tokens))
    result = {}
    for phase in PHASES:
        tokens = decode_tokens if phase == "decode" else prompt_tokens
        base_s, pruned_s = (np.array(samples[name][phase]) for name in ("base", "pruned"))  # [rounds, (wall, cpu)]
        result[phase] = {
            "base_tokens_per_s": tokens / float(np.median(base_s[:, 0])), "pruned_tokens_per_s": tokens / float(np.median(pruned_s[:, 0])),
            "speedup_wall": float(np.median(base_s[:, 0] / pruned_s[:, 0])), "speedup_cpu": float(np.median(base_s[:, 1] / pruned_s[:, 1])),
        }
    return result


class _Timed:
    """One model's three phases. prefill: the prompt through the KV-cache graph from an empty cache, as `generate`
    runs it (the last position's logits only); forward: the no-cache graph over the prompt with every position's
    logits, as scoring runs it; decode: KV-cached greedy steps after the prompt."""

    def __init__(self, model, threads: int):
        self.runner = Runner(model.onnx_path, threads=threads)
        self.decoder = CachedDecoder(generation_runner(model.with_past_path, threads=threads), model.manifest)

    def prefill(self, ids: np.ndarray) -> tuple[float, float]:
        with Stopwatch() as watch:
            self.decoder.start(ids[0].tolist())
        return watch.wall, watch.cpu

    def forward(self, ids: np.ndarray) -> tuple[float, float]:
        with Stopwatch() as watch:
            self.runner.run(ids, np.ones_like(ids), ["logits"])
        return watch.wall, watch.cpu

    def decode(self, prompt: list[int], steps: int) -> tuple[float, float]:
        logits = self.decoder.start(prompt)
        with Stopwatch() as watch:
            for _ in range(steps):
                logits = self.decoder.step(int(np.argmax(logits)))
        return watch.wall, watch.cpu


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.onnx*") if p.is_file())


def cost(row: dict, baseline: dict) -> float:
    """Answer log-probability lost against the baseline, nats per item (positive: worse)."""
    return baseline[METRIC] - row[METRIC]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--name", required=True)
    parser.add_argument("--sweep", help="`cp-onnx sweep --skip` file of this model, suite seed 0 (required unless --speed-only)")
    parser.add_argument("--speed-only", metavar="I:J", help="only time the model without layers I..J-1 beside the original")
    parser.add_argument("--sizes", default="1,2,3,4")
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.speed_only:
        return speed_only(args)
    if not args.sweep:
        parser.error("--sweep is required unless --speed-only is given")
    load = [say_load("start")]
    model = open_model(args.model, with_past=True, log=print)
    header, rows = read_sweep(Path(args.sweep))
    rows = regime_rows(rows, "few_shot")  # the Quality plan below is the shipped suite's few-shot regime
    baseline, blocks = split_rows(rows)
    num_layers, heads_per_layer = model.manifest["num_layers"], model.manifest["num_heads"]
    sizes = [int(s) for s in args.sizes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    layer_counts = {f: max(1, round(f * num_layers)) for f in fractions}
    head_counts = {f: max(1, round(f * num_layers * heads_per_layer)) for f in fractions}
    reasoning, general = load_calibration("reasoning", n=10), load_calibration("general", n=10)

    with Stopwatch() as layer_watch:
        found = prune.predict_layers(model, reasoning, general, max_layers=max([*sizes, *layer_counts.values()]), threads=args.threads)
    with Stopwatch() as head_watch:
        head_scores = head_pruning.head_scores(model, reasoning, threads=args.threads)
    print(f"predictions: layers {layer_watch.wall:.0f} s, heads {head_watch.wall:.0f} s")
    quality = Quality(model, rows, args.threads)

    removals = {}
    for n in sizes:
        sized = {b: r for b, r in blocks.items() if b[1] - b[0] == n}
        best = best_block(baseline, sized, METRIC)
        entry = {"best": {"layers": list(range(*best)), "cost": cost(sized[best], baseline), "general_nll_change": sized[best]["general_nll"] - baseline["general_nll"]} if best else None}
        for method in prune.METHODS:
            layers = list(found.choices[method][n].layers)
            row = quality.path([l for l in range(num_layers) if l not in layers])
            c = cost(row, baseline)
            best_cost = entry["best"]["cost"] if entry["best"] else None
            entry[method] = {"layers": layers, "cost": c, "general_nll_change": row["general_nll"] - baseline["general_nll"],
                             "cost_ratio": c / best_cost if best_cost and best_cost > 0 else None,
                             "excess_of_baseline": (c - best_cost) / abs(baseline[METRIC]) if best_cost is not None else None}
        removals[n] = entry
        print(f"{n} layers: best {entry['best']}; " + "; ".join(f"{m} {entry[m]['layers']} cost {entry[m]['cost']:+.3f}" for m in prune.METHODS))

    trade, written = [], tempfile.TemporaryDirectory(prefix="bench-prune-")
    original = Path(model.path)
    for fraction in fractions:
        n = layer_counts[fraction]
        sized = {b: r for b, r in blocks.items() if b[1] - b[0] == n}
        best = best_block(baseline, sized, METRIC)
        choices = {m: list(found.choices[m][n].layers) for m in prune.METHODS}
        if best:
            choices["sweep_best"] = list(range(*best))
        kept = [l for l in range(model.num_layers) if l not in set(choices[prune.DEFAULT])]
        folder = prune_folder(model, Edit.layers(kept), Path(written.name) / f"layers{n}", log=lambda _: None)
        timing = speed(original, folder, threads=args.threads, rounds=args.rounds, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
        size = folder_bytes(folder) / folder_bytes(original)
        for method, layers in choices.items():
            row = quality.path([l for l in range(num_layers) if l not in layers])
            trade.append({"what": "layers", "fraction": fraction, "count": n, "method": method, "removed": layers, "metrics": row,
                          "cost": cost(row, baseline), "size_ratio": size, "speed": timing})
        shutil.rmtree(folder)  # a pruned Gemma is ~3 GB with both graphs: keep one on disk at a time
        for method, scores in head_scores.items():
            chosen = head_pruning.choose_heads(scores, head_counts[fraction])
            folder = prune_folder(model, Edit.heads(chosen), Path(written.name) / f"heads_{method}_{head_counts[fraction]}", log=lambda _: None)
            row = quality.folder(folder)
            trade.append({"what": "heads", "fraction": fraction, "count": head_counts[fraction], "method": method,
                          "removed": {str(l): hs for l, hs in chosen.items()}, "metrics": row, "cost": cost(row, baseline),
                          "size_ratio": folder_bytes(folder) / folder_bytes(original),
                          "speed": speed(original, folder, threads=args.threads, rounds=args.rounds, prompt_tokens=args.prompt_tokens,
                                         decode_tokens=args.decode_tokens)})
            shutil.rmtree(folder)
        print(f"{fraction:.0%}: " + "; ".join(f"{t['what']} {t['method']} cost {t['cost']:+.3f} prefill x{t['speed']['prefill']['speedup_wall']:.2f}"
                                             for t in trade if t["fraction"] == fraction))
    written.cleanup()
    load.append(say_load("end"))
    data = {"model": model.name, "num_layers": num_layers, "heads_per_layer": heads_per_layer, "sweep": {"file": str(args.sweep), "suite": header["suite"]},
            "baseline": {k: baseline[k] for k in (METRIC, "greedy_accuracy", "choice_accuracy", "general_nll", "by_kind")},
            "prediction_seconds": {"layers": layer_watch.wall, "heads": head_watch.wall}, "pruning": found.as_dict(top=3),
            "removals": removals, "trade": trade, "settings": vars(args), "load_average": load}
    write_results(f"bench_prune_{args.name}", data)
    (RESULTS / f"prune_{args.name}.md").write_text(markdown(data))
    plot(data, RESULTS / f"prune_{args.name}.png")
    print(markdown(data))


def speed_only(args: argparse.Namespace) -> None:
    """The model without layers I..J-1 timed beside the original (section 3's measurement alone)."""
    load = [say_load("start")]
    model = open_model(args.model, with_past=True, log=print)
    start, end = (int(x) for x in args.speed_only.split(":"))
    original = Path(model.path)
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as scratch:
        folder = prune_folder(model, Edit.skip(start, end), Path(scratch) / "pruned", log=lambda _: None)
        timing = speed(original, folder, threads=args.threads, rounds=args.rounds, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
        size = folder_bytes(folder) / folder_bytes(original)
    load.append(say_load("end"))
    write_results(f"prune_speed_{args.name}", {"model": model.name, "num_layers": model.manifest["num_layers"], "removed": list(range(start, end)),
                                               "size_ratio": size, "speed": timing, "settings": vars(args), "load_average": load})
    for phase in PHASES:
        t = timing[phase]
        print(f"{phase}: {t['base_tokens_per_s']:.0f} -> {t['pruned_tokens_per_s']:.0f} tokens/s, x{t['speedup_wall']:.3f} wall, x{t['speedup_cpu']:.3f} CPU")
    print(f"files x{size:.3f}")


def markdown(data: dict) -> str:
    """The two tables: removals of 1-4 layers against the sweep's best, and the trade at each fraction."""
    base = data["baseline"]
    lines = [f"# Pruning {data['model']} ({data['num_layers']} layers, {data['heads_per_layer']} heads each)", "",
             f"Baseline: answer log-prob {base[METRIC]:.3f} nats/item, greedy {base['greedy_accuracy']:.3f}, choice {base['choice_accuracy']:.3f}, "
             f"general NLL {base['general_nll']:.3f}. Predictions from 10 reasoning + 10 general calibration texts: layers "
             f"{data['prediction_seconds']['layers']:.0f} s, heads {data['prediction_seconds']['heads']:.0f} s.", "",
             "## Removing n layers: each method's choice against the sweep's least harmful block", "",
             "cost: answer log-prob lost (nats/item); ratio: cost / the best block's cost; excess: (cost - best cost) / baseline loss.", "",
             "| n | sweep best | cost | method | removes | cost | ratio | excess | general NLL change |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, entry in data["removals"].items():
        best = entry["best"] or {}
        for method in prune.METHODS:
            e = entry[method]
            ratio = "n/a" if e["cost_ratio"] is None else f"{e['cost_ratio']:.2f}"
            excess = "n/a" if e["excess_of_baseline"] is None else f"{e['excess_of_baseline']:+.1%}"
            lines.append(f"| {n} | {best.get('layers')} | {best.get('cost', float('nan')):+.3f} | {method} | {e['layers']} | {e['cost']:+.3f} | {ratio} | {excess} | {e['general_nll_change']:+.3f} |")
    lines += ["", "## The trade: quality cost against size and speed (pruned model beside the unpruned one, same run)", "",
              "| removed | count | method | cost | greedy | choice | general NLL | file | prefill x (wall / cpu) | forward x (wall / cpu) | decode x (wall / cpu) | prefill tok/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in data["trade"]:
        m, s = t["metrics"], t["speed"]
        lines.append(f"| {t['what']} {t['fraction']:.0%} | {t['count']} | {t['method']} | {t['cost']:+.3f} | {m['greedy_accuracy']:.3f} | {m['choice_accuracy']:.3f} | "
                     f"{m['general_nll']:.3f} | {t['size_ratio']:.2f} | " + "".join(_ratio(s, phase) for phase in PHASES) + f"{s['prefill']['pruned_tokens_per_s']:.0f} |")
    kinds = list(base["by_kind"])
    lines += ["", "## Per kind of task: answer log-prob lost (nats/item) and greedy accuracy after / before", "",
              "| removed | method | " + " | ".join(kinds) + " |", "| --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for t in data["trade"]:
        by_kind = t["metrics"]["by_kind"]
        cells = [f"{base['by_kind'][k][METRIC] - by_kind[k][METRIC]:+.2f} ({by_kind[k]['greedy_accuracy']:.2f} / {base['by_kind'][k]['greedy_accuracy']:.2f})"
                 for k in kinds]
        lines.append(f"| {t['what']} {t['fraction']:.0%} | {t['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(speeds: dict, phase: str) -> str:
    """A table cell: the phase's wall / CPU speed-ups (n/a in results measured before the phase existed)."""
    s = speeds.get(phase)
    return "n/a | " if s is None else f"{s['speedup_wall']:.2f} / {s['speedup_cpu']:.2f} | "


def plot(data: dict, path: Path) -> None:
    """Cost against prefill speed-up, one line per method and kind of pruning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cp_onnx.outputs.plots import save_png

    figure = Figure(figsize=(7, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key in dict.fromkeys((t["what"], t["method"]) for t in data["trade"]):
        points = [t for t in data["trade"] if (t["what"], t["method"]) == key]
        axes.plot([t["speed"]["prefill"]["speedup_wall"] for t in points], [t["cost"] for t in points], marker="o" if key[0] == "layers" else "s",
                  label=f"{key[0]}: {key[1]}")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set(xlabel="prefill speed-up over the unpruned model (wall time)", ylabel="answer log-prob lost (nats/item)",
             title=f"Pruning {data['model']}: 10/20/30% of layers or heads")
    axes.legend(fontsize=8)
    save_png(figure, path)


if __name__ == "__main__":
    began = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - began:.0f} s")
