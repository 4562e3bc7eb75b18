"""Every method's prediction on one model against the sweep's ground truth at two probe-suite seeds (issue 7).

    python benchmarks/eval_predictions.py MODEL --name NAME --sweeps SEED0.jsonl SEED1.jsonl [-n 10] [--regime zero_shot]

``--regime`` picks the sweeps' prompting regime and makes the default method's prediction for it
(`cp-onnx analyze --regime`). With one sweep file the noise level is not measured: the table then says
which block is best and how the methods rank it, not whether a block helps beyond noise.

Runs `cp-onnx analyze` with its defaults (the default method ``duplication_loss`` and the paper's four),
timed, then judges each method on the sweeps' answer log-probability:
- the ground truth is the mean of the two seeds' gains per block; the noise level is the spread over
  blocks of the difference between the seeds' gains (its robust standard deviation, 1.4826 x the
  median absolute deviation, so the blocks that wreck the model do not set it; it equals two
  standard errors of the mean of two seeds); a block "really helps" when its mean gain is above it;
- top-1 / top-3 hit: the top-1 (any of the top 3) has start and end within 2 layers of the best block;
- realised: the top-1's mean gain over the best block's (only when the best block really helps);
- decision: the paper's methods always name their top-1; the default method names it or abstains.
  It is right when it names a block that really helps, or abstains when no block does.
Speed-up: against the sweep files' own time (cp-onnx's sweep: the base model once, each block rerun
from where it differs, the few-shot examples through the KV cache) and, with ``--naive K``, against
brute force as the paper's baseline does it (each routed model built and run from scratch on the
whole suite: ``cp-onnx sweep --mode naive``), timed here on K blocks spread over the candidates and
scaled to all of them (its time per block hardly depends on the block: every one runs the whole
suite through L + size layers).
Writes benchmarks/results/predictions_NAME.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_common import RESULTS, Stopwatch, say_load, write_results

from cp_onnx.analysis.predict import METHOD
from cp_onnx.analysis.report import read_report
from cp_onnx.models.evaluators import candidate_blocks
from cp_onnx.analyze import Settings, analyze
from cp_onnx.groundtruth import probes
from cp_onnx.groundtruth.sweep import regime_rows
from cp_onnx.groundtruth.sweep import read_sweep, sweep
from cp_onnx.groundtruth.validate import gain, split_rows, validate
from cp_onnx.models.model import open_model

METRIC = "answer_logprob"


def mean_rows(sweeps: list[list[dict]]) -> list[dict]:
    """Per config, the mean over seeds of every metric (per kind too); configs missing from a seed are dropped."""
    keyed = [{(r["start"], r["end"]): r for r in rows} for rows in sweeps]
    common = [key for key in keyed[0] if all(key in k for k in keyed[1:])]

    def mean(values):
        if isinstance(values[0], dict):
            return {key: mean([v[key] for v in values]) for key in values[0] if key not in ("path", "seconds")}
        if isinstance(values[0], str):  # "operation" (sweep format 2): the same for every seed
            return values[0]
        return None if any(v is None for v in values) else float(np.mean(values))

    return [{**mean([k[key] for k in keyed]), "start": key[0], "end": key[1]} for key in common]


def block_gains(paths: list[str], regime: str, metric: str = METRIC) -> dict[tuple[int, int], float]:
    """Per block, its gain in ``metric`` over the unduplicated model in ``regime``, mean of the sweep files' seeds."""
    base, rows = split_rows(mean_rows([regime_rows(read_sweep(path)[1], regime) for path in paths]))
    return {block: gain(row, base, metric) for block, row in rows.items()}


def noise_level(sweeps: list[list[dict]], metric: str = METRIC) -> float:
    """Robust standard deviation over blocks of the difference between two seeds' gains."""
    (base0, blocks0), (base1, blocks1) = (split_rows(rows) for rows in sweeps)
    diffs = np.array([gain(blocks0[b], base0, metric) - gain(blocks1[b], base1, metric) for b in blocks0 if b in blocks1])
    return float(1.4826 * np.median(np.abs(diffs - np.median(diffs))))


def judge(report: dict, rows: list[dict], noise: float | None, regime: str) -> dict:
    """Per method: hits, realised gain, per-kind gains, general cost, decision and whether it was right (the default
    method's ranking and decision for ``regime``)."""
    top1, top3 = (validate(report, rows, top_k=k, metrics=[METRIC], regime=regime) for k in (1, 3))
    best = top1["best"][METRIC]
    some_help = None if noise is None else best["gain"] > noise
    judged = {}
    for method in report["methods"]:
        one, three = top1["methods"][method][METRIC], top3["methods"][method][METRIC]
        decision = report["predictions"][regime]["decision"] if method == METHOD else "help"
        helps = None if noise is None else one["top1"]["gain"] > noise
        judged[method] = {
            "top1": [one["top1"]["start"], one["top1"]["end"]],
            "top1_hit": one["near_best_in_top_k"], "top3_hit": three["near_best_in_top_k"],
            "top1_gain": one["top1"]["gain"], "realised": one["gain_ratio"] if some_help or (some_help is None and best["gain"] > 0) else None,
            "top1_by_kind": one["top1"]["by_kind"], "top1_general_cost": one["top1"]["general_cost"],
            "decision": decision, "right": None if noise is None else (helps if decision == "help" else not some_help),
        }
    return {"best": best, "noise": noise, "some_block_helps": some_help, "methods": judged}


def method_seconds(timings: dict, method: str) -> float:
    """A method's own run time: loading the model, then its pass (the paper's methods share the statistics pass)."""
    own = timings.get(f"{method}_s", 0.0)
    return timings["load_and_rewrite_s"] + own + (timings["statistics_s"] if method != METHOD else 0.0)


def naive_sweep_seconds(model, num_layers: int, count: int, seed: int = 0) -> dict:
    """Brute force timed on ``count`` blocks spread evenly over the candidates (sizes 3-5), scaled to all of them."""
    blocks = candidate_blocks(num_layers, (3, 4, 5))
    chosen = [blocks[round(k * (len(blocks) - 1) / max(count - 1, 1))] for k in range(count)]
    with tempfile.TemporaryDirectory() as folder:
        rows = sweep(model, chosen, probes.probe_suite(seed), out=Path(folder) / "naive.jsonl", mode="naive", log=print, regimes=("few_shot",),
                     progress=lambda done, total: print(f"  naive {done}/{total}", file=sys.stderr, flush=True))
    per_block = [r["seconds"] for r in rows if r["start"] is not None]
    baseline = next(r["seconds"] for r in rows if r["start"] is None)
    return {"blocks_timed": [[r["start"], r["end"]] for r in rows if r["start"] is not None], "seconds_per_block": per_block,
            "baseline_s": baseline, "estimated_s": baseline + float(np.mean(per_block)) * len(blocks)}


def markdown(name: str, command: str, result: dict) -> str:
    judged, best = result["judged"], result["judged"]["best"]
    seeds = "mean of two suite seeds" if judged["noise"] is not None else "one suite seed"
    regime = result["prediction"]["regime"]
    lines = [f"# Predictions on {name} against the sweep (answer log-probability, {seeds}, {regime})", "",
             "Made by:", "", f"    {command}", "",
             f"Best block [{best['start']}, {best['end']}): mean gain {best['gain']:+.4f} nats/item, general-text cost "
             + (f"{best['general_cost']:+.4f}; noise level (sd of the seed-to-seed difference over blocks) {judged['noise']:.4f}; "
              f"some block helps beyond noise: {'yes' if judged['some_block_helps'] else 'no'}." if judged["noise"] is not None else
              f"{best['general_cost']:+.4f}; one suite seed: noise level not measured, so 'right' is n/a."), "",
             f"Analysis (all methods) {result['analysis_s']:.1f} s; the sweep it replaces {result['sweep_s']:.0f} s per seed "
             f"=> {result['speedup']:.0f}x. Load average {result['load_average']['start']} at the start.", "",
             *naive_lines(result),
             "| method | top-1 | top-1 hit | top-3 hit | top-1 gain | realised | general cost | decision | right | seconds | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, j in judged["methods"].items():
        realised = "n/a" if j["realised"] is None else f"{j['realised']:.2f}"
        seconds = method_seconds(result["timings"], method)
        lines.append(f"| {method} | [{j['top1'][0]}, {j['top1'][1]}) | {'yes' if j['top1_hit'] else 'no'} | {'yes' if j['top3_hit'] else 'no'} "
                     f"| {j['top1_gain']:+.4f} | {realised} | {j['top1_general_cost']:+.4f} | {j['decision']} | {_yes_no(j['right'])} "
                     f"| {seconds:.1f} | {result['sweep_s'] / seconds:.0f}x |")
    kinds = list(next(iter(judged["methods"].values()))["top1_by_kind"])
    lines += ["", "Top-1 gain per task kind (answer log-probability, nats/item):", "",
              "| method | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    lines += [f"| {m} | " + " | ".join(f"{j['top1_by_kind'][k]:+.3f}" for k in kinds) + " |" for m, j in judged["methods"].items()]
    lines += ["", f"Default method's decision line: {result['prediction_line']}", ""]
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def naive_lines(result: dict) -> list[str]:
    naive = result.get("naive")
    if not naive:
        return []
    seconds = method_seconds(result["timings"], METHOD)
    return [f"Brute force (each routed model from scratch on the whole suite, `--mode naive`), timed on {len(naive['blocks_timed'])} blocks "
            f"({min(naive['seconds_per_block']):.0f}-{max(naive['seconds_per_block']):.0f} s each) and scaled to all: "
            f"{naive['estimated_s']:.0f} s => the default method is {naive['estimated_s'] / seconds:.0f}x faster than brute force "
            f"({result['sweep_s'] / seconds:.0f}x faster than cp-onnx's own sweep).", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--sweeps", nargs="+", required=True, help="sweep JSONL files of the same model at two suite seeds (or one)")
    parser.add_argument("-n", type=int, default=10, help="calibration texts (default 10, as `cp-onnx analyze`)")
    parser.add_argument("--regime", default="few_shot", choices=("zero_shot", "few_shot"),
                        help="the prompting regime to predict for and judge on (default few_shot: version 1 sweep files hold only that)")
    parser.add_argument("--report", help="judge this report.json (made by `cp-onnx analyze MODEL --regime ...`) instead of analysing again")
    parser.add_argument("--naive", type=int, default=0, metavar="K", help="also time brute force (naive sweep) on K blocks and scale it to all")
    args = parser.parse_args(argv)
    from cp_onnx.outputs.decision import decision_line

    load = say_load("start")
    model = open_model(args.model)
    if args.report:  # an analysis made earlier (e.g. beside the sweeps): its own recorded total time stands for the wall time
        report = read_report(Path(args.report))
        if args.regime not in (report.get("predictions") or {}):
            sys.exit(f"{args.report} holds no {args.regime} prediction; analyze with --regime {args.regime.split('_')[0]}")
        analysis_s = report["timings"]["total_s"]
    else:
        with Stopwatch() as clock:
            report = analyze(model, Settings(n=args.n, regimes=(args.regime,)), log=lambda _: None)
        analysis_s = clock.wall
    sweeps = []
    for path in args.sweeps:
        header, rows = read_sweep(path)
        if header["model"]["onnx_sha256"] != report["model"]["onnx_sha256"]:
            sys.exit(f"{path} is a sweep of another model; sweep {args.model} itself")
        sweeps.append(regime_rows(rows, args.regime))
        if not sweeps[-1]:
            sys.exit(f"{path} holds no {args.regime} rows; choose another --regime")
    sweep_s = float(np.mean([sum(r["seconds"] for r in rows) for rows in sweeps]))
    if len(sweeps) > 2:
        sys.exit("give one or two sweep files (two suite seeds measure the noise)")
    judged = judge(report, mean_rows(sweeps), noise_level(sweeps) if len(sweeps) == 2 else None, args.regime)
    command = "python benchmarks/eval_predictions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.name, "command": command, "analysis_s": analysis_s, "sweep_s": sweep_s, "speedup": sweep_s / analysis_s,
              "timings": report["timings"], "prediction": report["predictions"][args.regime],
              "prediction_line": decision_line(report["predictions"][args.regime], args.regime),
              "judged": judged, "load_average": {"start": load, "end": say_load("end")}}
    if args.naive:
        result["naive"] = naive_sweep_seconds(model, report["model"]["num_layers"], args.naive)
    write_results(f"predictions_{args.name}", result)
    (RESULTS / f"predictions_{args.name}.md").write_text(markdown(args.name, command, result))
    print(markdown(args.name, command, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
