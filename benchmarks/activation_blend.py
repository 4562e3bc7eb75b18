"""Would the activation-level measures improve the default ranking? (issue 13, part 4)

    python benchmarks/activation_blend.py --case NAME KINDS.json REPORT.json REGIME SWEEP0.jsonl [SWEEP1.jsonl] [--case ...]

Per case: the default method's scores of the blocks it scored (the "generic" run of an eval_kinds.py result), each
of the paper's activation-level methods' scores (a `cp-onnx analyze` report.json: the residual-stream statistics of
the calibration texts, the same for either regime), and the sweeps' mean answer log-prob gain per block. Blends
rank(default) + w * rank(method) (ranks standardised) and prints, per method and weight, the Spearman correlation
with the sweep and the sweep gain of the blend's top-1. Reads no model; prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata, spearmanr

from bench_common import ROOT  # noqa: F401  (puts the checkout on the path)
from eval_predictions import block_gains


METHODS = ("stability", "anomaly", "composite", "boundary")
WEIGHTS = (0.0, 0.25, 0.5, 1.0)


def standard_ranks(values: np.ndarray) -> np.ndarray:
    ranks = rankdata(values)
    return (ranks - ranks.mean()) / ranks.std()


def case_rows(name: str, kinds: str, report: str, regime: str, sweeps: list[str]) -> list[str]:
    run = json.loads(Path(kinds).read_text())["runs"]["generic"]
    default = {tuple(b): s for b, s in zip(run["ranking"], run["scores"])}
    truth = block_gains(sweeps, regime)
    methods = json.loads(Path(report).read_text())["methods"]
    lines = []
    for method in METHODS:
        scores = {(b["start"], b["end"]): b["score"] for b in methods[method]["blocks"] if b["score"] is not None}
        blocks = [b for b in default if b in truth and b in scores]
        mine, theirs = (np.array([table[b] for b in blocks]) for table in (default, scores))
        cells = []
        for weight in WEIGHTS:
            blend = standard_ranks(mine) + weight * standard_ranks(theirs)
            top = blocks[int(np.argmax(blend))]
            rho = spearmanr(blend, [truth[b] for b in blocks]).statistic
            cells.append(f"{rho:+.2f} / [{top[0]}, {top[1]}) {truth[top]:+.3f}")
        alone = spearmanr(theirs, [truth[b] for b in blocks]).statistic
        lines.append(f"| {name} | {regime} | {len(blocks)} | {max(truth.values()):+.3f} | {method} | {alone:+.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", action="append", required=True, metavar="ARG",
                        help="NAME KINDS.json REPORT.json REGIME SWEEP0.jsonl [SWEEP1.jsonl]")
    cases = parser.parse_args().case
    if any(len(case) < 5 for case in cases):
        parser.error("each --case needs NAME KINDS.json REPORT.json REGIME and at least one sweep file")
    head = " | ".join(f"w = {w}: Spearman / top-1 gain" for w in WEIGHTS)
    print(f"| model | regime | blocks | sweep best | method | method alone: Spearman | {head} |")
    print("|" + " --- |" * (6 + len(WEIGHTS)))
    for name, kinds, report, regime, *sweeps in cases:
        print("\n".join(case_rows(name, kinds, report, regime, sweeps)))


if __name__ == "__main__":
    main()
