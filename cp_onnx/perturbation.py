"""Perturbed forwards of one text, many at a time, and the base activations they start from.

A ``Row`` is the base forward with one perturbation entering one layer: a change of the residual
stream at the layer's input and/or a scale and shift of that layer's head contexts (the perturb
pass's inputs). The model is cut at layer boundaries (segment pass) and rows are batched by the
layer where they start: layer ``l`` runs on the base row and every row that started at or before
``l``, so a row starting at ``l`` costs layers ``l..L-1`` and the head, not a full forward. The
rows of a text are copies of that text, run without padding, so each equals the text run alone.

A ``Probe`` groups the rows of one estimate: a central-difference pair (its logit change is
measured between its two rows) or a single row (measured against the base row of the same batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import onnx

from cp_onnx.errors import CpOnnxError
from cp_onnx.runner import Runner, position_ids_for, segment_session
from graph_passes import expose
from graph_passes.layer_map import LayerMap, block_name
from graph_passes.perturb import head_scale_input, head_shift_input, include_inserted, perturb, resid_input
from graph_passes.segment import POSITIONS, segment

LAYER_TOKENS = 8192  # rows x tokens per layer call: bounds the MLP's intermediate activations
HEAD_BYTES = 2**28  # logits per head call (256 MB): rows x seq x vocab float32


@dataclass(frozen=True)
class Row:
    """One perturbed forward: what changes at the input of ``layer`` (``num_layers`` = the head's input)."""

    layer: int
    resid: np.ndarray | None = None  # [seq, hidden] added to the residual stream entering ``layer``
    head_scale: np.ndarray | None = None  # [heads] multiplying the layer's head contexts
    head_shift: np.ndarray | None = None  # [heads, seq or 1, head_dim] added to them


@dataclass(frozen=True)
class Probe:
    """The rows of one estimate (a central pair, or one row compared with the base), with its key and step."""

    key: tuple
    rows: tuple[Row, ...]
    step: float = 1.0


@dataclass
class RowResult:
    """What one row's forward gave, relative to the base row of the same batch."""

    final: np.ndarray  # [seq, hidden] the last layer's output
    loss: np.ndarray  # [seq - 1] next-token loss (nats) at positions 0..seq-2
    kl: np.ndarray  # [seq] KL(base || row) of the next-token distributions
    fisher: np.ndarray  # [seq] variance under the base distribution of the logit change: KL ~ fisher / 2 for small changes
    logit_change: np.ndarray  # [seq] norm of the logit change from the base
    update_change: np.ndarray  # [num_layers] sum over tokens of |change of each layer's update (out - in)|^2; 0 before the row's layer


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


def base_activations(model: onnx.ModelProto, layer_map: LayerMap, token_lists: Sequence[Sequence[int]], *, threads: int | None = None) -> list[TextBase]:
    """Run each text alone through the full model, keeping the stream and head contexts; NaN/Inf stops it, naming the layer."""
    n = layer_map.num_layers
    with_heads = layer_map.available("attn.head_ctx")
    names = ["embed"] + [block_name(l, "resid_out") for l in range(n)] + ([block_name(l, "attn.head_ctx") for l in range(n)] if with_heads else [])
    runner = Runner(expose(model, layer_map, names), threads=threads)
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

    def __init__(self, model: onnx.ModelProto, layer_map: LayerMap, *, threads: int | None = None,
                 layer_tokens: int = LAYER_TOKENS, head_bytes: int = HEAD_BYTES):
        self.layer_map, self.num_layers = layer_map, layer_map.num_layers
        self.with_heads = layer_map.available("attn.head_ctx") and bool(layer_map.num_heads)
        perturbed = perturb(model, layer_map, heads=range(self.num_layers) if self.with_heads else ())
        parts = segment(perturbed, include_inserted(layer_map, perturbed))
        del perturbed
        self.embed, self.resid_in = parts.embed, parts.resid_in
        self.preamble = segment_session(parts.preamble, threads)
        self.layers = [segment_session(layer, threads) for layer in parts.layers]
        self.head = segment_session(parts.head, threads)
        self.layer_tokens, self.head_bytes = layer_tokens, head_bytes

    def run(self, ids: Sequence[int], probes: Sequence[Probe]) -> tuple[RowResult, list[ProbeResult]]:
        """Run the base row and every probe's rows for one text; returns the base's result and each probe's."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = [Row(0)] + [row for probe in probes for row in probe.rows]
        for probe in probes:
            if len({row.layer for row in probe.rows}) != 1 or not 0 <= probe.rows[0].layer <= self.num_layers:
                raise CpOnnxError(f"probe {probe.key}: its rows must start at one layer in 0..{self.num_layers}")
        order = sorted(range(len(rows)), key=lambda i: rows[i].layer)  # stable: the base stays first, probes stay contiguous
        rows = [rows[i] for i in order]
        stream, update_sq = self._layers(ids, rows)
        finals = np.empty_like(stream)
        finals[order] = stream
        updates = np.empty_like(update_sq)
        updates[order] = update_sq
        return self._head(ids, finals, updates, probes)

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

    def _layers(self, ids: np.ndarray, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Every row's last-layer output [rows, seq, hidden] and per-layer update changes [rows, layers]."""
        seq, L = ids.size, self.num_layers
        context = self._contexts(ids)
        base = context(1)[self.embed][0]
        stream = np.empty((len(rows), seq, base.shape[-1]), dtype=base.dtype)
        stream[0] = base
        update_sq = np.zeros((len(rows), L))
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
                change = (out - stream[a:b]) - base_update
                update_sq[a:b, l] = np.einsum("rsd,rsd->r", change, change)
                stream[a:b] = out
            bad = np.flatnonzero(~np.isfinite(update_sq[:active, l]))  # a NaN/Inf anywhere in a row makes its sum one
            if bad.size:
                bad = int(bad[0])
                raise CpOnnxError(
                    f"layer {l} produced NaN/Inf activations ({block_name(l, 'resid_out')}) on a forward perturbed at layer {rows[bad].layer}; "
                    "the perturbation is too large for the model's numerics or the model is broken: use float32 and smaller steps"
                )
        return stream, update_sq

    def _layer(self, l: int, stream: np.ndarray, context: dict, rows: list[Row], seq: int) -> np.ndarray:
        session = self.layers[l]
        feeds = perturb_feeds(self.layer_map, len(rows), seq, heads=[l] if self.with_heads else [], dtype=stream.dtype)
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

    def _head(self, ids: np.ndarray, finals: np.ndarray, updates: np.ndarray, probes: Sequence[Probe]) -> tuple[RowResult, list[ProbeResult]]:
        """Logits per probe-aligned chunk of rows, reduced at once to loss, KL and logit changes."""
        seq = ids.size
        context = self._contexts(ids)
        base_logits = self._logits(finals[:1], context)[0]
        check_finite(base_logits, "logits", "the head produced")
        base = _BaseDistribution(base_logits, ids)
        base_result = base.result(base_logits, finals[0], updates[0])
        vocab = base_logits.shape[-1]
        max_rows = max(2, self.head_bytes // (seq * vocab * 4))
        results, start, k = [], 1, 0
        while k < len(probes):
            group, size = [], 0
            while k < len(probes) and (not group or size + len(probes[k].rows) <= max_rows):
                group.append(probes[k])
                size += len(probes[k].rows)
                k += 1
            logits = self._logits(finals[start : start + size], context)
            offset = 0
            for probe in group:
                n = len(probe.rows)
                rows = [base.result(logits[offset + j], finals[start + offset + j], updates[start + offset + j]) for j in range(n)]
                pair = np.linalg.norm(logits[offset] - logits[offset + 1], axis=-1) if n == 2 else None
                if not all(np.isfinite(row.kl).all() and np.isfinite(row.logit_change).all() for row in rows):  # NaN/Inf logits show here
                    raise CpOnnxError(f"the head produced NaN/Inf logits on a forward perturbed at layer {probe.rows[0].layer}; "
                                      "the perturbation is too large for the model's numerics or the model is broken: use float32 and smaller steps")
                results.append(ProbeResult(probe, rows, pair))
                offset += n
            start += size
        return base_result, results

    def _logits(self, stream: np.ndarray, context) -> np.ndarray:
        rows, seq = stream.shape[:2]
        feeds = {POSITIONS: np.arange(rows * seq, dtype=np.int64)}
        for value in self.head.get_inputs():
            if value.name == self.resid_in[-1]:
                feeds[value.name] = stream
            elif value.name != POSITIONS:
                feeds[value.name] = context(rows)[value.name]
        return self.head.run(None, feeds)[0].reshape(rows, seq, -1)


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

    def result(self, logits: np.ndarray, final: np.ndarray, update_change: np.ndarray) -> RowResult:
        """Loss, KL, Fisher variance and logit change of one row against the base.

        Small differences are formed before any sum (logit deltas, expm1, log1p), so the float32 sums
        keep their relative precision even for the tiny changes of a finite-difference step.
        """
        delta = logits - self.logits  # [seq, vocab]
        p = self.probs[:, None, :]
        # log-normaliser change: log sum_v p_v exp(delta_v), exact and accurate for small deltas (log1p/expm1)
        log_norm_change = np.log1p(np.matmul(p, np.expm1(delta)[:, :, None])[:, 0, 0].astype(np.float64))
        mean = np.matmul(p, delta[:, :, None])[:, 0, 0].astype(np.float64)
        centred = delta - mean[:, None].astype(np.float32)
        fisher = np.matmul(p, (centred * centred)[:, :, None])[:, 0, 0].astype(np.float64)
        positions = np.arange(self.ids.size - 1)
        loss = self.loss + log_norm_change[:-1] - delta[positions, self.ids[1:]]
        return RowResult(
            final=final,
            loss=loss,
            kl=np.maximum(log_norm_change - mean, 0.0),  # KL(p||q) = log sum p e^delta - E_p[delta]
            fisher=fisher,
            logit_change=np.linalg.norm(delta, axis=-1),
            update_change=update_change,
        )
