"""The evaluation engine: a model's layers run along any layer path, and the targets of token batches scored.

Block [i, j) duplicated runs layers 0..j-1, then i..j-1 again, then j..L-1, so everything up to layer
j-1's output is the base model's; removed, it runs 0..i-1, then j..L-1. Any layer path is the base
model's up to the first layer where it departs from 0..L-1. ``ReuseEvaluator`` runs the base model
once, layer by layer (segment pass), keeps every layer's output, and for each path runs only what
follows that point (for a duplicated block, i..L-1 from the kept output of layer j-1), then the head
at the scored positions. ``NaiveEvaluator`` builds each routed model (route pass) and runs it from
scratch; it exists to check and time the reuse one. The sweep (ground truth) and the prediction and
pruning methods (analysis) all score through here.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import graph_passes
from cp_onnx.errors import CpOnnxError
from cp_onnx.models import budget
from cp_onnx.models.runner import Runner, cache_feeds, open_graph, position_ids_for, segment_session
from cp_onnx.models.scoring import ProbePlan, TokenBatch, score_model, token_scores
from graph_passes.edit import Edit
from graph_passes.route import route
from graph_passes.segment import POSITIONS, segment

BASELINE = Edit()  # the model as exported
HEAD_BYTES = 64 * 2**20  # float32 logits per head run; scoring holds a few float64 copies (Gemma 3's 262k vocabulary: 64 rows)


def candidate_blocks(num_layers: int, block_sizes: Sequence[int] = (3, 4, 5)) -> list[tuple[int, int]]:
    """Every [start, start + k) that fits, for each k in block_sizes in order, start ascending."""
    sizes = tuple(block_sizes)
    if not sizes or any(not isinstance(k, (int, np.integer)) or k < 1 for k in sizes):
        raise CpOnnxError(f"block sizes must be positive integers, got {sizes}; pass e.g. --block-sizes 3,4,5")
    if num_layers < min(sizes):
        raise CpOnnxError(
            f"the model has {num_layers} layers, fewer than the smallest block size {min(sizes)}; pass smaller --block-sizes"
        )
    return [(start, start + k) for k in sizes for start in range(num_layers - k + 1)]


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
        self.contexts: dict[int, dict] = {}  # per batch run so far: context tensors
        self.outputs = KeptOutputs()  # per batch run so far: every layer's output along base_path

    def base_context(self, b: int) -> dict:
        """Batch ``b``'s context, its layer outputs along ``base_path`` run at first use (a race may never need some batches)."""
        if b not in self.contexts:
            batch = self.plan.batches[b]
            past = [kv for _, kv in self.prefixes[batch.prefix][1]] if batch.prefix else None
            context = self._context(batch.input_ids, batch.attention_mask, past)
            self.outputs.put(b, [stream for stream, _ in self._run(self.base_path, context[self.embed], context, past)])
            self.contexts[b] = context
        return self.contexts[b]

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

    def token_scores(self, edit: Edit, batches: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch (all, or the plan's ``batches`` by index), ``scoring.token_scores`` of its targets with ``edit`` made."""
        return self.path_scores(edit.path(self.num_layers), batches)

    def path_scores(self, path: Sequence[int], batches: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per batch, ``scoring.token_scores`` of its targets when the layers run along ``path``."""
        resume_at = departure(path, self.base_path)  # the base's output at position resume_at - 1 (or the embedding) is reused
        remaining = list(path[resume_at:])
        prefix_caches = {prefix: [kv for _, kv in self._run(remaining, base[resume_at - 1][0] if resume_at else context[self.embed], context, None)]
                         for prefix, (context, base) in self.prefixes.items()}
        results = []
        for b in range(len(self.plan.batches)) if batches is None else batches:
            batch, context = self.plan.batches[b], self.base_context(b)
            stream = self.outputs.get(b, resume_at - 1) if resume_at else context[self.embed]
            runs = self._run(remaining, stream, context, prefix_caches.get(batch.prefix))
            results.append(self._head(runs[-1][0] if runs else stream, context, batch))
        return results

    def evaluate(self, path: Sequence[int]) -> dict:
        return self.plan.metrics(self.path_scores(path))

    def rebase(self, path: Sequence[int]) -> None:
        """Keep the outputs of ``path`` instead of the base model's: paths that share more of it then resume later
        (a greedy search that removes one more layer each step departs from the last step's path, not the model's)."""
        if self.prefixes:
            raise CpOnnxError("rebase needs a plan without shared prefixes (their caches follow the base model)")
        for b in range(len(self.plan.batches)):
            self.base_context(b)  # the batch's context (and its outputs along the old path, replaced below)
        kept = KeptOutputs()
        for b, context in self.contexts.items():
            kept.put(b, [stream for stream, _ in self._run(path, context[self.embed], context, None)])
        self.base_path, self.outputs = list(path), kept


class KeptOutputs:
    """The base model's layer outputs per batch: in memory up to BUDGET bytes, beyond that in files.

    The files live in a temporary folder and are read back whole when a config needs them (one layer
    per batch): the kernel's page cache holds them, outside the process's resident memory, so a sweep
    of a 3B model keeps its 3 GB of layer outputs without needing them resident."""

    BUDGET = 512 * 2**20

    def __init__(self):
        self._memory: dict[int, list[np.ndarray]] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._bytes = 0

    def put(self, batch: int, outputs: list[np.ndarray]) -> None:
        """Keep one batch's layer outputs; once the total passes BUDGET, everything goes to files."""
        self._bytes += sum(o.nbytes for o in outputs)
        self._memory[batch] = outputs
        if self._folder is None and self._bytes > self.BUDGET:
            self._folder = tempfile.TemporaryDirectory(prefix="cp-onnx-layers-")
        if self._folder is not None:
            for b, kept in self._memory.items():
                for layer, output in enumerate(kept):
                    np.save(self._path(b, layer), output, allow_pickle=False)
            self._memory.clear()

    def get(self, batch: int, layer: int) -> np.ndarray:
        if batch in self._memory:
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


EVALUATORS = {"reuse": ReuseEvaluator, "naive": NaiveEvaluator}
