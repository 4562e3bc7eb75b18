"""Brute-force ground truth: every duplicated (or removed) block [start, end) scored on a probe suite, one JSONL line each.

The evaluation engine (cp_onnx.models.evaluators) runs each config: the reuse mode from the layer where
its path departs from the base model's, the naive mode from scratch (to check and time the reuse mode).

The output is resumable: a header line names the model, suite and regimes, then one line per config,
appended and fsynced as each finishes. Each row holds its metrics per prompting regime (cp_onnx.regimes):
``"regimes": {"zero_shot": {...}, "few_shot": {...}}``. Files of version 1 (written before regimes) are
read as few-shot only, and are not resumed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cp_onnx import inputs, shapes
from cp_onnx.errors import CpOnnxError
from cp_onnx.executors import Executor, make_executor
from cp_onnx.models import budget
from cp_onnx.files import file_sha256, json_ready, write_text
from cp_onnx.groundtruth import probes
from cp_onnx.groundtruth.regime_plan import RegimePlan
from cp_onnx.models.evaluators import BASELINE, EVALUATORS, candidate_blocks
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import default_threads
from cp_onnx.models.scoring import ProbePlan
from cp_onnx.regimes import FEW_SHOT, REGIMES
from graph_passes.edit import Edit
from graph_passes.errors import GraphPassError
from graph_passes.layer_path import format_path

SWEEP_FORMAT = "cp-onnx-sweep"
SWEEP_VERSION = 2  # 2: metrics per regime; 1: few-shot metrics at the top level of each row
MODES = ("reuse", "naive")
_SCORE = {"type": ["number", "null"]}
# What readers of a sweep file (validate, the HTML page, a resumed sweep) index, checked line by line.
HEADER_SCHEMA = {"type": "object", "required": ["format", "version", "model", "suite"], "properties": {
    "model": {"type": "object", "required": ["onnx_sha256"], "properties": {"onnx_sha256": {"type": "string"}}},
    "suite": {"type": "object", "properties": {"identity": {"type": "string"}}}}}
_METRICS_SCHEMA = {"type": "object", "required": ["answer_logprob"], "properties": {
    "answer_logprob": _SCORE, "greedy_accuracy": _SCORE, "choice_accuracy": _SCORE, "general_nll": _SCORE,
    "by_kind": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": _SCORE}}}}
_BLOCK = {"start": {"type": ["integer", "null"], "minimum": 0}, "end": {"type": ["integer", "null"], "minimum": 1}}
ROW_SCHEMA = {"type": "object", "required": ["start", "end", "regimes"], "properties": {**_BLOCK, "regimes": {
    "type": "object", "properties": {r: _METRICS_SCHEMA for r in REGIMES}, "additionalProperties": False}}}
ROW_SCHEMA_V1 = {**_METRICS_SCHEMA, "required": ["start", "end", "answer_logprob"], "properties": {**_METRICS_SCHEMA["properties"], **_BLOCK}}


def block_edits(num_layers: int, sizes: Sequence[int] = (3, 4, 5), *, all_blocks: bool = False, operation: str = "duplicate") -> list[Edit]:
    """The baseline, then every block of the given sizes (or every block with ``all_blocks``), size by size, start ascending,
    each duplicated or (``operation="skip"``) removed."""
    sizes = range(1, num_layers + 1) if all_blocks else sizes
    make = OPERATIONS[operation]
    return [BASELINE, *(make(start, end) for start, end in candidate_blocks(num_layers, tuple(sizes)) if operation != "skip" or end - start < num_layers)]


OPERATIONS = {"duplicate": Edit.duplicate, "skip": Edit.skip}  # what a sweep does to its blocks; sweeps of each are kept apart


def sweep(model: ModelFolder, edits: Sequence[Edit] | None = None, items: Sequence[probes.ProbeItem] | None = None, *,
          out: Path, workers: int = 1, progress: Callable[[int, int], None] | None = None, mode: str = "reuse",
          sizes: Sequence[int] = (3, 4, 5), all_blocks: bool = False, general: Sequence[str] | None = None,
          batch_size: int = 16, max_length: int = 256, item_limit: int | None = None, threads: int | None = None,
          executor: Executor | None = None, operation: str = "duplicate", regimes: Sequence[str] = REGIMES,
          log: Callable[[str], None] = print) -> list[dict]:
    """Score the baseline and every edit on ``items`` (default: ``probe_suite(0)``) into the JSONL file ``out``.

    ``edits`` (blocks duplicated, or all removed: ``Edit.duplicate``/``Edit.skip``) default to the blocks of ``sizes``
    (every block with ``all_blocks``) under ``operation``; the baseline is always added. Edits already in ``out`` are
    skipped; ``progress(done, total)`` counts this run's. ``regimes`` (cp_onnx.regimes.REGIMES) are scored for every
    edit; items without shots are zero-shot only. ``workers`` processes share the edits and ``threads`` (default:
    every core), or an ``executor`` (cp_onnx.executors: in-process, local processes, Ray) runs them; results depend on
    none of these. Returns the rows of all requested edits, in order.
    """
    if mode not in MODES:
        raise CpOnnxError(f"unknown sweep mode {mode!r}; use one of {', '.join(MODES)}")
    if operation not in OPERATIONS:
        raise CpOnnxError(f"unknown sweep operation {operation!r}; use one of {', '.join(OPERATIONS)}")
    item_limit = inputs.MAX_ITEM_TOKENS if item_limit is None else item_limit
    for name, value in (("workers", workers), ("max_length", max_length), ("batch_size", batch_size), ("max item length", item_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CpOnnxError(f"{name} must be a whole number >= 1, not {value!r}")
    items = probes.probe_suite(0) if items is None else list(items)
    if not items:
        raise CpOnnxError("the probe suite is empty; give at least one item")
    general = probes.general_texts() if general is None else general
    cached = mode == "reuse" and model.with_past_path is not None  # shared few-shot prefixes run once per config
    plan = RegimePlan(items, lambda text: model.encode([text])[0][0], general, regimes=regimes, batch_size=batch_size, max_length=max_length,
                      share_prefixes=cached, item_limit=item_limit)
    num_layers = model.num_layers
    shape = budget.model_shape(model)
    if mode == "reuse":  # before the sweep file is created: a refused sweep leaves nothing behind
        budget.check_evaluator(shape, budget.batch_shapes(plan.batches), "the sweep's batches")
    else:  # the naive evaluator runs each batch through the whole model, all positions' logits included
        rows, length = max(budget.batch_shapes(plan.batches), key=lambda b: b[0] * b[1])
        budget.check_batches(shape, [range(length)] * rows, rows, patterns=False)
    edits = _checked_edits(block_edits(num_layers, sizes, all_blocks=all_blocks, operation=operation) if edits is None else edits, num_layers)
    operation = next((e.kind for e in edits if e.kind != "baseline"), operation)
    header = {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "operation": operation, "regimes": plan.regimes,
              "model": {"name": model.name, "onnx_sha256": file_sha256(model.onnx_path), "num_layers": num_layers},
              "suite": {"identity": plan.identity, "items": len(items), "sequences": len(plan.sequences), "tokens": plan.tokens}}
    done = open_log(Path(out), header)
    todo = [e for e in edits if e not in done]
    log(f"sweep: {len(edits) - len(todo)} of {len(edits)} configs already in {out}; {len(todo)} to run "
        f"({len(plan.sequences)} sequences, {plan.tokens} tokens, {plan.tokens_run} run per config; regimes {', '.join(plan.regimes)}; "
        f"{mode} mode, {workers} worker{'s' * (workers > 1)})")
    if mode == "reuse" and not cached:
        log(f"sweep: {model.path} has no with_past graph, so every sequence runs its few-shot examples itself; "
            "`cp-onnx export SOURCE --with-past` makes the sweep about 2.5x faster")
    executor = executor or make_executor(workers=workers)
    graph = model.with_past_path if cached else model.onnx_path
    for count, (edit, row) in enumerate(_evaluate_all(graph, plan, todo, mode, executor, threads, operation), 1):
        append_row(Path(out), row)
        done[edit] = row
        if progress:
            progress(count, len(todo))
    return [done[e] for e in edits]


def _checked_edits(edits: Iterable[Edit], num_layers: int) -> list[Edit]:
    """The baseline first, then each edit once; CpOnnxError for an edit that is not a block duplicated or removed, that
    does not fit the model, or that mixes the two (a sweep's rows are judged as one or the other)."""
    checked = [BASELINE]
    for edit in edits:
        if not isinstance(edit, Edit) or edit.kind not in ("baseline", *OPERATIONS) or edit.removed_heads:
            raise CpOnnxError(f"a sweep scores blocks duplicated or removed, not {edit!r}; give Edit.duplicate(i, j) or Edit.skip(i, j)")
        try:
            edit.check(num_layers)
        except GraphPassError as exc:
            raise CpOnnxError(f"{exc}") from None
        if edit not in checked:
            checked.append(edit)
    kinds = {e.kind for e in checked} - {"baseline"}
    if len(kinds) > 1:
        raise CpOnnxError("a sweep either duplicates blocks or removes them; sweep the two apart, into two files")
    return checked


def _evaluate_all(onnx_path: Path, plan: ProbePlan, edits: list[Edit], mode: str, executor: Executor, threads: int | None, operation: str):
    """(edit, row) for every edit, in order, from the executor's workers (this process by default)."""
    if not edits:
        return
    threads = threads or executor.threads_per_task or default_threads()
    try:
        yield from executor.map(_run_edit, edits, initializer=_start_worker, initargs=(mode, onnx_path, plan, threads, operation))
    finally:
        _WORKER.clear()  # in-process: the sessions and kept layer outputs go with the sweep


_WORKER: dict = {}


def _start_worker(mode: str, onnx_path: Path, plan: ProbePlan, threads: int, operation: str) -> None:
    _WORKER["evaluator"] = EVALUATORS[mode](onnx_path, plan, threads)
    _WORKER["operation"] = operation  # what the sweep does to its blocks: every row says it, the baseline's too


def _run_edit(edit: Edit) -> tuple[Edit, dict]:
    evaluator = _WORKER["evaluator"]
    began = time.perf_counter()
    path = edit.path(evaluator.num_layers)
    metrics = evaluator.evaluate(path)
    start, end = edit.block or (None, None)
    row = {"start": start, "end": end, "operation": _WORKER["operation"], "edit": edit.format(), "path": format_path(path),
           **metrics, "seconds": round(time.perf_counter() - began, 3)}
    return edit, json_ready(row)


def open_log(path: Path, header: dict) -> dict[Edit, dict]:
    """Rows already in the sweep file at ``path`` (created with ``header`` if absent); a partial last line is dropped."""
    if path.is_dir():
        raise CpOnnxError(f"{path} is a folder; give the path of a .jsonl file for the sweep, e.g. {path / 'sweep.jsonl'}")
    if not path.exists():
        _write_header(path, header)
        return {}
    found, rows, good_end = _read_lines(path)
    if found["version"] != SWEEP_VERSION:
        raise CpOnnxError(f"{path} is a version {found['version']} sweep (few-shot only, written before regimes) and cannot be resumed; "
                          "pass a new output file")
    if found.get("regimes") != header["regimes"]:  # before the suite: the regimes change its identity too
        raise CpOnnxError(f"{path} holds a sweep of the regimes {', '.join(found.get('regimes') or [])}, not {', '.join(header['regimes'])}; "
                          "pass the same --regimes or a new output file")
    for what, key, field in (("model", "model", "onnx_sha256"), ("probe suite", "suite", "identity")):
        if found.get(key, {}).get(field) != header[key][field]:
            raise CpOnnxError(f"{path} holds a sweep of another {what}; pass a new output file, or delete {path} to start over")
    if operation_of(found) != header["operation"]:
        raise CpOnnxError(f"{path} holds a sweep of {_DONE[operation_of(found)]} blocks, not {_DONE[header['operation']]} ones; pass a new output file")
    if good_end is not None:
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            os.fsync(fh.fileno())
    make = OPERATIONS[operation_of(found)]
    return {BASELINE if row["start"] is None else make(row["start"], row["end"]): row for row in rows}


_DONE = {"duplicate": "duplicated", "skip": "removed"}


def operation_of(header: dict) -> str:
    """What a sweep did to its blocks: "duplicate" (files written before removal sweeps existed say nothing) or "skip"."""
    return header.get("operation", "duplicate")


def read_sweep(path: Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a sweep file, without a partial last line; rows of a version 1 file come as few-shot only."""
    header, rows, _ = _read_lines(Path(path))
    return header, rows


def _read_lines(path: Path) -> tuple[dict, list[dict], int | None]:
    """Header, rows, and the byte length to cut a partial last line to (None if there is none)."""
    try:
        data = inputs.read_bytes(path, "sweep file")
    except FileNotFoundError:
        raise CpOnnxError(f"no sweep file at {path}; run `cp-onnx sweep --out {path}` first") from None
    inputs.check_line_count(data.count(b"\n"), path, "sweep file")
    lines = data.split(b"\n")
    inputs.check_lines(lines, path, "sweep file")  # a row is a few kB; each is parsed into objects many times its size
    complete, tail = lines[:-1], lines[-1]  # text after the last newline is a line cut short by a kill
    header = _parse(complete[0] if complete else b"", path, 1)
    if not isinstance(header, dict) or header.get("format") != SWEEP_FORMAT:
        raise CpOnnxError(f"{path} is not a cp-onnx sweep file; give the JSONL file written by `cp-onnx sweep`")
    if header.get("version") not in (1, SWEEP_VERSION):
        raise CpOnnxError(f"{path} is sweep format version {shapes.shown(header.get('version'))}, this cp-onnx reads versions 1 and "
                          f"{SWEEP_VERSION}; run the sweep again")
    shapes.check(header, HEADER_SCHEMA, f"line 1 of {path}", "delete the file to start the sweep over")
    rows = [_parse(line, path, number) for number, line in enumerate(complete[1:], 2)]
    schema = ROW_SCHEMA if header["version"] == SWEEP_VERSION else ROW_SCHEMA_V1
    for number, row in enumerate(rows, 2):
        shapes.check(row, schema, f"line {number} of {path}", "delete the file to start the sweep over")
        if (row["start"] is None) != (row["end"] is None) or (row["start"] is not None and row["start"] >= row["end"]):
            raise CpOnnxError(f"line {number} of {path} names block [{row['start']}, {row['end']}), which is not a block; "
                              "delete the file to start the sweep over")
    if header["version"] == 1:
        header, rows = {**header, "regimes": [FEW_SHOT]}, [_few_shot_row(row) for row in rows]
    return header, rows, (len(data) - len(tail)) if tail else None


_V1_METRICS = ("answer_logprob", "greedy_accuracy", "choice_accuracy", "items", "general_nll", "by_kind")


def _few_shot_row(row: dict) -> dict:
    """A version 1 row (the shipped 2-shot suite's metrics at its top level) in version 2's shape."""
    return {**{k: v for k, v in row.items() if k not in _V1_METRICS}, "regimes": {FEW_SHOT: {k: row[k] for k in _V1_METRICS if k in row}}}


def _parse(line: bytes, path: Path, number: int) -> dict:
    return shapes.parse_json(line, f"line {number} of {path}", "delete the file to start the sweep over")


def _write_header(path: Path, header: dict) -> None:
    """Create the sweep file holding only its header line, atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(header) + "\n")
    except OSError as err:
        raise CpOnnxError(f"cannot write the sweep to {path} ({err.strerror}); choose another output file") from None


def append_row(path: Path, row: dict) -> None:
    """Append one line and force it to disk: a killed run loses at most the config in progress."""
    line = json.dumps(row, allow_nan=False) + "\n"
    try:
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:  # the line may be cut: the next run drops a partial last line and redoes that config
        raise CpOnnxError(f"cannot append to the sweep {path} ({err.strerror or err}); free space on that disk and run the sweep again "
                          "to resume") from None


def regime_rows(rows: Iterable[dict], regime: str) -> list[dict]:
    """Sweep rows flattened to one regime (block fields and that regime's metrics), for validation and plots."""
    flat = []
    for row in rows:
        if regime in row.get("regimes", {}):
            flat.append({**{k: v for k, v in row.items() if k != "regimes"}, **row["regimes"][regime]})
    return flat


def regimes_of(rows: Iterable[dict]) -> list[str]:
    """The regimes some row holds, in REGIMES order."""
    held = {r for row in rows for r in row.get("regimes", {})}
    return [r for r in REGIMES if r in held]
