"""The `cp-onnx` command: thin argument parsing over the library; every error is one line and exit 2."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cp_onnx.errors import CpOnnxError

EXIT_USAGE = 2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str):
        self.label, self.start, self.tty = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
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

    folder = export(args.source, Path(args.out) if args.out else None, with_past=args.with_past, log=log)
    print(folder)
    return 0


def cmd_analyze(args) -> int:
    from cp_onnx import analyze, report
    from cp_onnx.model import open_model
    from cp_onnx.summary import print_summary

    methods = analyze.SINGLE_SET_METHODS if args.method == "all" else (args.method,)
    if args.method == "all" and args.contrastive:
        methods = methods + ("contrastive",)
    settings = analyze.Settings(
        calibration=args.calibration, n=args.n, max_length=args.max_length, methods=methods,
        block_sizes=args.block_sizes, batch_size=args.batch_size, threads=args.threads,
    )
    model = open_model(args.model, tokenizer_dir=args.tokenizer, log=log)
    result = analyze.analyze(model, settings, log=log, progress=Progress("calibration texts"))
    if args.languages:
        langs = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
        result.languages = analyze.language_check(model, settings, langs, log=log)
    data = report.build_report(result)
    out = report.write_json(data, Path(args.out) / "report.json")
    print_summary(data)
    log(f"report written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cp-onnx", description="Find, verify and apply reasoning circuits in ONNX transformer models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a HF folder, a GGUF file or 'smollm2' to an ONNX model folder")
    p.add_argument("source", help="Hugging Face model folder, .gguf file, or 'smollm2' (the default model)")
    p.add_argument("--out", help="folder to write (default: the export cache, whose path is printed)")
    p.add_argument("--with-past", action="store_true", help="also export with_past/model.onnx (KV cache, for generation)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="rank candidate circuits from activation statistics of calibration texts")
    p.add_argument("model", nargs="?", default=None, help="exported folder, .onnx file, or anything `export` accepts (default: smollm2)")
    p.add_argument("--tokenizer", help="folder holding tokenizer.json, when MODEL is a bare .onnx file elsewhere")
    p.add_argument("--calibration", help="'reasoning' (default), 'general', 'mixed', or a .txt/.jsonl file of texts")
    p.add_argument("-n", type=int, default=10, help="number of calibration texts (default 10)")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default 128)")
    p.add_argument("--method", default="all", choices=["all", "stability", "anomaly", "composite", "boundary", "contrastive"], help="scoring method (default: all of the paper's)")
    p.add_argument("--contrastive", action="store_true", help="with --method all, also run the contrastive method (reasoning vs general texts)")
    p.add_argument("--block-sizes", type=_int_list, default=(3, 4, 5), help="candidate block sizes (default 3,4,5)")
    p.add_argument("--languages", help="also report the top blocks per language, e.g. en,hi,zh,fr")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--out", default="cp-onnx-out", help="output folder for report.json (default ./cp-onnx-out)")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log("cp-onnx: interrupted")
        return 130
    except Exception as exc:
        from exporters.errors import ExportError
        from graph_passes.errors import GraphPassError

        if isinstance(exc, (CpOnnxError, ExportError, GraphPassError)):
            log(f"cp-onnx: error: {exc}")
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
