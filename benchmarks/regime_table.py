"""The ground truth per prompting regime and metric, as a markdown table, from sweep files (issue 13, part 1).

    python benchmarks/regime_table.py --sweeps NAME SEED0.jsonl [SEED1.jsonl] [--sweeps NAME2 ...]

One row per model, regime held by its sweeps and metric: each seed's baseline, the best blocks by the mean
gain over the seeds, how many blocks gain at all, and the noise level: the robust sd over blocks of the
seed-to-seed difference of the gains (1.4826 x MAD; n/a with one seed), and whether the best block's gain
clears it. Reads no model; prints the table.
"""
from __future__ import annotations

import argparse

from bench_common import ROOT  # noqa: F401  (puts the checkout on the path)
from eval_predictions import mean_rows, noise_level

from cp_onnx.groundtruth.sweep import regime_rows, regimes_of
from cp_onnx.groundtruth.sweep import read_sweep
from cp_onnx.groundtruth.validate import gain, split_rows

METRICS = {"answer_logprob": "answer log-prob (nats/item)", "greedy_accuracy": "greedy accuracy", "choice_accuracy": "choice accuracy"}
SHOWN = 3  # best blocks listed per row


def rows_for(name: str, paths: list[str]) -> list[str]:
    """The table's rows of one model: every regime its sweeps hold, every metric."""
    files = [read_sweep(path)[1] for path in paths]
    lines = []
    for regime in regimes_of(files[0]):
        seeds = [regime_rows(rows, regime) for rows in files]
        base, blocks = split_rows(mean_rows(seeds) if len(seeds) > 1 else seeds[0])
        for metric, label in METRICS.items():
            gains = {b: g for b, g in ((b, gain(row, base, metric)) for b, row in blocks.items()) if g is not None}
            if not gains:
                continue
            ranked = sorted(gains, key=lambda b: (-gains[b], b))
            level = noise_level(seeds, metric) if len(seeds) == 2 else None
            baselines = ", ".join(f"{split_rows(s)[0][metric]:.3f}" for s in seeds)
            best = ", ".join(f"[{s}, {e}) {gains[s, e]:+.3f}" for s, e in ranked[:SHOWN])
            beyond = "n/a" if level is None else ("yes" if gains[ranked[0]] > level else "no")
            lines.append(f"| {name} | {regime.replace('_', '-')} | {label} | {baselines} | {best} | "
                         f"{sum(g > 0 for g in gains.values())} of {len(gains)} | {'n/a' if level is None else f'{level:.3f}'} | {beyond} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", action="append", required=True, metavar="NAME FILE",
                        help="a model's name, then its sweep files (one per suite seed, at most two)")
    args = parser.parse_args(argv)
    print("| model | regime | metric | baseline (per seed) | best blocks (mean gain) | blocks gaining | noise | best beyond noise |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, *paths in args.sweeps:
        if not 1 <= len(paths) <= 2:
            parser.error(f"--sweeps {name}: give one or two sweep files after the name")
        print("\n".join(rows_for(name, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
