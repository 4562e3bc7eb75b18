"""Which tokens of the calibration texts should the default method score? (issue 13, part 4)

    python benchmarks/eval_token_sets.py [MODEL] --name NAME --sweeps SEED0.jsonl [SEED1.jsonl]

The default method (few-shot) scores the tokens that hold digits. This tries adding the tokens whose
prediction depends on the reasoning before them: a token's log-probability under the base model with
the whole text before it, minus with only the text's first token and the WINDOW tokens just before
it (its "context gain"); a token counts when that exceeds a threshold. Each token set runs the default
method unscreened on the shipped 10 texts and is judged on the sweeps' few-shot answer log-prob
(mean of the seeds): Spearman over blocks, the top-1's gain, the decision, and the kinds of text
that get scored tokens. Writes benchmarks/results/token_sets_NAME.json and .md.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

from bench_common import RESULTS, Stopwatch, say_load, write_results

from cp_onnx.analysis import predict as predict_module
from cp_onnx.analysis.predict import numeric_tokens  # the default's marker, kept while predict_module's is swapped
from cp_onnx.calibration import load_calibration, load_kinds
from cp_onnx.models.scoring import token_scores
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import Runner, pad_batch
from eval_predictions import block_gains

WINDOW = 4  # tokens of local context: enough for a phrase, too few for the problem statement
BATCH = 64


def context_gains(runner: Runner, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per token (0 and -inf for the first): its context gain and its log-prob with the whole text before it."""
    logits = runner.run(*pad_batch([ids]))[runner.output_names[0]][0]
    whole = token_scores(logits[:-1], np.asarray(ids[1:]))[0]
    windows = [[ids[0], *ids[max(1, p - WINDOW):p]] for p in range(1, len(ids))]
    local = []
    for at in range(0, len(windows), BATCH):
        chunk = windows[at:at + BATCH]
        out = runner.run(*pad_batch(chunk))[runner.output_names[0]]
        rows = np.stack([out[r, len(w) - 1] for r, w in enumerate(chunk)])
        local.append(token_scores(rows, np.asarray(ids[at + 1:at + 1 + len(chunk)]))[0])
    return np.concatenate([[0.0], whole - np.concatenate(local)]), np.concatenate([[-np.inf], whole])


def token_sets(runner: Runner) -> dict[str, Callable]:
    """Name -> marker(model, ids) -> which tokens to score; the context gains are computed once per text."""
    memo: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def marker(threshold: float, digits: bool = True, floor: float | None = None) -> Callable:
        def mark(model, ids) -> np.ndarray:
            key = tuple(int(i) for i in ids)
            if key not in memo:
                memo[key] = context_gains(runner, list(key))
            lift, whole = memo[key]
            chosen = (lift > threshold) & (whole > floor if floor is not None else True)
            return chosen | numeric_tokens(model, ids) if digits else chosen
        return mark

    return {"digits (the default)": numeric_tokens, "digits + context gain > 1": marker(1.0),
            "digits + context gain > 2": marker(2.0), "context gain > 2 only": marker(2.0, digits=False),
            "digits + context gain > 2, p > e^-2": marker(2.0, floor=-2.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--name", required=True)
    parser.add_argument("--sweeps", nargs="+", required=True)
    args = parser.parse_args()
    start = say_load("start")
    truth = block_gains(args.sweeps, "few_shot")
    best = max(truth, key=truth.get)
    model = open_model(args.model)
    texts, kinds, general = load_calibration(n=10), load_kinds(n=10), load_calibration("general", n=10)
    results = []
    try:
        for name, mark in token_sets(Runner(model.onnx_path)).items():
            predict_module.numeric_tokens = mark  # the one place predict picks the scored tokens
            with Stopwatch() as clock:
                found = predict_module.predict(model, texts, general, kinds=kinds, regimes=("few_shot",), screen=False)["few_shot"]
            blocks = [b for b in found.blocks if (b.start, b.end) in truth]
            top = found.blocks[0]
            results.append({"tokens": name, "scored": found.texts["digit_tokens"], "texts_scored": found.texts["with_numbers"],
                            "spearman": float(spearmanr([b.score for b in blocks], [truth[b.start, b.end] for b in blocks]).statistic),
                            "top1": [top.start, top.end], "top1_gain": truth.get((top.start, top.end)), "decision": found.decision,
                            "kinds_scored": sorted(k for k, g in found.by_kind[top.start, top.end].items() if g.gain is not None),
                            "seconds": clock.wall})
    finally:
        predict_module.numeric_tokens = numeric_tokens
    command = f"python benchmarks/eval_token_sets.py {args.model} --name {args.name} --sweeps {' '.join(args.sweeps)}"
    lines = [f"# Scored tokens of the default method on {args.name} (few-shot)", "", "Made by:", "", f"    {command}", "",
             f"Sweep's best block [{best[0]}, {best[1]}) {truth[best]:+.3f} nats/item (mean of {len(args.sweeps)} seeds). "
             f"Context gain: log-prob with the whole text before a token minus with its first token and the {WINDOW} before it.", "",
             "| scored tokens | tokens | texts scored | Spearman with the sweep | top-1 | its sweep gain | decision | kinds scored | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tokens']} | {r['scored']} | {r['texts_scored']} | {r['spearman']:+.2f} | [{r['top1'][0]}, {r['top1'][1]}) | "
              f"{r['top1_gain']:+.3f} | {r['decision']} | {', '.join(r['kinds_scored'])} | {r['seconds']:.0f} |" for r in results]
    print("\n".join(lines))
    (RESULTS / f"token_sets_{args.name}.md").write_text("\n".join(lines) + "\n")
    write_results(f"token_sets_{args.name}", {"command": command, "best": [*best, truth[best]], "runs": results,
                                                "load_average": {"start": start, "end": say_load("end")}})


if __name__ == "__main__":
    main()
