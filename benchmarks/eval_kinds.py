"""Predictions per kind of task against the sweep's per-kind results (issue 13, part 3).

    python benchmarks/eval_kinds.py MODEL --name NAME --sweeps SEED0.jsonl SEED1.jsonl

The default method (duplication_loss, screening on, as `cp-onnx analyze` runs it) is calibrated three ways
on the shipped English reasoning texts, whose lines name their kind:
- "generic": the default set, the first 10 texts (what `cp-onnx analyze` uses);
- "own kind": each kind's texts alone (every kind with at least MIN_TEXTS texts holding numbers);
- "all": all labelled texts, for the per-kind claims of one run (helps / hurts / unclear per kind).
Each ranking is judged on the sweep's answer log-probability on that kind's probes (the few-shot regime
of the committed sweeps), per suite seed and on the mean of the two: the rank of the kind's best block in
the ranking (blocks screened out have none), whether the top-1 is within 2 layers of it, the top-1's
gain on the kind beside the best block's (shortfall = best - top-1, nats per item; 0 is perfect), and the
Spearman correlation between the method's scores and the kind's gains over the blocks it scored (the
whole ranking, not only its top, which a best block inside the noise makes a lottery).
The noise level per kind is eval_predictions' (robust sd over blocks of the seed-to-seed difference).
A per-kind claim (helps or hurts, on any run's top 3 blocks) holds when the sweep's mean gain on that
kind has the claimed sign.
Writes benchmarks/results/kinds_NAME.json and .md (``--rejudge`` judges the runs stored there again).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from scipy.stats import spearmanr

from bench_common import RESULTS, Stopwatch, say_load, write_results
from eval_predictions import mean_rows, noise_level

from cp_onnx.analysis.kinds import HELPS, HURTS
from cp_onnx.analysis.predict import FEW_SHOT, MIN_TEXTS, REGIMES, numeric_tokens, predict
from cp_onnx.analysis.report import file_sha256, write_json
from cp_onnx.calibration import load_calibration, load_kinds
from cp_onnx.groundtruth.regimes import regime_rows
from cp_onnx.groundtruth.sweep import read_sweep
from cp_onnx.groundtruth.validate import validate
from cp_onnx.models.model import open_model

METRIC = "answer_logprob"
GENERIC_N = 10  # `cp-onnx analyze`'s default -n
SEEDS = ("seed 0", "seed 1", "mean")


def kind_rows(rows: list[dict], kind: str) -> list[dict]:
    """Sweep rows with one kind's metrics at the top level, so validate() judges that kind alone."""
    return [{"start": r["start"], "end": r["end"], "general_nll": r.get("general_nll"), **r["by_kind"][kind]} for r in rows]


def judge(blocks: list[tuple[int, int]], scores: list[float], rows: list[dict]) -> dict:
    """One ranking on one kind's sweep rows: best block, its rank, the top-1's gain and shortfall, rank correlation."""
    found = validate({"methods": {"ranking": {"blocks": [{"start": s, "end": e} for s, e in blocks]}}}, rows, top_k=1, metrics=[METRIC])
    best, mine = found["best"][METRIC], found["methods"]["ranking"][METRIC]
    base = next(r for r in rows if r["start"] is None)[METRIC]
    truth = {(r["start"], r["end"]): r[METRIC] - base for r in rows if r["start"] is not None}
    return {"best": [best["start"], best["end"]], "best_gain": best["gain"], "best_rank": mine["best_rank"],
            "top1": [mine["top1"]["start"], mine["top1"]["end"]], "top1_gain": mine["top1"]["gain"],
            "shortfall": best["gain"] - mine["top1"]["gain"], "near": mine["near_best_in_top_k"],
            "spearman": float(spearmanr(scores, [truth[b] for b in blocks]).statistic)}


def run(model, texts: list[str], kinds: list[str], general: list[str]) -> dict:
    with Stopwatch() as clock:
        prediction = predict(model, texts, general, kinds=kinds)
    return {"texts": len(texts), "decision": prediction.decision, "reason": prediction.reason, "seconds": clock.wall,
            "ranking": [[b.start, b.end] for b in prediction.blocks], "scores": [b.score for b in prediction.blocks],
            "report": prediction.as_dict()}


def claims(report: dict, rows: list[dict], noise: dict[str, float]) -> list[dict]:
    """Each candidate's per-kind verdict beside the sweep's mean gain on that kind's probes."""
    out = []
    for block in report["kinds"]["blocks"]:
        row = next(r for r in rows if (r["start"], r["end"]) == (block["start"], block["end"]))
        base = next(r for r in rows if r["start"] is None)
        for kind, said in block["by_kind"].items():
            if kind not in base["by_kind"]:
                continue
            gain = row["by_kind"][kind][METRIC] - base["by_kind"][kind][METRIC]
            holds = None if said["verdict"] not in (HELPS, HURTS) else (gain > 0) == (said["verdict"] == HELPS)
            out.append({"block": [block["start"], block["end"]], "kind": kind, **said, "sweep_gain": gain,
                        "sweep_beyond_noise": abs(gain) > noise[kind], "holds": holds})
    return out


def evaluate(model, sweeps: list[list[dict]]) -> dict:
    texts, kinds = load_calibration(n=None), load_kinds(n=None)
    general = load_calibration("general", n=GENERIC_N)
    digits = [numeric_tokens(model, np.asarray(model.encode([t])[0][0]))[1:].any() for t in texts]
    probe_kinds = list(sweeps[0][0]["by_kind"])
    eligible = [k for k in probe_kinds if sum(d for d, kind in zip(digits, kinds) if kind == k) >= MIN_TEXTS]
    runs = {"generic": run(model, texts[:GENERIC_N], kinds[:GENERIC_N], general)}
    for kind in eligible:
        chosen = [i for i, k in enumerate(kinds) if k == kind]
        runs[kind] = run(model, [texts[i] for i in chosen], [kind] * len(chosen), general)
        print(f"  {kind}: {len(chosen)} texts, {runs[kind]['seconds']:.0f} s", file=sys.stderr, flush=True)
    runs["all"] = run(model, texts, kinds, general)
    return {"eligible_kinds": eligible, "runs": runs, **judge_runs(runs, eligible, sweeps)}


def judge_runs(runs: dict, eligible: list[str], sweeps: list[list[dict]]) -> dict:
    """The runs' rankings and per-kind claims against the sweeps (also from a results file, with --rejudge)."""
    truths = {"seed 0": sweeps[0], "seed 1": sweeps[1], "mean": mean_rows(sweeps)}
    noise = {k: noise_level([kind_rows(rows, k) for rows in sweeps]) for k in sweeps[0][0]["by_kind"]}
    judged = {kind: {seed: {name: judge([tuple(b) for b in runs[name]["ranking"]], runs[name]["scores"], kind_rows(rows, kind))
                            for name in ("generic", kind)}
                     for seed, rows in truths.items()} for kind in eligible}
    return {"noise": noise, "judged": judged, "claims": {name: claims(r["report"], truths["mean"], noise) for name, r in runs.items()}}


def markdown(name: str, command: str, result: dict) -> str:
    judged, runs, noise = result["judged"], result["runs"], result["noise"]
    span = lambda b: "unscored" if b is None else f"[{b[0]}, {b[1]})"  # noqa: E731
    rank = lambda r: "unscored" if r is None else str(r)  # noqa: E731
    lines = [f"# Predictions per kind of task on {name}: own-kind calibration against the generic set", "", "Made by:", "", f"    {command}", "",
             f"Prediction: method duplication_loss, metric {REGIMES[FEW_SHOT].metric}, regime {FEW_SHOT}. Ground truth: the sweeps' "
             f"answer log-probability on each kind's 48 probes (few-shot regime, nats per item), per seed and on their mean. "
             f"Generic = the first {GENERIC_N} texts (the default set); own kind = that kind's texts alone. "
             f"Shortfall = best block's gain - the top-1's gain on the kind (0 = the top-1 is the best block). "
             f"Best rank = where the kind's best block sits in the ranking (unscored: screened out). Rank corr. = Spearman "
             f"correlation of the method's scores with the kind's gains over the blocks it scored. Ordering and syllogism probes "
             f"are answered with names and yes/no, while their calibration texts are scored on the digits they hold.", "",
             "| probe kind | noise | truth | best block (gain) | calibration | texts | decision | top-1 | top-1 gain | shortfall | best rank | within 2 | rank corr. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    wins = {"shortfall": [0, 0, 0], "rank": [0, 0, 0], "spearman": [0, 0, 0]}  # own better, tie, generic better
    for kind, per_seed in judged.items():
        for seed, both in per_seed.items():
            best = both["generic"]
            for calibration, j in both.items():
                label = "generic" if calibration == "generic" else "own kind"
                lines.append(f"| {kind} | {noise[kind]:.3f} | {seed} | {span(best['best'])} ({best['best_gain']:+.3f}) | {label} | "
                             f"{runs[calibration]['texts']} | {runs[calibration]['decision']} | {span(j['top1'])} | {j['top1_gain']:+.3f} | "
                             f"{j['shortfall']:.3f} | {rank(j['best_rank'])} | {'yes' if j['near'] else 'no'} | {j['spearman']:+.2f} |")
            if seed != "mean":
                continue
            own, generic = both[kind], both["generic"]
            wins["shortfall"][_compare(generic["shortfall"], own["shortfall"])] += 1
            ranks = [r if r is not None else 10**6 for r in (own["best_rank"], generic["best_rank"])]
            wins["rank"][_compare(ranks[1], ranks[0])] += 1
            wins["spearman"][_compare(-generic["spearman"], -own["spearman"])] += 1
    helped = [k for k, p in judged.items() if p["mean"]["generic"]["best_gain"] > noise[k]]
    mean = lambda key, own: np.mean([p["mean"][k if own else "generic"][key] for k, p in judged.items()])  # noqa: E731
    lines += ["", f"On the mean of the two seeds, over {len(judged)} kinds: own-kind calibration has the smaller shortfall in "
              f"{wins['shortfall'][0]}, ties in {wins['shortfall'][1]}, the generic set in {wins['shortfall'][2]}; it ranks the kind's best "
              f"block higher in {wins['rank'][0]}, ties in {wins['rank'][1]}, lower in {wins['rank'][2]}; its scores correlate better with "
              f"the kind's gains in {wins['spearman'][0]}, worse in {wins['spearman'][2]}.", "",
              f"Means over kinds (mean truth): shortfall own kind {mean('shortfall', True):.3f}, generic {mean('shortfall', False):.3f} "
              f"nats per item; rank correlation own kind {mean('spearman', True):+.2f}, generic {mean('spearman', False):+.2f}.", "",
              f"Kinds whose best block gains more than the noise level (mean of the seeds): {', '.join(helped) or 'none'}; elsewhere the "
              f"best block is within the seed-to-seed noise, and which block is best is partly luck.", "",
              f"## Per-kind claims of one run on all {runs['all']['texts']} labelled texts (decision: {runs['all']['decision']})", "",
              "Verdicts from the simultaneous 95% bounds, beside the sweep's mean gain on that kind's probes; a claim holds when the signs agree.", "",
              "| block | kind | texts with numbers | gain (calibration) | bounds | verdict | sweep gain | beyond noise | holds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["claims"]["all"]:
        bounds = "n/a" if c["lower"] is None else f"[{c['lower']:+.3f}, {c['upper']:+.3f}]"
        gain = "n/a" if c["gain"] is None else f"{c['gain']:+.3f}"
        holds = "-" if c["holds"] is None else ("yes" if c["holds"] else "no")
        lines.append(f"| {span(c['block'])} | {c['kind']} | {c['with_numbers']} | {gain} | {bounds} | {c['verdict']} | {c['sweep_gain']:+.3f} | "
                     f"{'yes' if c['sweep_beyond_noise'] else 'no'} | {holds} |")
    made = [{**c, "run": name} for name, found in result["claims"].items() for c in found if c["holds"] is not None]
    lines += ["", "## Every helps or hurts claim of any run (its top 3 blocks, every kind of its texts)", "",
              "| calibration | block | kind | gain (calibration) | bounds | verdict | sweep gain | beyond noise | holds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c['run']} | {span(c['block'])} | {c['kind']} | {c['gain']:+.3f} | [{c['lower']:+.3f}, {c['upper']:+.3f}] | {c['verdict']} | "
              f"{c['sweep_gain']:+.3f} | {'yes' if c['sweep_beyond_noise'] else 'no'} | {'yes' if c['holds'] else 'no'} |" for c in made]
    lines += ["", f"Claims made (helps or hurts), over all {len(result['claims'])} runs: {len(made)}; holding on the sweep: "
              f"{sum(c['holds'] for c in made)}; of those, beyond the sweep's noise: {sum(c['holds'] and c['sweep_beyond_noise'] for c in made)}.", "",
              "Run times (s): " + ", ".join(f"{k} {r['seconds']:.0f}" for k, r in runs.items()) + ".", ""]
    return "\n".join(lines)


def _compare(generic: float, own: float) -> int:
    """0 when own-kind calibration is better (smaller), 1 on a tie, 2 when the generic set is."""
    return 1 if abs(generic - own) < 1e-12 else (0 if own < generic else 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--sweeps", nargs=2, help="sweep JSONL files of the same model at two suite seeds")
    parser.add_argument("--rejudge", action="store_true", help="judge the runs in results/kinds_NAME.json against --sweeps again and "
                        "rewrite its .json and .md, without running the model")
    args = parser.parse_args(argv)
    if not args.sweeps:
        parser.error("give --sweeps SEED0.jsonl SEED1.jsonl")
    if args.rejudge:
        result = json.loads((RESULTS / f"kinds_{args.name}.json").read_text())
        sweeps = [few_shot_rows(path, result["onnx_sha256"]) for path in args.sweeps]
        result |= judge_runs(result["runs"], result["eligible_kinds"], sweeps)
        write_json(result, RESULTS / f"kinds_{args.name}.json")  # the machine and load of the run that made the rankings stay
        (RESULTS / f"kinds_{args.name}.md").write_text(markdown(args.name, result["command"], result))
        return 0
    load = say_load("start")
    model = open_model(args.model)
    onnx_sha256 = file_sha256(model.onnx_path)
    sweeps = [few_shot_rows(path, onnx_sha256) for path in args.sweeps]
    command = "python benchmarks/eval_kinds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.name, "command": command, "onnx_sha256": onnx_sha256, **evaluate(model, sweeps)}
    result["load_average"] = {"start": load, "end": say_load("end")}
    write_results(f"kinds_{args.name}", result)
    text = markdown(args.name, command, result)
    (RESULTS / f"kinds_{args.name}.md").write_text(text)
    print(text)
    return 0


def few_shot_rows(path: str, onnx_sha256: str) -> list[dict]:
    """A sweep file's few-shot rows (the committed sweeps' only regime); exit with one line for another model's or a file without kinds."""
    header, rows = read_sweep(path)
    if header["model"]["onnx_sha256"] != onnx_sha256:
        sys.exit(f"{path} is a sweep of another model; sweep the model itself")
    rows = regime_rows(rows, "few_shot")
    if not rows or "by_kind" not in rows[0]:
        sys.exit(f"{path} holds no few-shot rows with per-kind results; give a sweep written by `cp-onnx sweep`")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
