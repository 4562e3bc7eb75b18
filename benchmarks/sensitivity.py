"""How the default method's prediction moves with the number of calibration texts and their language (issue 7).

    python benchmarks/sensitivity.py [MODEL] --name NAME [--counts 5,10,20,50] [--languages en,hi,zh,fr] [--questions 10,20,40,83]

Runs ``predict`` (method ``duplication_loss``) on the first N shipped English reasoning texts for each
count, and on 10 texts in each language (the sets are translations of each other, digits unchanged);
general texts stay the first N English ones; and zero-shot (``--regime zero``) on the first N of the
shipped questions with answers, for each count of ``--questions`` (empty: none). Prints and writes the top-3 blocks, the decision, the
gain and its lower bound per run, and the spread of the top-1 start and end over each series.
Writes benchmarks/results/sensitivity_NAME.json and .md.
"""
from __future__ import annotations

import argparse

from bench_common import RESULTS, Stopwatch, say_load, write_results

from cp_onnx.analysis.predict import predict
from cp_onnx.regimes import FEW_SHOT, ZERO_SHOT
from cp_onnx.calibration import load_calibration, load_questions
from cp_onnx.models.model import open_model


def run(model, language: str, n: int, regime: str = FEW_SHOT) -> dict:
    """One prediction on the first ``n`` texts (few-shot) or questions (zero-shot); general texts: the first ``n``, at most 10 zero-shot."""
    questions = load_questions()[:n] if regime == ZERO_SHOT else ()
    general = load_calibration("general", n=min(n, 10) if regime == ZERO_SHOT else n)
    with Stopwatch() as clock:
        result = predict(model, load_calibration("reasoning", n=10 if regime == ZERO_SHOT else n, language=language), general,
                         regimes=(regime,), questions=questions)[regime]
    top = result.blocks[0]
    scored = result.texts.get("questions") if regime == ZERO_SHOT else result.texts["digit_tokens"]
    return {"language": language, "n": n, "regime": regime, "digit_tokens": scored, "decision": result.decision,
            "top3": [[b.start, b.end] for b in result.blocks[:3]], "gain": top.score,
            "gain_lower_bound": top.metrics["gain_lower_bound"], "seconds": clock.wall}


def spread(runs: list[dict]) -> dict:
    starts, ends = [r["top3"][0][0] for r in runs], [r["top3"][0][1] for r in runs]
    return {"start_range": max(starts) - min(starts), "end_range": max(ends) - min(ends),
            "distinct_top1": len({tuple(r["top3"][0]) for r in runs}), "decisions": sorted({r["decision"] for r in runs})}


def markdown(name: str, command: str, series: dict) -> str:
    lines = [f"# Sensitivity of the default method on {name}", "", "Made by:", "", f"    {command}", ""]
    for title, runs in series.items():
        spread_ = spread(runs)
        scored = "questions" if runs[0].get("regime") == ZERO_SHOT else "digit tokens"
        lines += [f"## {title}", "", f"| language | texts | {scored} | top-1 | top-2 | top-3 | gain | lower bound | decision | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            tops = " | ".join(f"[{s}, {e})" for s, e in r["top3"])
            lines.append(f"| {r['language']} | {r['n']} | {r['digit_tokens']} | {tops} | {r['gain']:+.4f} | {r['gain_lower_bound']:+.4f} | {r['decision']} | {r['seconds']:.0f} |")
        lines += ["", f"Top-1 spread: start range {spread_['start_range']}, end range {spread_['end_range']}, "
                      f"{spread_['distinct_top1']} distinct top-1 blocks; decisions {', '.join(spread_['decisions'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--name", required=True)
    parser.add_argument("--counts", default="5,10,20,50")
    parser.add_argument("--languages", default="en,hi,zh,fr")
    parser.add_argument("--questions", default="10,20,40,83", help="zero-shot question counts (empty: no zero-shot series)")
    args = parser.parse_args(argv)
    load = say_load("start")
    model = open_model(args.model)
    series = {"Calibration texts (English)": [run(model, "en", int(n)) for n in args.counts.split(",")],
              "Languages (10 texts each)": [run(model, lang, 10) for lang in args.languages.split(",")]}
    if args.questions:
        series["Zero-shot questions (English; gain per question)"] = [run(model, "en", int(n), ZERO_SHOT) for n in args.questions.split(",")]
    command = "python benchmarks/sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(f"sensitivity_{args.name}", {"command": command, "series": series,
                                               "spread": {title: spread(runs) for title, runs in series.items()},
                                               "load_average": {"start": load, "end": say_load("end")}})
    text = markdown(args.name, command, series)
    (RESULTS / f"sensitivity_{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
