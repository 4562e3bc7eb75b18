"""`cp-onnx batch MANIFEST.toml`: analyze (and, when asked, sweep and validate) many models, resumably.

The manifest names the models and the settings (keys are checked; relative paths are relative to it)::

    out = "batch-out"                  # default: <manifest name>-out beside the manifest
    [settings]                         # analyze settings for every model (a model may override any)
    n = 10
    block_sizes = [3, 4, 5]
    regimes = "zero,few"               # as `cp-onnx analyze --regime` (default both)
    jacobian = true                    # also: heads, exact_heads = 16 or "all", prune, contrastive, languages = ["fr"]
    [sweep]                            # optional: brute-force ground truth, then validation
    sizes = [3, 4, 5]
    per_kind = 8                       # probe items per kind (or probes = "suite.jsonl")
    general = true                     # also score general texts (the general-text cost)
    regimes = "zero,few"               # prompting regimes, as `cp-onnx sweep --regimes` (default both)
    validate = true
    [[models]]
    source = "smollm2"                 # anything `cp-onnx export` accepts, an exported folder or a .onnx
    name = "smollm2"                   # output sub-folder (default: from the source)

Each model writes OUT/NAME/report.json (and sweep.jsonl, validation.json). A model whose report has
the same model identity (onnx and weights sha256), calibration identity and methods is skipped; a
sweep resumes where it stopped. A failing model is recorded with its error and the batch goes on.
OUT/batch.json, OUT/summary.csv and OUT/summary.md are rewritten (atomically) after every model.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cp_onnx import analyze, calibration, inputs, shapes
from cp_onnx.analysis.report import read_report
from cp_onnx.files import file_sha256, write_json
from cp_onnx.errors import CpOnnxError, one_line
from cp_onnx.executors import Executor, InProcessExecutor
from cp_onnx.files import write_text
from cp_onnx.regimes import REGIMES, parse_regimes
from cp_onnx.groundtruth.sweep import regimes_of

BATCH_FORMAT = "cp-onnx-batch"
# Every analysis option (analyze.Settings), as `cp-onnx analyze` takes it: regimes "zero,few", exact_heads a number or "all".
SETTING_TYPES = {"calibration": str, "n": int, "max_length": int, "language": str, "methods": list, "block_sizes": list,
                 "batch_size": int, "threads": int, "regimes": str, "screen": bool, "contrastive": bool, "jacobian": bool, "heads": bool,
                 "exact_heads": (int, str), "prune": bool, "languages": list}
SWEEP_TYPES = {"sizes": list, "all_blocks": bool, "mode": str, "per_kind": int, "probes": str, "batch_size": int,
               "max_length": int, "general": bool, "validate": bool, "regimes": str}
MODEL_TYPES = {"source": str, "name": str, "tokenizer": str, **SETTING_TYPES}
TOP_TYPES = {"out": str, "settings": dict, "sweep": dict, "models": list}
SHIPPED_CALIBRATION = {"reasoning", "general", "mixed"}
SUMMARY_METRIC = "answer_logprob"  # the sweep metric the summary shows (validation.json holds them all)


@dataclass(frozen=True)
class ModelJob:
    """One model's work, picklable for worker processes and Ray tasks."""

    name: str
    source: str
    tokenizer: str | None
    settings: analyze.Settings
    sweep: dict | None
    folder: Path
    previous: dict | None = None  # identity of the report already in ``folder``, if any


@dataclass
class Batch:
    manifest: Path
    out: Path
    jobs: list[ModelJob]


def load_manifest(path: str | Path, out: str | Path | None = None) -> Batch:
    """Read and check a batch manifest; ``out`` overrides its ``out``."""
    if importlib.util.find_spec("tomllib") is None:  # Python 3.10
        raise CpOnnxError("reading a batch manifest needs Python 3.11 or later (tomllib)")
    path = Path(path)
    try:
        text = inputs.read_text(path, "batch manifest", cap_mb=inputs.MAX_TOML_MB)
    except FileNotFoundError:
        raise CpOnnxError(f"no batch manifest at {path}; write a TOML file with [[models]] entries (see `cp-onnx batch --help`)") from None
    data = shapes.parse_toml(text, path, "fix the manifest")
    _check_keys(data, TOP_TYPES, f"{path}")
    base = path.resolve().parent  # absolute paths: Ray workers do not share this process's working directory
    out_dir = Path(out).resolve() if out is not None else _inside(base, data.get("out", f"{path.stem}-out"), path)
    defaults = _settings_kwargs(data.get("settings", {}), base, f"[settings] of {path}")
    sweep = _sweep_options(data.get("sweep"), base, path)
    models = data.get("models") or []
    if not models:
        raise CpOnnxError(f"{path} lists no models; add [[models]] entries with a source each")
    jobs, names = [], set()
    for k, entry in enumerate(models, 1):
        where = f"model {k} of {path}"
        _check_keys(entry, MODEL_TYPES, where)
        if "source" not in entry:
            raise CpOnnxError(f"{where} has no source; give source = a model folder, .onnx, .gguf or a packaged name such as smollm2")
        source = _source(base, entry["source"])
        name = entry.get("name") or default_name(source)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) or name in (".", ".."):
            raise CpOnnxError(f"{where} has name {name[:60]!r}; use up to 100 letters, digits, '.', '_' or '-' (it names the output folder)")
        if name in names:
            raise CpOnnxError(f"two models of {path} are named {name!r}; give each a distinct name = \"...\"")
        names.add(name)
        overrides = _settings_kwargs({k: v for k, v in entry.items() if k in SETTING_TYPES}, base, where)
        tokenizer = str(_relative(base, entry["tokenizer"])) if "tokenizer" in entry else None
        jobs.append(ModelJob(name, source, tokenizer, analyze.Settings(**(defaults | overrides)), sweep, out_dir / name))
    return Batch(path, out_dir, jobs)


def default_name(source: str) -> str:
    """Output folder name for a source: a packaged name, a folder's name, a .gguf's stem, a .onnx's folder."""
    path = Path(source)
    name = path.parent.name if path.suffix == ".onnx" else path.stem if path.suffix == ".gguf" else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


def run_batch(batch: Batch, executor: Executor | None = None, *, log: Callable[[str], None] = print) -> list[dict]:
    """Run every model (skipping finished ones) through ``executor``; return one result per model, in manifest order."""
    executor = executor or InProcessExecutor()
    jobs = [replace(job, previous=report_identity(job.folder / "report.json"),
                    settings=job.settings if job.settings.threads else replace(job.settings, threads=executor.threads_per_task))
            for job in batch.jobs]
    results = [pending(job) for job in jobs]
    log(f"batch: {len(jobs)} models into {batch.out} ({sum(j.previous is not None for j in jobs)} with a report already)")
    write_outputs(batch, results)
    began, done = time.perf_counter(), 0
    try:
        for done, result in enumerate(executor.map(run_model, jobs), 1):
            for note in result.pop("notes", []):
                log(f"  {result['name']}: {note}")
            results[done - 1] = result
            write_outputs(batch, results)
            elapsed = time.perf_counter() - began
            log(f"batch {done}/{len(jobs)}: {result['name']} {result['status']} in {result['seconds']:.1f}s"
                + (f" ({result['error']})" if result["error"] else "")
                + f"; {elapsed:.0f}s elapsed, ETA {elapsed / done * (len(jobs) - done):.0f}s")
    except Exception as exc:  # the executor itself broke (no cluster, a lost Ray worker): record what did not run
        for k in range(done, len(jobs)):
            results[k] = {**results[k], "status": "failed", "error": f"not run: the executor failed ({type(exc).__name__}: {exc})"}
        write_outputs(batch, results)
        if isinstance(exc, CpOnnxError):  # a setup problem the user must fix (e.g. an unreachable --address)
            raise
    return results


def report_identity(path: Path) -> dict | None:
    """What decides whether a report can be reused: model, calibration, methods (None without a readable report)."""
    try:
        report = read_report(path, complete=True)
    except CpOnnxError:
        return None
    model = report.get("model") or {}
    return {"onnx_sha256": model.get("onnx_sha256"), "weights_sha256": model.get("weights_sha256"),
            "calibration_identity": (report.get("calibration") or {}).get("identity"), "methods": sorted(report.get("methods") or {}),
            "sections": sorted(key for key in SECTIONS.values() if key in report), "regimes": sorted(report.get("predictions") or {})}


# What an analysis option adds to a report: a report lacking the section its settings ask for is not reused.
SECTIONS = {"jacobian": "jacobian", "heads": "heads", "prune": "pruning", "languages": "languages"}


def pending(job: ModelJob) -> dict:
    return {"name": job.name, "source": job.source, "status": "pending", "error": None, "seconds": 0.0, "report": None,
            "model": None, "decisions": {}, "top": {}, "validation": None}


def run_model(job: ModelJob) -> dict:
    """One model: open (exporting if needed), analyze unless its report is current, then sweep and validate if asked."""
    from cp_onnx.models.model import open_model

    began, notes = time.perf_counter(), []
    result = pending(job)
    try:
        model = open_model(job.source, tokenizer_dir=job.tokenizer, log=notes.append)
        report_path = job.folder / "report.json"
        if _is_current(job, model):
            report, result["status"] = read_report(report_path, complete=True), "skipped"
        else:
            report = analyze.analyze(model, job.settings, log=notes.append)
            analyze.save(report, job.folder)
            result["status"] = "analyzed"
        result.update(report=str(report_path), model=_model_fields(report), decisions=_decisions(report), top=_top_fields(report))
        if job.sweep:
            result["validation"] = _sweep_and_validate(job, model, report, notes)
    except Exception as exc:  # recorded, and the batch goes on
        from exporters.errors import ExportError
        from graph_passes.errors import GraphPassError

        known = isinstance(exc, (CpOnnxError, ExportError, GraphPassError))
        result.update(status="failed", error=one_line(str(exc) if known else f"{type(exc).__name__}: {exc}"))
    result.update(seconds=round(time.perf_counter() - began, 3), notes=notes)
    return result


def _is_current(job: ModelJob, model) -> bool:
    """Whether the report in the job's folder was made on this model, these calibration texts and these methods."""
    previous, s = job.previous, job.settings
    if previous is None or not set(s.methods) <= set(previous["methods"]):
        return False
    if not {SECTIONS[option] for option in SECTIONS if getattr(s, option)} <= set(previous["sections"]):
        return False
    if analyze.predict.METHOD in s.methods and not set(s.regimes) <= set(previous["regimes"]):
        return False
    texts = calibration.load_calibration(s.calibration, n=s.n, language=s.language)
    return (previous["calibration_identity"] == calibration.calibration_identity(texts, s.identity_settings())
            and previous["weights_sha256"] == model.manifest.get("weights_sha256")
            and previous["onnx_sha256"] == file_sha256(model.onnx_path))


def _sweep_and_validate(job: ModelJob, model, report: dict, notes: list) -> dict | None:
    from cp_onnx.groundtruth import probes
    from cp_onnx.groundtruth.sweep import read_sweep, sweep
    from cp_onnx.groundtruth.validate import validate_regimes

    options = job.sweep
    items = probes.load_suite(options["probes"]) if "probes" in options else (
        probes.probe_suite(0, options["per_kind"]) if "per_kind" in options else None)
    path = job.folder / "sweep.jsonl"
    general = None if options.get("general", True) else []  # None: the shipped general texts (for the general-text cost)
    sweep(model, None, items, out=path, general=general, log=notes.append, threads=job.settings.threads,
          **{k: (tuple(v) if k == "sizes" else v) for k, v in options.items() if k in ("sizes", "all_blocks", "mode", "batch_size", "max_length", "regimes")})
    if not options.get("validate", True):
        return None
    header, rows = read_sweep(path)
    validation = validate_regimes(report, rows, sweep_header=header)
    write_json(validation, job.folder / "validation.json")
    summary = {}
    for regime, judged in validation["regimes"].items():
        best = judged["best"].get(SUMMARY_METRIC) or {}
        summary[regime] = {"best": [best.get("start"), best.get("end")], "best_gain": best.get("gain"),
                           "top1_gain": {m: (v.get(SUMMARY_METRIC, {}).get("top1") or {}).get("gain") for m, v in judged["methods"].items()}}
    return {"metric": SUMMARY_METRIC, "regimes": summary}


def _model_fields(report: dict) -> dict:
    model = report["model"]
    return {k: model.get(k) for k in ("family", "num_layers", "onnx_sha256", "weights_sha256")} | {
        "calibration_identity": report["calibration"]["identity"]}


def _decisions(report: dict) -> dict[str, str]:
    """Per regime, the default method's decision as line-based readers take it: "help START:END" or "abstain"."""
    from cp_onnx.outputs.embed import decision_text

    return {regime: decision_text(found) for regime, found in (report.get("predictions") or {}).items()}


def _top_fields(report: dict) -> dict:
    return {m: {k: e["blocks"][0][k] for k in ("start", "end", "score")} for m, e in report["methods"].items() if e.get("blocks")}


# ---- outputs: batch.json, summary.csv, summary.md ----

def write_outputs(batch: Batch, results: list[dict]) -> None:

    failures = [{"name": r["name"], "source": r["source"], "error": r["error"]} for r in results if r["status"] == "failed"]
    write_json({"format": BATCH_FORMAT, "version": 1, "manifest": str(batch.manifest), "models": results, "failures": failures},
               batch.out / "batch.json")
    columns, rows = summary_table(results)
    write_text(batch.out / "summary.csv", _csv(columns, rows))
    write_text(batch.out / "summary.md", _markdown(columns, rows))


def summary_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and one row per model: status, model, each method's top-1 block and score, sweep gains per regime, time, error."""
    methods = list(dict.fromkeys(m for r in results for m in r["top"]))
    regimes = regimes_of((r.get("validation") or {}) for r in results)  # validated regimes; gain columns name theirs
    decided = [r for r in REGIMES if any(r in (result.get("decisions") or {}) for result in results)]
    columns = ["name", "status", "family", "layers", *(f"decision_{r}" for r in decided)]
    for m in methods:
        columns += [f"{m}_block", f"{m}_depth", f"{m}_score"] + [f"{m}_gain_{g}" for g in regimes]
    for g in regimes:
        columns += [f"best_block_{g}", f"best_gain_{g}"]
    columns += ["seconds", "error"]
    rows = []
    for r in results:
        model, layers = r["model"] or {}, (r["model"] or {}).get("num_layers")
        row = [r["name"], r["status"], model.get("family", ""), layers or "", *((r.get("decisions") or {}).get(g, "") for g in decided)]
        validation = (r.get("validation") or {}).get("regimes") or {}
        for m in methods:
            top = r["top"].get(m)
            row += [f"{top['start']}:{top['end']}", f"{100 * top['start'] / layers:.0f}-{100 * top['end'] / layers:.0f}%", _cell(top["score"])] if top else ["", "", ""]
            row += [_cell(((validation.get(g) or {}).get("top1_gain") or {}).get(m)) for g in regimes]
        for g in regimes:
            best = (validation.get(g) or {}).get("best") or [None, None]
            row += [f"{best[0]}:{best[1]}" if best[0] is not None else "", _cell((validation.get(g) or {}).get("best_gain"))]
        rows.append(row + [f"{r['seconds']:.1f}", r["error"] or ""])
    return columns, rows


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _csv(columns: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def _markdown(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- manifest checks ----

def _check_keys(table: dict, types: dict, where: str) -> None:
    if not isinstance(table, dict):
        raise CpOnnxError(f"{where} must be a table of keys; see `cp-onnx batch --help` for the manifest format")
    for key, value in table.items():
        if key not in types:
            raise CpOnnxError(f"{where} has an unknown key {key!r}; use one of {', '.join(types)}")
        want = types[key] if isinstance(types[key], tuple) else (types[key],)
        if not isinstance(value, want) or (int in want and bool not in want and isinstance(value, bool)):
            raise CpOnnxError(f"{where}: {key} must be a {' or '.join(w.__name__ for w in want)}, not {value!r}")


def _settings_kwargs(table: dict, base: Path, where: str) -> dict:
    _check_keys(table, SETTING_TYPES, where)
    kwargs = dict(table)
    for key in ("n", "max_length", "batch_size", "threads"):
        if key in kwargs and kwargs[key] < 1:
            raise CpOnnxError(f"{where}: {key} must be at least 1, not {kwargs[key]}")
    if "methods" in kwargs:
        unknown = [m for m in kwargs["methods"] if m not in analyze.METHODS]
        if unknown or not kwargs["methods"]:
            raise CpOnnxError(f"{where}: methods {unknown or '[]'} unknown; choose from {', '.join(analyze.METHODS)}")
        kwargs["methods"] = tuple(kwargs["methods"])
    if kwargs.pop("contrastive", False):
        kwargs["methods"] = tuple(dict.fromkeys([*kwargs.get("methods", analyze.DEFAULT_METHODS), "contrastive"]))
    if "block_sizes" in kwargs:
        kwargs["block_sizes"] = _positive_ints(kwargs["block_sizes"], "block_sizes", where)
    if "calibration" in kwargs and kwargs["calibration"] not in SHIPPED_CALIBRATION:
        kwargs["calibration"] = str(_relative(base, kwargs["calibration"]))
    try:
        if "regimes" in kwargs:
            kwargs["regimes"] = parse_regimes(kwargs["regimes"])
        if "exact_heads" in kwargs:
            kwargs["exact_heads"] = analyze.exact_heads_option(str(kwargs["exact_heads"]))
    except CpOnnxError as err:
        raise CpOnnxError(f"{where}: {err}") from None
    if "languages" in kwargs:
        if any(not isinstance(lang, str) or not lang.strip() for lang in kwargs["languages"]):
            raise CpOnnxError(f"{where}: languages must be a list of language codes such as [\"fr\", \"hi\"], not {kwargs['languages']!r}")
        kwargs["languages"] = tuple(lang.strip() for lang in kwargs["languages"])
    return kwargs


def _sweep_options(table: dict | None, base: Path, path: Path) -> dict | None:
    if table is None:
        return None
    where = f"[sweep] of {path}"
    _check_keys(table, SWEEP_TYPES, where)
    options = dict(table)
    if "sizes" in options:
        options["sizes"] = list(_positive_ints(options["sizes"], "sizes", where))
    if "probes" in options:
        options["probes"] = str(_relative(base, options["probes"]))
    if "regimes" in options:
        try:
            options["regimes"] = parse_regimes(options["regimes"])
        except CpOnnxError as err:
            raise CpOnnxError(f"{where}: {err}") from None
    return options


def _positive_ints(values: list, key: str, where: str) -> tuple[int, ...]:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise CpOnnxError(f"{where}: {key} must be a list of positive whole numbers such as [3, 4, 5], not {values!r}")
    return tuple(values)


def _inside(base: Path, value: str, manifest: Path) -> Path:
    """The manifest's output folder, which must lie inside the manifest's own folder (--out may name any other)."""
    folder = _relative(base, value).resolve()
    if not folder.is_relative_to(base):
        raise CpOnnxError(f"{manifest} names the output folder {value[:60]!r}, outside the manifest's folder {base}; "
                          "give a folder inside it, or pass --out on the command line")
    return folder


def _source(base: Path, source: str) -> str:
    """A path relative to the manifest when it exists there; packaged names and other sources as given."""
    candidate = _relative(base, source)
    return str(candidate) if candidate.exists() else source


def _relative(base: Path, value: str) -> Path:
    """``value`` relative to the manifest's folder; refused when no file system could hold it (too long, a NUL byte)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        if "\0" in value:  # pathlib's exists() answers False for these rather than raising
            raise ValueError("embedded null byte")
        path.exists()
    except (OSError, ValueError) as exc:
        raise CpOnnxError(f"the batch manifest names the path {value[:60]!r}, which is not a usable path ({type(exc).__name__}); "
                          "fix the manifest") from None
    return path
