"""Perturbed forwards of one text, many at a time, and the base activations they start from.

A ``Row`` is the base forward with one perturbation entering one layer: a change of the residual
stream at the layer's input and/or a scale and shift of that layer's head contexts (the perturb
pass's inputs). The model is cut at layer boundaries (segment pass) and rows are batched by the
layer where they start: layer ``l`` runs on the base row and every row that started at or before
``l``, so a row starting at ``l`` costs layers ``l..L-1`` and the head, not a full forward. The
rows of a text are copies of that text, run without padding, so each equals the text run alone.

A ``Probe`` groups the rows of one estimate: a central-difference pair (its logit change is
measured between its two rows) or a single row (measured against the base row of the same batch).
It names the measures its estimate reads, and only those are computed: each is a few passes over a
[seq, vocab] array per row, a tenth of the run time when every row computed all of them.

Where the logits are the normed hidden state times a matrix (``split_unembedding``), rows skip the
vocabulary-wide product when they can: a pair that needs only its logit change takes it from the Gram
matrix of the unembedding, and a single row that needs no KL takes its loss (to second order), Fisher
variance and logit change from ``linear_head`` (see there for what is exact and what is truncated).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from cp_onnx.analysis.linear_head import TOP_TOKENS, LinearHead
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.runner import Runner, SharedWeights, cache_feeds, position_ids_for, segment_session
from graph_passes import expose
from graph_passes.layer_map import LayerMap, block_name
from graph_passes.perturb import head_scale_input, head_shift_input, perturb, resid_input
from graph_passes.rewrite import include_inserted
from graph_passes.segment import POSITIONS, segment, split_unembedding

LAYER_TOKENS = 2048  # rows x tokens per layer call: SmolLM2's layers run 20-30% faster per token at 1-2k tokens than at 8k (cache)
HEAD_BYTES = 2**28  # logits per head call (256 MB): rows x seq x vocab float32


@dataclass(frozen=True)
class Row:
    """One perturbed forward: what changes at the input of ``layer`` (``num_layers`` = the head's input)."""

    layer: int
    resid: np.ndarray | None = None  # [seq, hidden] added to the residual stream entering ``layer``
    head_scale: np.ndarray | None = None  # [heads] multiplying the layer's head contexts
    head_shift: np.ndarray | None = None  # [heads, seq or 1, head_dim] added to them


LOGIT_MEASURES = ("loss", "kl", "fisher", "logit_change")  # RowResult fields computed from a row's logits
MEASURES = frozenset({*LOGIT_MEASURES, "update_change"})  # every RowResult field computed on demand
LINEAR_MEASURES = frozenset({"loss", "fisher", "logit_change", "update_change"})  # what a single row can take from linear_head


@dataclass(frozen=True)
class Probe:
    """The rows of one estimate (a central pair, or one row compared with the base), with its key, step and
    the measures (of MEASURES) its rows need; ``final`` and a pair's logit change are always there."""

    key: tuple
    rows: tuple[Row, ...]
    step: float = 1.0
    measures: frozenset[str] = MEASURES


@dataclass
class RowResult:
    """What one row's forward gave, relative to the base row of the same batch."""

    final: np.ndarray  # [seq, hidden] the last layer's output
    # Measures, None where the probe did not ask for them:
    update_change: np.ndarray | None = None  # [num_layers] sum over tokens of |change of each layer's update (out - in)|^2; 0 before the row's layer
    loss: np.ndarray | None = None  # [seq - 1] next-token loss (nats) at positions 0..seq-2
    kl: np.ndarray | None = None  # [seq] KL(base || row) of the next-token distributions
    fisher: np.ndarray | None = None  # [seq] variance under the base distribution of the logit change: KL ~ fisher / 2 for small changes
    logit_change: np.ndarray | None = None  # [seq] norm of the logit change from the base


@dataclass
class ProbeResult:
    probe: Probe
    rows: list[RowResult]
    pair_logit_change: np.ndarray | None = None  # [seq] |logits(row 0) - logits(row 1)| for a pair


@dataclass
class TextBase:
    """Base activations of one text from the full model: the residual stream and the head contexts."""

    ids: np.ndarray  # [seq] token ids
    resid: np.ndarray  # [num_layers + 1, seq, hidden]: embed, then every layer's output
    head_ctx: np.ndarray | None  # [num_layers, heads, seq, head_dim]

    @property
    def updates(self) -> np.ndarray:
        """[num_layers, seq, hidden] what each layer adds to the stream."""
        return np.diff(self.resid, axis=0)


def base_activations(model: onnx.ModelProto, layer_map: LayerMap, token_lists: Sequence[Sequence[int]], *, threads: int | None = None,
                     weights: SharedWeights | None = None) -> list[TextBase]:
    """Run each text alone through the full model, keeping the stream and head contexts; NaN/Inf stops it, naming the layer."""
    n = layer_map.num_layers
    with_heads = layer_map.available("attn.head_ctx")
    names = ["embed"] + [block_name(l, "resid_out") for l in range(n)] + ([block_name(l, "attn.head_ctx") for l in range(n)] if with_heads else [])
    runner = Runner(expose(model, layer_map, names), threads=threads, weights=weights)
    texts = []
    for ids in token_lists:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise CpOnnxError("every calibration text must tokenize to at least one token; drop empty texts")
        mask = np.ones((1, ids.size), dtype=np.int64)
        out = dict(zip(names, runner.session.run(names, runner.feeds(ids[None], mask))))
        check_finite(out["embed"], "embed", "the embedding produced")
        for l in range(n):
            if with_heads:
                check_finite(out[block_name(l, "attn.head_ctx")], block_name(l, "attn.head_ctx"), f"layer {l} produced")
            check_finite(out[block_name(l, "resid_out")], block_name(l, "resid_out"), f"layer {l} produced")
        resid = np.stack([out["embed"][0]] + [out[block_name(l, "resid_out")][0] for l in range(n)])
        head_ctx = np.stack([out[block_name(l, "attn.head_ctx")][0] for l in range(n)]) if with_heads else None
        texts.append(TextBase(ids, resid, head_ctx))
    return texts


def perturb_feeds(layer_map: LayerMap, rows: int, seq: int, layers: Iterable[int] = (), heads: Iterable[int] = (), dtype=np.float32) -> dict[str, np.ndarray]:
    """Feeds that leave a perturbed model unchanged (ONNX inputs have no defaults): zero residual deltas
    for ``layers``, unit head scales and zero head shifts for the layers in ``heads``; rows x seq tokens."""
    feeds = {resid_input(l): np.zeros((rows, seq, layer_map.hidden_size), dtype) for l in layers}
    for l in heads:
        feeds[head_scale_input(l)] = np.ones((rows, layer_map.num_heads), dtype)
        feeds[head_shift_input(l)] = np.zeros((rows, layer_map.num_heads, seq, layer_map.head_dim), dtype)
    return feeds


def check_finite(values: np.ndarray, name: str, where: str) -> None:
    """Raise the one-line NaN/Inf error naming the activation (and so the layer)."""
    if not np.isfinite(values).all():
        raise CpOnnxError(
            f"{where} NaN/Inf activations ({name}); the model overflows or is broken on this input: "
            "export it in float32 (not float16) and check the weights and input ids"
        )


class PerturbedRuns:
    """The model cut at layer boundaries, with head scale/shift inputs in every layer that has heads."""

    def __init__(self, model: onnx.ModelProto, layer_map: LayerMap, *, threads: int | None = None, weights: SharedWeights | None = None,
                 layer_tokens: int = LAYER_TOKENS, head_bytes: int = HEAD_BYTES, linear_rows: bool = True, top_tokens: int = TOP_TOKENS):
        """``linear_rows=False`` sends every single row through the full head (the tests compare the two paths);
        ``top_tokens``: the tokens per position a linear row's Fisher variance is summed over (linear_head)."""
        self.layer_map, self.num_layers = layer_map, layer_map.num_layers
        self.with_heads = layer_map.available("attn.head_ctx") and bool(layer_map.num_heads)
        perturbed = perturb(model, layer_map, heads=range(self.num_layers) if self.with_heads else ())
        parts = segment(perturbed, include_inserted(layer_map, perturbed))
        del perturbed
        self.embed, self.resid_in = parts.embed, parts.resid_in
        self.preamble = segment_session(parts.preamble, weights, threads)
        self.layers = [segment_session(layer, weights, threads) for layer in parts.layers]
        self.head = segment_session(parts.head, weights, threads)
        self.layer_tokens, self.head_bytes = layer_tokens, head_bytes
        # Where logits = hidden @ W, rows that need no KL skip the vocabulary-wide product (module docstring):
        # pairs, SmolLM2's Jacobian probes, a third of its head time; single rows, its head estimates, ~9 layers' worth per row.
        self.normed, self.linear, self.linear_rows = None, None, linear_rows
        split = split_unembedding(parts.head)
        if split is not None:
            normed, weight = split
            w = weights.arrays[weight.name] if weights and weight.name in weights.arrays else numpy_helper.to_array(weight)
            self.normed, self.linear = segment_session(normed, weights, threads), LinearHead(w, top_tokens)

    @property
    def gram(self) -> np.ndarray | None:
        """W W^T [hidden, hidden] of the unembedding where logits = normed hidden @ W; else None."""
        return None if self.linear is None else self.linear.gram

    def run(self, ids: Sequence[int], probes: Sequence[Probe]) -> tuple[RowResult, list[ProbeResult]]:
        """Run the base row and every probe's rows for one text; returns the base's result and each probe's."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = [Row(0)] + [row for probe in probes for row in probe.rows]
        tracked = np.array([True] + [("update_change" in probe.measures) for probe in probes for _ in probe.rows])
        for probe in probes:
            if len({row.layer for row in probe.rows}) != 1 or not 0 <= probe.rows[0].layer <= self.num_layers:
                raise CpOnnxError(f"probe {probe.key}: its rows must start at one layer in 0..{self.num_layers}")
        order = sorted(range(len(rows)), key=lambda i: rows[i].layer)  # stable: the base stays first, probes stay contiguous
        rows = [rows[i] for i in order]
        stream, update_sq = self._layers(ids, rows, tracked[order])
        finals = np.empty_like(stream)
        finals[order] = stream
        updates = np.empty_like(update_sq)
        updates[order] = update_sq
        return self._head(ids, finals, [u if t else None for u, t in zip(updates, tracked)], probes)

    def _contexts(self, ids: np.ndarray):
        cache: dict[int, dict[str, np.ndarray]] = {}

        def context(rows: int) -> dict[str, np.ndarray]:
            if rows not in cache:
                tokens = np.repeat(ids[None], rows, axis=0)
                mask = np.ones_like(tokens)
                feeds = {"input_ids": tokens, "attention_mask": mask, "position_ids": position_ids_for(mask), "token_type_ids": np.zeros_like(tokens)}
                names = [o.name for o in self.preamble.get_outputs()]
                made = self.preamble.run(names, {i.name: feeds[i.name] for i in self.preamble.get_inputs()})
                cache[rows] = {**feeds, **dict(zip(names, made))}
            return cache[rows]

        return context

    def _layers(self, ids: np.ndarray, rows: list[Row], tracked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row's last-layer output [rows, seq, hidden] and per-layer update changes [rows, layers] (zero where not ``tracked``)."""
        seq, L = ids.size, self.num_layers
        context = self._contexts(ids)
        base = context(1)[self.embed][0]
        stream = np.empty((len(rows), seq, base.shape[-1]), dtype=base.dtype)
        stream[0] = base
        update_sq, sums = np.zeros((len(rows), L)), np.zeros(len(rows))
        starts = np.array([row.layer for row in rows])
        chunk = max(1, self.layer_tokens // seq)
        for l in range(L + 1):
            new = np.flatnonzero(starts == l)
            for i in new[new > 0]:
                stream[i] = stream[0] + (rows[i].resid if rows[i].resid is not None else 0)
            if l == L:
                break
            active = int(np.searchsorted(starts, l, side="right"))
            for a in range(0, active, chunk):
                b = min(active, a + chunk)
                out = self._layer(l, stream[a:b], context(b - a), rows[a:b], seq)
                if a == 0:
                    base_update = out[0] - stream[0]
                keep = np.flatnonzero(tracked[a:b])
                change = (out[keep] - stream[a:b][keep]) - base_update
                update_sq[a + keep, l] = np.einsum("rsd,rsd->r", change, change)
                sums[a:b] = out.sum(axis=(1, 2))  # a NaN/Inf anywhere in a row makes its sum one
                stream[a:b] = out
            bad = np.flatnonzero(~np.isfinite(sums[:active]))
            if bad.size:
                bad = int(bad[0])
                raise CpOnnxError(
                    f"layer {l} produced NaN/Inf activations ({block_name(l, 'resid_out')}) on a forward perturbed at layer {rows[bad].layer}; "
                    "the perturbation is too large for the model's numerics or the model is broken: use float32 and smaller steps"
                )
        return stream, update_sq

    def _layer(self, l: int, stream: np.ndarray, context: dict, rows: list[Row], seq: int) -> np.ndarray:
        session = self.layers[l]
        feeds = {**cache_feeds(session.get_inputs(), len(rows)),  # genai graphs: an empty cache
                 **perturb_feeds(self.layer_map, len(rows), seq, heads=[l] if self.with_heads else [], dtype=stream.dtype)}
        for k, row in enumerate(rows):
            if row.layer == l and row.head_scale is not None:
                feeds[head_scale_input(l)][k] = row.head_scale
            if row.layer == l and row.head_shift is not None:
                feeds[head_shift_input(l)][k] = row.head_shift
        for value in session.get_inputs():
            if value.name == self.resid_in[l]:
                feeds[value.name] = stream
            elif value.name not in feeds:
                feeds[value.name] = context[value.name]
        return session.run(None, feeds)[0]

    def _head(self, ids: np.ndarray, finals: np.ndarray, updates: list[np.ndarray | None], probes: Sequence[Probe]) -> tuple[RowResult, list[ProbeResult]]:
        """Logits per probe-aligned chunk of rows, reduced at once to loss, KL and logit changes; pairs that
        need only their logit change, and single rows that need no KL, take the linear paths where the head allows it."""
        seq = ids.size
        context = self._contexts(ids)
        base_logits = self._logits(finals[:1], context)[0]
        check_finite(base_logits, "logits", "the head produced")
        base = _BaseDistribution(base_logits, ids)
        base_result = base.result(base_logits, finals[0], updates[0])
        first = np.cumsum([1] + [len(probe.rows) for probe in probes])  # each probe's first row
        by_gram = [k for k, probe in enumerate(probes) if self.gram is not None and not probe.measures and len(probe.rows) == 2]
        results: list[ProbeResult | None] = [None] * len(probes)
        for k, change in zip(by_gram, self._pair_changes(finals, first[by_gram], context)):
            results[k] = ProbeResult(probes[k], [RowResult(finals[first[k] + j], updates[first[k] + j]) for j in range(2)], change)
        linear = [k for k, probe in enumerate(probes) if self._linear_row(probe)]
        if linear:
            for k, row in zip(linear, self._linear_results(ids, finals, updates, [probes[k] for k in linear], first[linear], base, context)):
                results[k] = ProbeResult(probes[k], [row])
        vocab = base_logits.shape[-1]
        max_rows = max(2, self.head_bytes // (seq * vocab * 4))
        todo = [k for k in range(len(probes)) if results[k] is None]
        while todo:
            group, size = [], 0  # probes whose rows are contiguous and fit one head call
            while todo and (not group or (todo[0] == group[-1] + 1 and size + len(probes[todo[0]].rows) <= max_rows)):
                group.append(todo.pop(0))
                size += len(probes[group[-1]].rows)
            start = first[group[0]]
            logits = self._logits(finals[start : start + size], context)
            for k in group:
                probe, offset = probes[k], first[k] - start
                n = len(probe.rows)
                rows = [base.result(logits[offset + j], finals[start + offset + j], updates[start + offset + j], probe.measures) for j in range(n)]
                pair = np.linalg.norm(logits[offset] - logits[offset + 1], axis=-1) if n == 2 else None
                measured = [pair, *(getattr(row, name) for row in rows for name in LOGIT_MEASURES)]
                if not all(np.isfinite(m).all() for m in measured if m is not None):  # NaN/Inf logits reach every sum over them
                    raise CpOnnxError(f"the head produced NaN/Inf logits on a forward perturbed at layer {probe.rows[0].layer}; "
                                      "the perturbation is too large for the model's numerics or the model is broken: use float32 and smaller steps")
                results[k] = ProbeResult(probe, rows, pair)
        return base_result, results

    def _linear_row(self, probe: Probe) -> bool:
        return self.linear is not None and self.linear_rows and len(probe.rows) == 1 and probe.measures <= LINEAR_MEASURES

    def _linear_results(self, ids: np.ndarray, finals: np.ndarray, updates: list, probes: list[Probe], rows: np.ndarray,
                        base: "_BaseDistribution", context) -> list[RowResult]:
        """Single rows (``rows`` their indices in ``finals``) measured from their normed hidden states by linear_head."""
        seq = ids.size
        y_base = self._run_head(self.normed, finals[:1], context).astype(np.float64)  # [seq, hidden]
        linear = self.linear.base(base.probs, ids)
        found: list[RowResult | None] = [None] * len(rows)
        chunk = max(1, self.layer_tokens // seq)  # rows per call of the normed head
        group_rows = max(1, self.head_bytes // (seq * y_base.shape[-1] * 4))  # rows whose changes are held at once
        for wanted in sorted({p.measures for p in probes}, key=sorted):  # rows asking the same measures, together
            group = [i for i, p in enumerate(probes) if p.measures == wanted]
            for g in range(0, len(group), group_rows):
                part = group[g : g + group_rows]
                dy = np.empty((len(part), seq, y_base.shape[-1]), np.float32)
                for a in range(0, len(part), chunk):
                    normed = self._run_head(self.normed, finals[rows[part[a : a + chunk]]], context).reshape(-1, seq, y_base.shape[-1])
                    dy[a : a + chunk] = normed - y_base
                if not np.isfinite(dy).all():
                    raise CpOnnxError("the final norm produced NaN/Inf on a perturbed forward; the perturbation is too large for the model's numerics: use float32 and smaller steps")
                measured = linear.measures(dy, wanted)
                for j, i in enumerate(part):
                    values = {name: measured[name][j] for name in ("fisher", "logit_change") if name in wanted}
                    if "loss" in wanted:
                        values["loss"] = base.loss + measured["loss_change"][j]
                    found[i] = RowResult(finals[rows[i]], updates[rows[i]], **values)
        return found

    def _pair_changes(self, finals: np.ndarray, firsts: np.ndarray, context) -> list[np.ndarray]:
        """Per pair (rows firsts[i] and firsts[i] + 1), the norm of its logit difference [seq], from the normed hidden states."""
        seq = finals.shape[1]
        chunk = max(1, self.layer_tokens // (2 * seq))
        found = []
        for a in range(0, len(firsts), chunk):
            rows = np.stack([finals[i + j] for i in firsts[a : a + chunk] for j in range(2)])
            normed = self._run_head(self.normed, rows, context).reshape(len(rows) // 2, 2, seq, -1)
            if not np.isfinite(normed).all():
                raise CpOnnxError("the final norm produced NaN/Inf on a perturbed forward; the perturbation is too large for the model's numerics: use float32 and smaller steps")
            found.extend(self.linear.logit_change((normed[:, 0] - normed[:, 1]).astype(np.float64)))
        return found

    def _logits(self, stream: np.ndarray, context) -> np.ndarray:
        return self._run_head(self.head, stream, context).reshape(*stream.shape[:2], -1)

    def _run_head(self, session, stream: np.ndarray, context) -> np.ndarray:
        """The head (or its normed part) at every position of ``stream`` [rows, seq, hidden]; [rows * seq, width]."""
        rows, seq = stream.shape[:2]
        feeds = {POSITIONS: np.arange(rows * seq, dtype=np.int64)}
        for value in session.get_inputs():
            if value.name == self.resid_in[-1]:
                feeds[value.name] = stream
            elif value.name != POSITIONS:
                feeds[value.name] = context(rows)[value.name]
        return session.run(None, feeds)[0]


@dataclass
class _BaseDistribution:
    """The base row's next-token distributions, against which every row's logits are compared."""

    logits: np.ndarray  # [seq, vocab]
    ids: np.ndarray
    probs: np.ndarray = field(init=False)
    loss: np.ndarray = field(init=False)

    def __post_init__(self):
        shifted = self.logits - self.logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))
        self.probs = np.exp(shifted - log_norm[:, None].astype(np.float32))
        target = self.logits[np.arange(self.ids.size - 1), self.ids[1:]]
        self.loss = (self.logits.max(axis=-1) + log_norm)[:-1] - target

    def result(self, logits: np.ndarray, final: np.ndarray, update_change: np.ndarray, measures: frozenset[str] = MEASURES) -> RowResult:
        """Of loss, KL, Fisher variance and logit change of one row against the base, the ``measures`` asked for.

        Small differences are formed before any sum (logit deltas, expm1, log1p), so the float32 sums
        keep their relative precision even for the tiny changes of a finite-difference step.
        """
        if measures.isdisjoint(LOGIT_MEASURES):
            return RowResult(final, update_change)
        found = {}
        delta = logits - self.logits  # [seq, vocab]
        p = self.probs[:, None, :]
        if measures & {"kl", "fisher"}:
            mean = np.matmul(p, delta[:, :, None])[:, 0, 0].astype(np.float64)
        if measures & {"loss", "kl"}:
            # log-normaliser change: log sum_v p_v exp(delta_v), exact and accurate for small deltas (log1p/expm1)
            log_norm_change = np.log1p(np.matmul(p, np.expm1(delta)[:, :, None])[:, 0, 0].astype(np.float64))
        if "loss" in measures:
            positions = np.arange(self.ids.size - 1)
            found["loss"] = self.loss + log_norm_change[:-1] - delta[positions, self.ids[1:]]
        if "kl" in measures:
            found["kl"] = np.maximum(log_norm_change - mean, 0.0)  # KL(p||q) = log sum p e^delta - E_p[delta]
        if "logit_change" in measures:
            found["logit_change"] = np.linalg.norm(delta, axis=-1)
        if "fisher" in measures:  # last: it centres and squares delta in place
            delta -= mean[:, None].astype(np.float32)
            np.square(delta, out=delta)
            found["fisher"] = np.matmul(p, delta[:, :, None])[:, 0, 0].astype(np.float64)
        return RowResult(final, update_change, **found)
