"""Predictions per kind of task against the sweep's per-kind results (issue 13, part 3).

    python benchmarks/eval_kinds.py MODEL --name NAME --sweeps SEED0.jsonl SEED1.jsonl [--regime zero]

The default method (duplication_loss, screening on, as `cp-onnx analyze` runs it) is calibrated several ways
on the shipped English reasoning texts, whose lines name their kind. Few-shot (the default):
- "generic": the default set, the first 10 texts (what `cp-onnx analyze` uses);
- "own kind": each kind's texts alone (every kind with at least MIN_TEXTS texts holding numbers);
- "all": all labelled texts, for the per-kind claims of one run (helps / hurts / unclear per kind).
Zero-shot (``--regime zero``, the texts that state an answer, asked alone):
- "generic": all the answered questions (what `cp-onnx analyze --regime zero` uses; also the per-kind claims' run);
- "own kind": each kind's questions alone (every kind with at least MIN_TEXTS of them);
- "same size": as many questions as the kind has, drawn across all kinds in turn, so that own-kind
  calibration is also compared with a generic set holding no more evidence than it does.
Each ranking is judged on the sweep's answer log-probability on that kind's probes (in the regime
predicted for), per suite seed and on the mean of the two: the rank of the kind's best block in
the ranking (blocks screened out have none), whether the top-1 is within 2 layers of it, the top-1's
gain on the kind beside the best block's (shortfall = best - top-1, nats per item; 0 is perfect), and the
Spearman correlation between the method's scores and the kind's gains over the blocks it scored (the
whole ranking, not only its top, which a best block inside the noise makes a lottery).
The noise level per kind is eval_predictions' (robust sd over blocks of the seed-to-seed difference).
A per-kind claim (helps or hurts, on any run's top 3 blocks) holds when the sweep's mean gain on that
kind has the claimed sign.
Writes benchmarks/results/kinds_NAME.json and .md (kinds_NAME-zero-shot.* with ``--regime zero``; ``--rejudge``
judges the runs stored there again).
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
from cp_onnx.analysis.predict import MEASURES, MIN_TEXTS, numeric_tokens, predict
from cp_onnx.regimes import FEW_SHOT, ZERO_SHOT
from cp_onnx.files import file_sha256, write_json
from cp_onnx.calibration import load_calibration, load_kinds, load_questions
from cp_onnx.groundtruth.sweep import regime_rows
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


def run(model, texts: list[str], kinds: list[str], general: list[str], questions: list[tuple[str, str, str]] = ()) -> dict:
    """One prediction: few-shot on ``texts``, or zero-shot on ``questions`` (the texts then only price the cost side)."""
    regime = ZERO_SHOT if questions else FEW_SHOT
    with Stopwatch() as clock:
        prediction = predict(model, texts, general, kinds=kinds, regimes=(regime,), questions=questions)[regime]
    return {"texts": len(questions) if questions else len(texts), "decision": prediction.decision, "reason": prediction.reason, "seconds": clock.wall,
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


def evaluate_zero_shot(model, sweeps: list[list[dict]]) -> dict:
    """Zero-shot: all answered questions (generic), each kind's alone, and a same-size mix of kinds for each."""
    questions, general = load_questions(), load_calibration("general", n=GENERIC_N)
    texts, kinds = load_calibration(n=GENERIC_N), load_kinds(n=GENERIC_N)  # the cost side, as `analyze --regime zero` prices it
    probe_kinds = list(sweeps[0][0]["by_kind"])
    eligible = [k for k in probe_kinds if sum(q[2] == k for q in questions) >= MIN_TEXTS]
    runs, mixed = {"generic": run(model, texts, kinds, general, questions)}, interleaved(questions)
    for kind in eligible:
        own = [q for q in questions if q[2] == kind]
        runs[kind] = run(model, texts, kinds, general, own)
        runs[f"same size:{kind}"] = run(model, texts, kinds, general, mixed[: len(own)])
        print(f"  {kind}: {len(own)} questions, {runs[kind]['seconds']:.0f} s", file=sys.stderr, flush=True)
    return {"regime": ZERO_SHOT, "eligible_kinds": eligible, "runs": runs, **judge_runs(runs, eligible, sweeps)}


def interleaved(questions: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The questions taken one kind after another in turn (each kind's in file order): any prefix is a mix of kinds."""
    by_kind: dict[str, list] = {}
    for q in questions:
        by_kind.setdefault(q[2], []).append(q)
    rounds = max(len(qs) for qs in by_kind.values())
    return [qs[i] for i in range(rounds) for qs in by_kind.values() if i < len(qs)]


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
    return {"regime": FEW_SHOT, "eligible_kinds": eligible, "runs": runs, **judge_runs(runs, eligible, sweeps)}


def judge_runs(runs: dict, eligible: list[str], sweeps: list[list[dict]]) -> dict:
    """The runs' rankings and per-kind claims against the sweeps (also from a results file, with --rejudge)."""
    truths = {"seed 0": sweeps[0], "seed 1": sweeps[1], "mean": mean_rows(sweeps)}
    noise = {k: noise_level([kind_rows(rows, k) for rows in sweeps]) for k in sweeps[0][0]["by_kind"]}
    judged = {kind: {seed: {name: judge([tuple(b) for b in runs[name]["ranking"]], runs[name]["scores"], kind_rows(rows, kind))
                            for name in ("generic", kind, f"same size:{kind}") if name in runs}
                     for seed, rows in truths.items()} for kind in eligible}
    return {"noise": noise, "judged": judged, "claims": {name: claims(r["report"], truths["mean"], noise) for name, r in runs.items()}}


CALIBRATIONS = {"generic": "generic", "own": "own kind", "same size": "generic, same size"}


def markdown(name: str, command: str, result: dict) -> str:
    judged, runs, noise = result["judged"], result["runs"], result["noise"]
    regime = result.get("regime", FEW_SHOT)
    whole = "all" if "all" in runs else "generic"  # the run on every labelled text, whose per-kind claims are shown
    span = lambda b: "unscored" if b is None else f"[{b[0]}, {b[1]})"  # noqa: E731
    rank = lambda r: "unscored" if r is None else str(r)  # noqa: E731
    generic = (f"generic = the first {GENERIC_N} texts (the default set); own kind = that kind's texts alone" if regime == FEW_SHOT else
               f"generic = all {runs['generic']['texts']} answered questions (the default set); own kind = that kind's questions alone; "
               f"generic, same size = as many questions as the kind has, drawn from every kind in turn")
    digits_caveat = (" Ordering and syllogism probes are answered with names and yes/no, while their calibration texts are scored on the "
                     "digits they hold." if regime == FEW_SHOT else "")
    lines = [f"# Predictions per kind of task on {name} ({regime.replace('_', '-')}): own-kind calibration against a generic set", "",
             "Made by:", "", f"    {command}", "",
             f"Prediction: method duplication_loss, metric {MEASURES[regime].metric}, regime {regime}. Ground truth: the sweeps' "
             f"answer log-probability on each kind's 48 probes ({regime.replace('_', '-')} regime, nats per item), per seed and on their "
             f"mean. Calibration: {generic}. Shortfall = best block's gain - the top-1's gain on the kind (0 = the top-1 is the best "
             f"block). Best rank = where the kind's best block sits in the ranking (unscored: screened out). Rank corr. = Spearman "
             f"correlation of the method's scores with the kind's gains over the blocks it scored.{digits_caveat}", "",
             "| probe kind | noise | truth | best block (gain) | calibration | texts | decision | top-1 | top-1 gain | shortfall | best rank | within 2 | rank corr. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    others = [c for c in ("generic", "same size") if any(_run_name(c, k) in runs for k in judged)]
    wins = {other: {"shortfall": [0, 0, 0], "rank": [0, 0, 0], "spearman": [0, 0, 0]} for other in others}  # own better, tie, other better
    for kind, per_seed in judged.items():
        for seed, found in per_seed.items():
            best = found["generic"]
            for calibration in ("generic", "own", "same size"):
                run_name = _run_name(calibration, kind)
                if run_name not in found:
                    continue
                j = found[run_name]
                lines.append(f"| {kind} | {noise[kind]:.3f} | {seed} | {span(best['best'])} ({best['best_gain']:+.3f}) | {CALIBRATIONS[calibration]} | "
                             f"{runs[run_name]['texts']} | {runs[run_name]['decision']} | {span(j['top1'])} | {j['top1_gain']:+.3f} | "
                             f"{j['shortfall']:.3f} | {rank(j['best_rank'])} | {'yes' if j['near'] else 'no'} | {j['spearman']:+.2f} |")
            if seed != "mean":
                continue
            own = found[kind]
            for other in others:
                theirs = found[_run_name(other, kind)]
                wins[other]["shortfall"][_compare(theirs["shortfall"], own["shortfall"])] += 1
                ranks = [r if r is not None else 10**6 for r in (own["best_rank"], theirs["best_rank"])]
                wins[other]["rank"][_compare(ranks[1], ranks[0])] += 1
                wins[other]["spearman"][_compare(-theirs["spearman"], -own["spearman"])] += 1
    helped = [k for k, p in judged.items() if p["mean"]["generic"]["best_gain"] > noise[k]]
    mean = lambda key, calibration: np.mean([p["mean"][_run_name(calibration, k)][key] for k, p in judged.items()])  # noqa: E731
    lines.append("")
    for other, won in wins.items():
        lines += [f"Own kind against {CALIBRATIONS[other]}, on the mean of the two seeds, over {len(judged)} kinds: own-kind calibration has the "
                  f"smaller shortfall in {won['shortfall'][0]}, ties in {won['shortfall'][1]}, the {CALIBRATIONS[other]} set in "
                  f"{won['shortfall'][2]}; it ranks the kind's best block higher in {won['rank'][0]}, ties in {won['rank'][1]}, lower in "
                  f"{won['rank'][2]}; its scores correlate better with the kind's gains in {won['spearman'][0]}, worse in {won['spearman'][2]}.", ""]
    lines += ["Means over kinds (mean truth): shortfall " + ", ".join(f"{CALIBRATIONS[c]} {mean('shortfall', c):.3f}" for c in ("own", *others)) +
              " nats per item; rank correlation " + ", ".join(f"{CALIBRATIONS[c]} {mean('spearman', c):+.2f}" for c in ("own", *others)) + ".", "",
              f"Kinds whose best block gains more than the noise level (mean of the seeds): {', '.join(helped) or 'none'}; elsewhere the "
              f"best block is within the seed-to-seed noise, and which block is best is partly luck.", "",
              f"## Per-kind claims of one run on all {runs[whole]['texts']} labelled {'texts' if regime == FEW_SHOT else 'questions'} "
              f"(decision: {runs[whole]['decision']})", "",
              "Verdicts from the simultaneous 95% bounds, beside the sweep's mean gain on that kind's probes; a claim holds when the signs agree.", "",
              "| block | kind | texts with numbers | gain (calibration) | bounds | verdict | sweep gain | beyond noise | holds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["claims"][whole]:
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


def _run_name(calibration: str, kind: str) -> str:
    """The runs' key of a calibration for one probe kind: generic is shared, own kind is the kind's name."""
    return {"generic": "generic", "own": kind, "same size": f"same size:{kind}"}[calibration]


def _compare(generic: float, own: float) -> int:
    """0 when own-kind calibration is better (smaller), 1 on a tie, 2 when the generic set is."""
    return 1 if abs(generic - own) < 1e-12 else (0 if own < generic else 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--sweeps", nargs=2, help="sweep JSONL files of the same model at two suite seeds")
    parser.add_argument("--regime", choices=("few", "zero"), default="few", help="the prompting regime to predict for and judge in")
    parser.add_argument("--rejudge", action="store_true", help="judge the runs in results/kinds_NAME.json against --sweeps again and "
                        "rewrite its .json and .md, without running the model")
    args = parser.parse_args(argv)
    if not args.sweeps:
        parser.error("give --sweeps SEED0.jsonl SEED1.jsonl")
    regime = ZERO_SHOT if args.regime == "zero" else FEW_SHOT
    stem = f"kinds_{args.name}_{regime}"
    if args.rejudge:
        result = json.loads((RESULTS / f"{stem}.json").read_text())
        sweeps = [regime_rows_of(path, result["onnx_sha256"], regime) for path in args.sweeps]
        result |= judge_runs(result["runs"], result["eligible_kinds"], sweeps)
        write_json(result, RESULTS / f"{stem}.json")  # the machine and load of the run that made the rankings stay
        (RESULTS / f"{stem}.md").write_text(markdown(args.name, result["command"], result))
        return 0
    load = say_load("start")
    model = open_model(args.model)
    onnx_sha256 = file_sha256(model.onnx_path)
    sweeps = [regime_rows_of(path, onnx_sha256, regime) for path in args.sweeps]
    command = "python benchmarks/eval_kinds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"name": args.name, "command": command, "onnx_sha256": onnx_sha256, **(evaluate_zero_shot if regime == ZERO_SHOT else evaluate)(model, sweeps)}
    result["load_average"] = {"start": load, "end": say_load("end")}
    write_results(stem, result)
    text = markdown(args.name, command, result)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


def regime_rows_of(path: str, onnx_sha256: str, regime: str) -> list[dict]:
    """A sweep file's rows of one regime; exit with one line for another model's sweep or a file without them."""
    header, rows = read_sweep(path)
    if header["model"]["onnx_sha256"] != onnx_sha256:
        sys.exit(f"{path} is a sweep of another model; sweep the model itself")
    rows = regime_rows(rows, regime)
    if not rows or "by_kind" not in rows[0]:
        sys.exit(f"{path} holds no {regime.replace('_', '-')} rows with per-kind results; give a sweep of that regime written by `cp-onnx sweep`")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
