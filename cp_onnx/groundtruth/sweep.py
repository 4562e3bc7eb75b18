"""Brute-force ground truth: every duplicated (or removed) block [start, end) scored on a probe suite, one JSONL line each.

Block [i, j) duplicated runs layers 0..j-1, then i..j-1 again, then j..L-1, so everything up to layer
j-1's output is the base model's; removed (operation "skip"), it runs 0..i-1, then j..L-1. Any layer
path is the base model's up to the first layer where it departs from 0..L-1. The reuse mode runs the
base model once, layer by layer (segment pass), keeps every layer's output, and for each path runs
only what follows that point (for a duplicated block, i..L-1 from the kept output of layer j-1),
then the head at the scored positions. The naive mode builds each routed model (route pass) and runs
it from scratch; it exists to check and time the reuse mode.

The output is resumable: a header line names the model, suite and regimes, then one line per config,
appended and fsynced as each finishes. Each row holds its metrics per prompting regime (cp_onnx.groundtruth.regimes):
``"regimes": {"zero_shot": {...}, "few_shot": {...}}``. Files of version 1 (written before regimes) are
read as few-shot only, and are not resumed.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

import graph_passes
from cp_onnx import inputs, shapes
from cp_onnx.analysis import budget
from cp_onnx.analysis.report import json_ready, file_sha256
from cp_onnx.analysis.scores import candidate_blocks
from cp_onnx.errors import CpOnnxError
from cp_onnx.executors import Executor, make_executor
from cp_onnx.files import write_text
from cp_onnx.groundtruth import probes
from cp_onnx.groundtruth.regimes import REGIMES, RegimePlan
from cp_onnx.groundtruth.scoring import ProbePlan, TokenBatch, score_model, token_scores
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import Runner, cache_feeds, default_threads, open_graph, position_ids_for, segment_session
from graph_passes.layer_path import duplicate, format_path, skip
from graph_passes.route import route
from graph_passes.segment import POSITIONS, segment

Config = tuple[int | None, int | None]  # (start, end) of the duplicated or removed block, end exclusive; (None, None) = baseline
BASELINE: Config = (None, None)
OPERATIONS = {"duplicate": duplicate, "skip": skip}  # what a config does to its block; sweeps of each are kept apart
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
HEAD_BYTES = 64 * 2**20  # float32 logits per head run; scoring holds a few float64 copies (Gemma 3's 262k vocabulary: 64 rows)


def block_configs(num_layers: int, sizes: Sequence[int] = (3, 4, 5), *, all_blocks: bool = False) -> list[Config]:
    """The baseline, then every block of the given sizes (or every block with ``all_blocks``), size by size, start ascending."""
    sizes = range(1, num_layers + 1) if all_blocks else sizes
    return [BASELINE, *candidate_blocks(num_layers, tuple(sizes))]


def layer_path(config: Config, num_layers: int, operation: str = "duplicate") -> list[int]:
    """The layers a config runs, in order: its block duplicated, or removed (``operation="skip"``)."""
    start, end = config
    return list(range(num_layers)) if start is None else OPERATIONS[operation](start, end, num_layers)


def departure(path: Sequence[int], base: Sequence[int]) -> int:
    """How many leading layers ``path`` shares with the ``base`` path: up to there, its outputs are the base's."""
    return next((k for k, (layer, kept) in enumerate(zip(path, base)) if layer != kept), min(len(path), len(base)))


@dataclass(frozen=True)
class Batches:
    """What ReuseEvaluator reads of a plan: its batches (for token batches built without a ProbePlan)."""

    batches: list[TokenBatch]


class ReuseEvaluator:
    """The base model run once layer by layer, its layer outputs kept; a block then reruns only what differs.

    Keeps every layer's output for every batch: layers x padded tokens x hidden float32 (SmolLM2,
    10k tokens: 30 x 10k x 576 x 4 B = 0.7 GB; a 3B model: 3.4 GB), in files beyond KeptOutputs.BUDGET. On a graph with a KV cache, a batch's shared prefix
    (the few-shot examples of a kind) runs once per config as one row, and its keys and values are
    fed to every row of the batch, so the examples are not recomputed for each item.
    """

    def __init__(self, onnx_path: Path, plan: ProbePlan, threads: int | None):
        proto, weights = open_graph(onnx_path)
        layer_map = graph_passes.discover(proto)
        shape = budget.Shape(layer_map.num_layers, max(layer_map.hidden_size or 1, 1), max(layer_map.num_heads or 1, 1), 1)
        budget.check_evaluator(shape, budget.batch_shapes(plan.batches), "the batches to evaluate")  # whoever planned them
        parts = segment(proto, layer_map)
        del proto
        if not parts.past and any(batch.prefix for batch in plan.batches):
            raise CpOnnxError(f"{onnx_path} has no KV cache, so shared prefixes cannot be reused; plan the batches without share_prefixes")
        self.num_layers, self.plan, self.resid_in, self.past, self.embed = len(parts.layers), plan, parts.resid_in, parts.past, parts.embed
        self.layer_tokens = 0  # tokens (padding included) times layers run so far: the work, for benchmarks
        models = [parts.preamble, *parts.layers, parts.head]
        del parts
        # Every segment reads the one mapping of the weights; the head (last) keeps an arena (its calls are HEAD_BYTES of logits).
        self.preamble, *self.layers, self.head = [segment_session(m, weights, threads, arena=k == len(models) - 1) for k, m in enumerate(models)]
        vocab = self.head.get_outputs()[0].shape[-1]
        self.head_rows = max(1, HEAD_BYTES // (4 * vocab)) if isinstance(vocab, int) and vocab > 0 else 256
        self.prefixes = {}  # prefix tokens -> (context, every layer's (output, keys and values)) of the base model
        for prefix in dict.fromkeys(batch.prefix for batch in plan.batches if batch.prefix):
            ids = np.asarray([prefix], dtype=np.int64)
            context = self._context(ids, np.ones_like(ids), None)
            self.prefixes[prefix] = (context, self._run(range(self.num_layers), context[self.embed], context, None))
        self.base_path = list(range(self.num_layers))  # the path whose outputs are kept (see rebase)
        self.contexts, self.outputs = [], KeptOutputs()  # per batch: context tensors; every layer's output
        for batch in plan.batches:
            past = [kv for _, kv in self.prefixes[batch.prefix][1]] if batch.prefix else None
            context = self._context(batch.input_ids, batch.attention_mask, past)
            self.contexts.append(context)
            self.outputs.append([stream for stream, _ in self._run(range(self.num_layers), context[self.embed], context, past)])

    def _context(self, ids: np.ndarray, mask: np.ndarray, past: list | None) -> dict[str, np.ndarray]:
        """Graph inputs and preamble outputs for rows ``ids`` that continue a prefix whose cache is ``past`` (None: no prefix)."""
        shared = past[0][0].shape[2] if past else 0
        full = np.concatenate([np.ones((len(ids), shared), dtype=np.int64), mask], axis=1)
        feeds = {"input_ids": ids, "attention_mask": full, "position_ids": position_ids_for(full)[:, shared:],
                 **self._past_feeds(0, past[0] if past else None, len(ids))}
        wanted = {i.name: feeds[i.name] if i.name in feeds else np.zeros_like(ids) for i in self.preamble.get_inputs()}  # token_type_ids: zeros
        names = [o.name for o in self.preamble.get_outputs()]
        return {**feeds, **dict(zip(names, self.preamble.run(names, wanted)))}

    def _past_feeds(self, layer: int, kv: tuple | None, rows: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s cache inputs: the prefix's keys and values repeated for every row, or empty (no prefix)."""
        if not self.past:
            return {}
        if kv is None:
            return cache_feeds(self.layers[layer].get_inputs(), rows)
        return {name: np.repeat(value, rows, axis=0) for name, value in zip(self.past[layer], kv)}

    def _run(self, layers: Iterable[int], stream: np.ndarray, context: dict, past: list | None) -> list[tuple[np.ndarray, tuple]]:
        """Run ``layers`` in order from ``stream``; per layer run, its output and its keys and values.

        ``past[k]`` is the prefix's cache for the k-th layer run (None: no prefix)."""
        results = []
        for k, layer in enumerate(layers):
            self.layer_tokens += stream.shape[0] * stream.shape[1]
            feeds = {**context, **self._past_feeds(layer, past[k] if past else None, len(stream)), self.resid_in[layer]: stream}
            session = self.layers[layer]
            stream, *kv = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
            results.append((stream, tuple(kv)))
        return results

    def _head(self, stream: np.ndarray, context: dict, batch: TokenBatch) -> tuple[np.ndarray, np.ndarray]:
        resid_in = self.resid_in[-1]
        feeds = {i.name: stream if i.name == resid_in else context[i.name] for i in self.head.get_inputs() if i.name != POSITIONS}
        scores = []
        for k in range(0, len(batch.positions), self.head_rows):
            logits = self.head.run(None, {**feeds, POSITIONS: batch.positions[k : k + self.head_rows]})[0]
            scores.append(token_scores(logits, batch.targets[k : k + self.head_rows]))
        return np.concatenate([s[0] for s in scores]), np.concatenate([s[1] for s in scores])

    def token_scores(self, config: Config, batches: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch (all, or the plan's ``batches`` by index), ``scoring.token_scores`` of its targets with block ``config`` duplicated."""
        return self.path_scores(layer_path(config, self.num_layers), batches)

    def path_scores(self, path: Sequence[int], batches: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch, ``scoring.token_scores`` of its targets when the layers run along ``path``."""
        resume_at = departure(path, self.base_path)  # the base's output at position resume_at - 1 (or the embedding) is reused
        remaining = list(path[resume_at:])
        prefix_caches = {prefix: [kv for _, kv in self._run(remaining, base[resume_at - 1][0] if resume_at else context[self.embed], context, None)]
                         for prefix, (context, base) in self.prefixes.items()}
        results = []
        for b in range(len(self.plan.batches)) if batches is None else batches:
            batch = self.plan.batches[b]
            stream = self.outputs.get(b, resume_at - 1) if resume_at else self.contexts[b][self.embed]
            runs = self._run(remaining, stream, self.contexts[b], prefix_caches.get(batch.prefix))
            results.append(self._head(runs[-1][0] if runs else stream, self.contexts[b], batch))
        return results

    def evaluate(self, path: Sequence[int]) -> dict:
        return self.plan.metrics(self.path_scores(path))

    def rebase(self, path: Sequence[int]) -> None:
        """Keep the outputs of ``path`` instead of the base model's: paths that share more of it then resume later
        (a greedy search that removes one more layer each step departs from the last step's path, not the model's)."""
        if self.prefixes:
            raise CpOnnxError("rebase needs a plan without shared prefixes (their caches follow the base model)")
        kept = KeptOutputs()
        for b in range(len(self.plan.batches)):
            kept.append([stream for stream, _ in self._run(path, self.contexts[b][self.embed], self.contexts[b], None)])
        self.base_path, self.outputs = list(path), kept


class KeptOutputs:
    """The base model's layer outputs per batch: in memory up to BUDGET bytes, beyond that in files.

    The files live in a temporary folder and are read back whole when a config needs them (one layer
    per batch): the kernel's page cache holds them, outside the process's resident memory, so a sweep
    of a 3B model keeps its 3 GB of layer outputs without needing them resident."""

    BUDGET = 512 * 2**20

    def __init__(self):
        self._memory: list[list[np.ndarray]] = []
        self._folder: tempfile.TemporaryDirectory | None = None
        self._bytes = self._written = 0

    def append(self, outputs: list[np.ndarray]) -> None:
        """Keep one more batch's layer outputs; once the total passes BUDGET, everything goes to files."""
        self._bytes += sum(o.nbytes for o in outputs)
        self._memory.append(outputs)
        if self._folder is None and self._bytes > self.BUDGET:
            self._folder = tempfile.TemporaryDirectory(prefix="cp-onnx-layers-")
        if self._folder is not None:
            for b in range(self._written, len(self._memory)):
                for layer, output in enumerate(self._memory[b]):
                    np.save(self._path(b, layer), output, allow_pickle=False)
                self._memory[b] = []
            self._written = len(self._memory)

    def get(self, batch: int, layer: int) -> np.ndarray:
        if self._folder is None:
            return self._memory[batch][layer]
        return np.load(self._path(batch, layer), allow_pickle=False)

    def _path(self, batch: int, layer: int) -> str:
        return os.path.join(self._folder.name, f"b{batch}_l{layer}.npy")


class NaiveEvaluator:
    """Each config's routed model built and run from scratch (the slow, independent way)."""

    def __init__(self, onnx_path: Path, plan: ProbePlan, threads: int | None):
        self.proto, self.weights = open_graph(onnx_path)
        self.layer_map = graph_passes.discover(self.proto)
        self.num_layers, self.plan, self.threads = self.layer_map.num_layers, plan, threads

    def evaluate(self, path: Sequence[int]) -> dict:
        routed = route(self.proto, self.layer_map, path)
        return score_model(Runner(routed, threads=self.threads, weights=self.weights), self.plan, logits=self.layer_map.logits)


EVALUATORS = {"reuse": ReuseEvaluator, "naive": NaiveEvaluator}


def sweep(model: ModelFolder, configs: Sequence[Config] | None = None, items: Sequence[probes.ProbeItem] | None = None, *,
          out: Path, workers: int = 1, progress: Callable[[int, int], None] | None = None, mode: str = "reuse",
          sizes: Sequence[int] = (3, 4, 5), all_blocks: bool = False, general: Sequence[str] | None = None,
          batch_size: int = 16, max_length: int = 256, item_limit: int | None = None, threads: int | None = None,
          executor: Executor | None = None, operation: str = "duplicate", regimes: Sequence[str] = REGIMES,
          log: Callable[[str], None] = print) -> list[dict]:
    """Score the baseline and every config on ``items`` (default: ``probe_suite(0)``) into the JSONL file ``out``.

    ``configs`` defaults to the blocks of ``sizes`` (every block with ``all_blocks``); the baseline is
    always added. Each block is duplicated, or with ``operation="skip"`` removed. Configs already in ``out`` are skipped; ``progress(done, total)`` counts this run's.
    ``regimes`` (cp_onnx.groundtruth.regimes.REGIMES) are scored for every config; items without shots are zero-shot only.
    ``workers`` processes share the configs and ``threads`` (default: every core), or an ``executor``
    (cp_onnx.executors: in-process, local processes, Ray) runs them; results depend on none of these. Returns the rows of all requested configs, in config order.
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
    configs = _checked_configs(block_configs(num_layers, sizes, all_blocks=all_blocks) if configs is None else configs, num_layers, operation)
    header = {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "operation": operation, "regimes": plan.regimes,
              "model": {"name": model.name, "onnx_sha256": file_sha256(model.onnx_path), "num_layers": num_layers},
              "suite": {"identity": plan.identity, "items": len(items), "sequences": len(plan.sequences), "tokens": plan.tokens}}
    done = open_log(Path(out), header)
    todo = [c for c in configs if c not in done]
    log(f"sweep: {len(configs) - len(todo)} of {len(configs)} configs already in {out}; {len(todo)} to run "
        f"({len(plan.sequences)} sequences, {plan.tokens} tokens, {plan.tokens_run} run per config; regimes {', '.join(plan.regimes)}; "
        f"{mode} mode, {workers} worker{'s' * (workers > 1)})")
    if mode == "reuse" and not cached:
        log(f"sweep: {model.path} has no with_past graph, so every sequence runs its few-shot examples itself; "
            "`cp-onnx export SOURCE --with-past` makes the sweep about 2.5x faster")
    executor = executor or make_executor(workers=workers)
    graph = model.with_past_path if cached else model.onnx_path
    for count, (config, row) in enumerate(_evaluate_all(graph, plan, todo, mode, executor, threads, operation), 1):
        append_row(Path(out), row)
        done[config] = row
        if progress:
            progress(count, len(todo))
    return [done[c] for c in configs]


def _checked_configs(configs: Iterable[Config], num_layers: int, operation: str = "duplicate") -> list[Config]:
    """Configs as (start, end) tuples, baseline first, each once; CpOnnxError for a block that does not fit."""
    checked = [BASELINE]
    for config in configs:
        start, end = tuple(config) if isinstance(config, Sequence) and len(config) == 2 else (-1, -1)
        if (start, end) != BASELINE and not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_layers):
            raise CpOnnxError(f"config {config!r} is not a block of this {num_layers}-layer model; give (start, end) with 0 <= start < end <= {num_layers}, end exclusive")
        if operation == "skip" and (start, end) == (0, num_layers):
            raise CpOnnxError(f"config {config!r} removes all {num_layers} layers; give smaller blocks")
        if (start, end) not in checked:
            checked.append((start, end))
    return checked


def _evaluate_all(onnx_path: Path, plan: ProbePlan, configs: list[Config], mode: str, executor: Executor, threads: int | None, operation: str):
    """(config, row) for every config, in order, from the executor's workers (this process by default)."""
    if not configs:
        return
    threads = threads or executor.threads_per_task or default_threads()
    try:
        yield from executor.map(_run_config, configs, initializer=_start_worker, initargs=(mode, onnx_path, plan, threads, operation))
    finally:
        _WORKER.clear()  # in-process: the sessions and kept layer outputs go with the sweep


_WORKER: dict = {}


def _start_worker(mode: str, onnx_path: Path, plan: ProbePlan, threads: int, operation: str = "duplicate") -> None:
    _WORKER["evaluator"] = EVALUATORS[mode](onnx_path, plan, threads)
    _WORKER["operation"] = operation


def _run_config(config: Config) -> tuple[Config, dict]:
    evaluator, operation = _WORKER["evaluator"], _WORKER["operation"]
    began = time.perf_counter()
    path = layer_path(config, evaluator.num_layers, operation)
    metrics = evaluator.evaluate(path)
    start, end = config
    row = {"start": start, "end": end, "operation": operation, "path": format_path(path), **metrics,
           "seconds": round(time.perf_counter() - began, 3)}
    return config, json_ready(row)


def open_log(path: Path, header: dict) -> dict[Config, dict]:
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
    return {(row["start"], row["end"]): row for row in rows}


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
        header, rows = {**header, "regimes": ["few_shot"]}, [_few_shot_row(row) for row in rows]
    return header, rows, (len(data) - len(tail)) if tail else None


_V1_METRICS = ("answer_logprob", "greedy_accuracy", "choice_accuracy", "items", "general_nll", "by_kind")


def _few_shot_row(row: dict) -> dict:
    """A version 1 row (the shipped 2-shot suite's metrics at its top level) in version 2's shape."""
    return {**{k: v for k, v in row.items() if k not in _V1_METRICS}, "regimes": {"few_shot": {k: row[k] for k in _V1_METRICS if k in row}}}


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
