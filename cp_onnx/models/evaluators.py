"""The evaluation engine: a model's layers run along any layer path, and the targets of token batches scored.

Block [i, j) duplicated runs layers 0..j-1, then i..j-1 again, then j..L-1, so everything up to layer
j-1's output is the base model's; removed, it runs 0..i-1, then j..L-1. Any layer path is the base
model's up to the first layer where it departs from 0..L-1. ``ReuseEvaluator`` runs the base model
once, layer by layer (segment pass), keeps every layer's output, and for each path runs only what
follows that point (for a duplicated block, i..L-1 from the kept output of layer j-1), then the head
at the scored positions. ``NaiveEvaluator`` builds each routed model (route pass) and runs it from
scratch; it exists to check and time the reuse one. The sweep (ground truth) and the prediction and
pruning methods (analysis) all score through here. A packed batch (``TokenBatch.position_ids``: several
sequences a row) runs with the preamble's causal masks closed between its sequences, where a check on two
sequences shows the graph computes them so; elsewhere it runs unpacked.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort

import graph_passes
from cp_onnx.errors import CpOnnxError
from cp_onnx.models import budget
from cp_onnx.models.runner import _ORT_ERRORS, Runner, cache_feeds, default_threads, open_graph, position_ids_for, segment_session
from cp_onnx.models.scoring import ProbePlan, TokenBatch, score_model, sequence_ids, token_scores
from graph_passes.edit import Edit
from graph_passes.route import route
from graph_passes.segment import POSITIONS, segment

BASELINE = Edit()  # the model as exported
HEAD_BYTES = 128 * 2**20  # float32 logits per head run, and scoring's float32 copy (Gemma 3's 262k vocabulary: 128 rows); every
# call reads the whole vocabulary matrix, so rows per call cut the calls (Qwen2.5-1.5B: 0.9 GB each)
# Paths scored together (``ReuseEvaluator.paths_scores``) run a layer on up to STACK_TOKENS tokens at a time: a layer
# call on one short batch reads every weight from memory for a few dozen tokens (Qwen2.5-1.5B shapes on 2 cores:
# 1,960 layer-tokens/s at 30 tokens, 3,670 at 120, 3,970 at 320, 4,130 at 640). STACK_BYTES bounds the streams held.
STACK_TOKENS = 2048
# On a quantized graph (MatMulNBits) a bigger call gains nothing and its working buffers grow with it: Llama-3.2-3B
# shapes as an int4 genai build, few-shot analysis on 2 AVX2 cores, 5.9 GB peak and 231 s at 2048, 4.0 GB and 221 s at 512.
STACK_TOKENS_QUANTIZED = 512
STACK_BYTES = 128 * 2**20


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
        self.threads = threads or default_threads()  # onnxruntime's, and the head's scoring between its calls
        layer_map = graph_passes.discover(proto)
        shape = budget.Shape(layer_map.num_layers, max(layer_map.hidden_size or 1, 1), max(layer_map.num_heads or 1, 1), 1)
        budget.check_evaluator(shape, budget.batch_shapes(plan.batches), "the batches to evaluate")  # whoever planned them
        parts = segment(proto, layer_map)
        quantized = any(node.op_type == "MatMulNBits" for node in proto.graph.node)
        self.stack_tokens = STACK_TOKENS_QUANTIZED if quantized else STACK_TOKENS
        del proto
        if not parts.past and any(batch.prefix for batch in plan.batches):
            raise CpOnnxError(f"{onnx_path} has no KV cache, so shared prefixes cannot be reused; plan the batches without share_prefixes")
        self.num_layers, self.plan, self.resid_in, self.past, self.embed = len(parts.layers), plan, parts.resid_in, parts.past, parts.embed
        self.layer_tokens = 0  # tokens (padding included) times layers run so far: the work, for benchmarks
        models = [parts.preamble, *parts.layers, parts.head]
        # Every segment reads the one mapping of the weights and allocates from the one shared arena.
        self.preamble, *self.layers, self.head = [segment_session(m, weights, threads) for m in models]
        # The last layer's attention half, and its MLP half with the head on the scored positions only (paths_scores);
        # checked against the whole layer on the first batch it serves (_tail_agrees).
        try:
            self.tail = None if parts.tail is None else (segment_session(parts.tail.attention, weights, threads),
                                                         segment_session(parts.tail.positionwise, weights, threads), parts.tail.resid_mid)
        except CpOnnxError:  # onnxruntime does not take the halves: the whole layer serves
            self.tail = None
        self._tail_checked = False
        del parts
        vocab = self.head.get_outputs()[0].shape[-1]
        self.head_rows = max(1, HEAD_BYTES // (4 * vocab)) if isinstance(vocab, int) and vocab > 0 else 256
        # The preamble outputs masked per sequence for packed batches: found, then checked (else none: they run unpacked).
        self.masks = self._mask_outputs() if any(batch.position_ids is not None for batch in plan.batches) else []
        if self.masks and not self._packs_as_alone():
            self.masks = []
        self.batches = self._runnable(plan.batches)
        self.prefixes = {}  # prefix tokens -> (context, every layer's (output, keys and values)) of the base model
        for prefix in dict.fromkeys(batch.prefix for batch in plan.batches if batch.prefix):
            ids = np.asarray([prefix], dtype=np.int64)
            context = self._context(ids, np.ones_like(ids), None)
            self.prefixes[prefix] = (context, self._run(range(self.num_layers), context[self.embed], context, None))
        self.base_path = list(range(self.num_layers))  # the path whose outputs are kept (see rebase)
        self.contexts: dict[int, dict] = {}  # per batch run so far: context tensors
        self.outputs = KeptOutputs()  # per batch run so far: every layer's output along base_path

    @property
    def packs(self) -> bool:
        """Whether packed batches run packed (else unpacked: whoever planned them may replan)."""
        return bool(self.masks)

    def _runnable(self, batches: Sequence[TokenBatch]) -> list[TokenBatch]:
        return list(batches) if self.packs else [batch.unpacked() for batch in batches]

    def replan(self, plan: ProbePlan) -> None:
        """Run ``plan``'s batches instead of the ones given (before any has run: e.g. padded where packed rows cannot run)."""
        if self.contexts or any(batch.prefix for batch in plan.batches):
            raise CpOnnxError("replan needs an evaluator that has run nothing yet and batches without shared prefixes")
        self.plan, self.batches = plan, self._runnable(plan.batches)

    def base_context(self, b: int) -> dict:
        """Batch ``b``'s context, its layer outputs along ``base_path`` run at first use (a race may never need some batches)."""
        if b not in self.contexts:
            batch = self.batches[b]
            past = [kv for _, kv in self.prefixes[batch.prefix][1]] if batch.prefix else None
            context = self._context(batch.input_ids, batch.attention_mask, past, batch.position_ids)
            self.outputs.put(b, [stream for stream, _ in self._run(self.base_path, context[self.embed], context, past)])
            self.contexts[b] = context
        return self.contexts[b]

    def _context(self, ids: np.ndarray, mask: np.ndarray, past: list | None, position_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Graph inputs and preamble outputs for rows ``ids`` that continue a prefix whose cache is ``past`` (None: no prefix).
        ``position_ids``: a packed batch's (each sequence from 0); its attention masks then keep every sequence to itself."""
        shared = past[0][0].shape[2] if past else 0
        full = np.concatenate([np.ones((len(ids), shared), dtype=np.int64), mask], axis=1)
        feeds = {"input_ids": ids, "attention_mask": full, "position_ids": position_ids_for(full)[:, shared:] if position_ids is None else position_ids,
                 **self._past_feeds(0, past[0] if past else None, len(ids))}
        wanted = {i.name: feeds[i.name] if i.name in feeds else np.zeros_like(ids) for i in self.preamble.get_inputs()}  # token_type_ids: zeros
        names = [o.name for o in self.preamble.get_outputs()]
        context = {**feeds, **dict(zip(names, self.preamble.run(names, wanted)))}
        if position_ids is not None:
            sequence = sequence_ids(position_ids, mask)
            # [rows, 1, query, key]: a token of one sequence and a token of another (a padding query keeps its view, which
            # sees real keys: one that saw none would soften to NaN with some masks and spread through 0 x NaN)
            apart = (sequence[:, None, :, None] != sequence[:, None, None, :]) & (sequence[:, None, :, None] >= 0)
            for name in self.masks:
                table = context[name]  # [rows or 1, heads or 1, query, key]: the causal (and padding) mask
                closed = table[(0,) * (table.ndim - 2) + (0, -1)]  # the first query's view of the last key: masked in every causal mask
                context[name] = np.where(apart, closed, table)
        return context

    # Two sequences the packing checks run packed in one row and each alone.
    _CHECK = ([3, 5, 7, 11, 13], [17, 19, 23])

    def _mask_outputs(self) -> list[str]:
        """The preamble outputs that are attention masks: [.., query, key] tables whose future keys hold one value that no
        present or past key holds. None on a KV-cache graph, or one that masks inside its layers (fused attention)."""
        if self.past:
            return []
        ids = np.asarray([[*self._CHECK[0], *self._CHECK[1]]], dtype=np.int64)
        size = ids.shape[1]
        context = self._context(ids, np.ones_like(ids), None)
        future = np.triu(np.ones((size, size), dtype=bool), 1)
        return [output.name for output in self.preamble.get_outputs()
                if (table := context[output.name]).ndim == 4 and table.shape[-2:] == (size, size)
                and all(len(np.unique(t[future])) == 1 and not np.isin(t[~future], t[future]).any() for t in table.reshape(-1, size, size))]

    def _packs_as_alone(self) -> bool:
        """Whether the two check sequences, packed in one row with ``masks`` closed between them, leave the last layer as
        each run alone does."""
        first, second = self._CHECK

        def last_layer(ids: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
            context = self._context(ids, np.ones_like(ids), None, positions)
            return self._run(range(self.num_layers), context[self.embed], context, None)[-1][0][0]

        try:
            packed = last_layer(np.asarray([[*first, *second]]), np.asarray([[*range(len(first)), *range(len(second))]]))
            alone = np.concatenate([last_layer(np.asarray([part]), None) for part in (first, second)])
        except _ORT_ERRORS:
            return False
        finally:
            self.layer_tokens = 0  # the check is not part of any path's work
        return bool(np.allclose(packed, alone, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(alone).max()))))

    def _past_feeds(self, layer: int, kv: tuple | None, rows: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s cache inputs: the prefix's keys and values repeated for every row, or empty (no prefix)."""
        if not self.past:
            return {}
        if kv is None:
            return cache_feeds(self.layers[layer].get_inputs(), rows)
        return {name: np.repeat(value, rows, axis=0) for name, value in zip(self.past[layer], kv)}

    def _run(self, layers: Iterable[int], stream: np.ndarray, context: dict, past: list | None, *,
             attention_half: bool = False) -> list[tuple[np.ndarray, tuple]]:
        """Run ``layers`` in order from ``stream``; per layer run, its output and its keys and values.

        ``past[k]`` is the prefix's cache for the k-th layer run (None: no prefix). ``attention_half``: the last
        layer (which must come last) stops at its resid_mid (the tail's positionwise half goes on from there)."""
        results = []
        for k, layer in enumerate(layers):
            self.layer_tokens += stream.shape[0] * stream.shape[1]
            feeds = {**context, **self._past_feeds(layer, past[k] if past else None, len(stream)), self.resid_in[layer]: stream}
            session = self.tail[0] if attention_half and layer == self.num_layers - 1 else self.layers[layer]
            stream, *kv = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
            results.append((stream, tuple(kv)))
        return results

    def _head(self, stream: np.ndarray, context: dict, batch: TokenBatch, positions: np.ndarray | None = None,
              targets: np.ndarray | None = None, *, from_mid: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``token_scores`` of the batch's targets (or of ``targets`` at ``positions`` of ``stream``), HEAD_BYTES of logits a call.
        ``from_mid``: ``stream`` is the last layer's resid_mid, and the tail's positionwise half finishes the layer."""
        positions = batch.positions if positions is None else positions
        targets = batch.targets if targets is None else targets
        head, resid_in = self._head_session(from_mid)
        feeds = {i.name: stream if i.name == resid_in else context[i.name] for i in head.get_inputs() if i.name != POSITIONS}
        scores = []
        for k in range(0, len(positions), self.head_rows):
            logits = head.run(None, {**feeds, POSITIONS: positions[k : k + self.head_rows]})[0]
            scores.append(token_scores(logits, targets[k : k + self.head_rows], self.threads))
        return np.concatenate([s[0] for s in scores]), np.concatenate([s[1] for s in scores])

    def _head_session(self, from_mid: bool) -> tuple[ort.InferenceSession, str]:
        """The session that finishes a path and the stream name it reads: the head from the last layer's output, or
        the tail's positionwise half from the last layer's resid_mid."""
        return (self.tail[1], self.tail[2]) if from_mid else (self.head, self.resid_in[-1])

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
        for b in range(len(self.batches)) if batches is None else batches:
            batch, context = self.batches[b], self.base_context(b)
            stream = self.outputs.get(b, resume_at - 1) if resume_at else context[self.embed]
            runs = self._run(remaining, stream, context, prefix_caches.get(batch.prefix))
            results.append(self._head(runs[-1][0] if runs else stream, context, batch))
        return results

    def paths_scores(self, paths: Sequence[Sequence[int]], batches: Sequence[int] | None = None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per path, what ``path_scores(path, batches)`` returns, with the paths that end in the base order run together.

        A duplicated block's path departs at j and then runs i, i+1, ..., L-1: every such path runs the same layers
        from its start on, so per batch the paths are stacked along the rows and each layer runs once on all the
        paths that have reached it (a wavefront over the layers). Rows never see each other, so each path's scores
        are its own; only the calls get the tokens the matrix products need. The scored rows of every path and
        batch then go through the head together (a head call reads the whole vocabulary matrix, Qwen2.5-1.5B: 0.9 GB,
        so one on a few positions waits on memory). The kept path itself is scored from its kept outputs; other
        paths run one by one (path_scores)."""
        batches = list(range(len(self.batches))) if batches is None else list(batches)
        results: list[list] = [[None] * len(batches) for _ in paths]
        stacked: list[tuple[int, int, int]] = []  # (path index, layers shared with base_path, first layer run after)
        kept: list[int] = []  # paths equal to base_path
        for k, path in enumerate(paths):
            resume_at = departure(path, self.base_path)
            rest = list(path[resume_at:])
            if not self.prefixes and rest and rest == list(range(rest[0], self.num_layers)):
                stacked.append((k, resume_at, rest[0]))
            elif not self.prefixes and list(path) == self.base_path:
                kept.append(k)
            else:
                results[k] = self.path_scores(path, batches)
        stacked.sort(key=lambda entry: (entry[2], entry[0]))
        pools = {False: _HeadPool(self, from_mid=False), True: _HeadPool(self, from_mid=True)}
        for n, b in enumerate(batches if stacked or kept else ()):
            batch, context = self.batches[b], self.base_context(b)
            for k in kept:
                pools[False].add((k, n), self.outputs.get(b, self.num_layers - 1), context, batch)
            half = bool(stacked) and self._tail_agrees(b)
            group = max(1, STACK_BYTES // max(1, context[self.embed].nbytes))  # paths whose streams are held at once
            for at in range(0, len(stacked), group):
                chosen = stacked[at : at + group]
                for (k, _, _), stream in zip(chosen, self._wavefront(b, chosen, half)):
                    pools[half].add((k, n), stream, context, batch)
        for pool in pools.values():
            for (k, n), scores in pool.scores():
                results[k][n] = scores
        return results

    def _tail_agrees(self, b: int) -> bool:
        """Whether the tail serves: the first time, batch ``b``'s last layer and head are run both ways and compared
        (an architecture whose MLP half is not token by token, or a runtime that disagrees, keeps the whole layer)."""
        if self.tail is not None and not self._tail_checked:
            self._tail_checked = True
            batch, context = self.batches[b], self.base_context(b)
            last = self.num_layers - 1
            stream = self.outputs.get(b, last - 1) if last else context[self.embed]
            work = self.layer_tokens  # the check is not part of any path's work
            whole = self._head(self._run([last], stream, context, None)[0][0], context, batch)
            try:
                halves = self._head(self._run([last], stream, context, None, attention_half=True)[0][0], context, batch, from_mid=True)
            except _ORT_ERRORS:
                halves = None
            self.layer_tokens = work
            if halves is None or not (np.allclose(halves[0], whole[0], rtol=1e-4, atol=1e-4) and (halves[1] == whole[1]).mean() > 0.99):
                self.tail = None
        return self.tail is not None

    def _wavefront(self, b: int, chosen: list[tuple[int, int, int]], attention_half: bool = False) -> list[np.ndarray]:
        """Batch ``b``'s final streams of the ``chosen`` (path, resume_at, first layer) entries, sorted by first layer
        (``attention_half``: the last layer's resid_mid)."""
        batch, context = self.batches[b], self.base_context(b)
        per_call = max(1, self.stack_tokens // batch.input_ids.size)  # paths stacked in one layer call
        tiled: dict[int, dict] = {1: context}
        streams: list[np.ndarray] = []
        joined = 0
        for layer in range(chosen[0][2], self.num_layers):
            while joined < len(chosen) and chosen[joined][2] == layer:
                resume_at = chosen[joined][1]
                streams.append(self.outputs.get(b, resume_at - 1) if resume_at else context[self.embed])
                joined += 1
            for at in range(0, len(streams), per_call):
                part = streams[at : at + per_call]
                if len(part) not in tiled:
                    copies = (len(part), 1)
                    tiled[len(part)] = self._context(np.tile(batch.input_ids, copies), np.tile(batch.attention_mask, copies), None,
                                                     None if batch.position_ids is None else np.tile(batch.position_ids, copies))
                out = self._run([layer], np.concatenate(part) if len(part) > 1 else part[0], tiled[len(part)], None, attention_half=attention_half)[0][0]
                streams[at : at + per_call] = np.split(out, len(part))
        return streams

    def evaluate(self, path: Sequence[int]) -> dict:
        return self.plan.metrics(self.path_scores(path))

    def rebase(self, path: Sequence[int]) -> None:
        """Keep the outputs of ``path`` instead of the base model's: paths that share more of it then resume later
        (a greedy search that removes one more layer each step departs from the last step's path, not the model's)."""
        if self.prefixes:
            raise CpOnnxError("rebase needs a plan without shared prefixes (their caches follow the base model)")
        for b in range(len(self.batches)):
            self.base_context(b)  # the batch's context (and its outputs along the old path, replaced below)
        kept = KeptOutputs()
        for b, context in self.contexts.items():
            kept.put(b, [stream for stream, _ in self._run(path, context[self.embed], context, None)])
        self.base_path, self.outputs = list(path), kept


class _HeadPool:
    """Scored rows of many (path, batch) pairs, run through the head (or the tail's positionwise half) together.

    The rows are gathered here, so pairs of different batches share calls: the head sees them as one row of
    tokens. A head that reads context tensors (a shape) cannot take them so, and scores each pair at once."""

    def __init__(self, evaluator: ReuseEvaluator, *, from_mid: bool):
        self.evaluator, self.from_mid = evaluator, from_mid
        head, resid = evaluator._head_session(from_mid and evaluator.tail is not None)  # a pool without a tail stays empty
        self.poolable = not {i.name for i in head.get_inputs()} - {resid, POSITIONS}
        self.keys, self.rows, self.targets, self.done = [], [], [], []

    def add(self, key, stream: np.ndarray, context: dict, batch: TokenBatch) -> None:
        if not self.poolable:
            self.done.append((key, self.evaluator._head(stream, context, batch, from_mid=self.from_mid)))
            return
        self.keys.append(key)
        self.rows.append(stream.reshape(-1, stream.shape[-1])[batch.positions])
        self.targets.append(batch.targets)

    def scores(self) -> list[tuple[object, tuple[np.ndarray, np.ndarray]]]:
        if self.keys:
            rows = np.concatenate(self.rows)[None]  # [1, positions, hidden]: position k is row k
            logprob, hit = self.evaluator._head(rows, {}, None, np.arange(rows.shape[1]), np.concatenate(self.targets), from_mid=self.from_mid)
            cuts = np.cumsum([len(t) for t in self.targets])[:-1]
            self.done.extend(zip(self.keys, zip(np.split(logprob, cuts), np.split(hit, cuts))))
        return self.done


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
