"""Teacher-forced scoring of probe items: prompt + answer (or option) in one forward pass, metrics per task kind.

A continuation's tokens are the tail of ``encode(prompt + continuation)`` after the tokens of
``encode(prompt)`` (BOS and all, as the tokenizer adds them), so the continuation is tokenized as in
running text; the prompt's tokens must be a prefix of the joint tokenization. Token ``t[p]`` is
scored with the logits at ``p - 1``. Options share the answer's sequence where they can: an option
whose tokens, all but the last, begin another continuation of the same prompt is read off that
sequence (one-token options always are), so a yes/no item costs one sequence, not two. General texts
are scored on every token after the first.

An item is asked as its shots followed by its prompt (a zero-shot item has no shots).
With ``share_prefixes``, the sequences of one kind and shots (few-shot prompts open with the same solved
examples) are batched together and the tokens they all begin with become the batch's ``prefix``: an
evaluator that keeps a KV cache runs the prefix once and only the rest of each sequence per row.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from cp_onnx.errors import CpOnnxError
from cp_onnx.models.budget import PLAN_ROWS
from cp_onnx.models.runner import Runner, pad_batch

Encode = Callable[[str], Sequence[int]]
PROMPT = "Question: {question}\nAnswer:"  # how a question is asked: the answer follows, starting with a space
METRICS = ("answer_logprob", "greedy_accuracy", "choice_accuracy")
SCORING_VERSION = 1  # bump when what a metric means changes: sweeps made before are not resumed


@dataclass(frozen=True)
class ProbeItem:
    """One teacher-forced item: ``shots + prompt + answer`` is the full text; ``options`` (if any) include ``answer``.

    ``shots`` are solved examples shown before the question (few-shot regime); the same item without
    them is its zero-shot form. An item without shots exists in the zero-shot regime only.
    """
    id: str
    kind: str
    prompt: str
    answer: str
    options: tuple[str, ...] = ()
    shots: str = ""


@dataclass(frozen=True)
class Continuation:
    """What gets a score: an item's answer or one of its options, or a general text."""

    tokens: tuple[int, ...]  # the scored tokens
    item: int | None  # index of the probe item; None for a general text
    option: int | None = None  # index into the item's options; None for an item without options


@dataclass(frozen=True)
class ScoredSequence:
    """One token sequence run through the model; its continuations' tokens are scored from ``start`` on."""

    tokens: tuple[int, ...]
    start: int
    continuations: tuple[int, ...]


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch and the flat positions (row * seq + token) whose logits predict ``targets``.

    Every row's sequence is ``prefix`` followed by the row's ``input_ids``; positions count from the
    end of the prefix. Without shared prefixes, ``prefix`` is empty and the rows are whole sequences.
    A packed batch (``position_ids`` given) holds several sequences per row, each starting at position 0:
    a token attends only to the tokens of its own sequence (the evaluator masks the rest, or runs
    ``unpacked()`` where the graph does not let it), so no row is padded to the longest sequence.
    """

    input_ids: np.ndarray  # [rows, seq]
    attention_mask: np.ndarray
    positions: np.ndarray  # [n] int64
    targets: np.ndarray  # [n] int64
    owners: np.ndarray  # [n] index of the continuation each target belongs to
    prefix: tuple[int, ...] = ()
    position_ids: np.ndarray | None = None  # [rows, seq], packed batches only: each sequence counts from 0

    def unpacked(self) -> "TokenBatch":
        """The same sequences and targets (in the same order), one sequence per right-padded row."""
        if self.position_ids is None:
            return self
        sequences, width = sequence_ids(self.position_ids, self.attention_mask), self.input_ids.shape[1]
        spans = [(row, np.flatnonzero(sequences[row] == k)) for row in range(len(sequences)) for k in range(sequences[row].max() + 1)]
        ids, mask = pad_batch([self.input_ids[row, cols] for row, cols in spans])
        new_row, new_col = np.full(self.input_ids.size, -1), np.full(self.input_ids.size, -1)
        for k, (row, cols) in enumerate(spans):
            new_row[row * width + cols], new_col[row * width + cols] = k, np.arange(len(cols))
        return TokenBatch(ids, mask, new_row[self.positions] * ids.shape[1] + new_col[self.positions], self.targets, self.owners, self.prefix)


def sequence_ids(position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[rows, seq]: per token of packed rows, which sequence of its row it belongs to (each starts at position 0;
    padding: -1)."""
    real = mask > 0
    return np.where(real, np.cumsum((position_ids == 0) & real, axis=1) - 1, -1)


def pack_batch(token_lists: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sequences packed into as many rows as ``width`` tokens a row needs, balanced (longest first, each to the row
    holding the fewest tokens so far), so that only the rows' ends are padded: ``input_ids``, ``attention_mask``,
    ``position_ids`` [rows, seq] and each sequence's flat offset."""
    lengths = [len(tokens) for tokens in token_lists]
    rows: list[list[int]] = [[] for _ in range(max(1, min(len(lengths), -(-sum(lengths) // max(width, 1)))))]
    load = [0] * len(rows)
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        row = min(range(len(rows)), key=lambda r: (load[r], r))
        rows[row].append(k)
        load[row] += lengths[k]
    seq = max(load)
    ids, mask, positions = (np.zeros((len(rows), seq), dtype=np.int64) for _ in range(3))
    offsets = np.zeros(len(lengths), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            ids[r, at : at + lengths[k]], mask[r, at : at + lengths[k]], positions[r, at : at + lengths[k]] = token_lists[k], 1, np.arange(lengths[k])
            offsets[k] = r * seq + at
            at += lengths[k]
    return ids, mask, positions, offsets


class ProbePlan:
    """The sequences to run for some probe items and general texts, batched by length."""

    def __init__(self, items: Sequence[ProbeItem], encode: Encode, general: Sequence[str] = (), *, batch_size: int = PLAN_ROWS,
                 max_length: int = 256, share_prefixes: bool = False, item_limit: int | None = None, every_token: bool = False):
        """General texts are cut at ``max_length`` tokens; an item (shots, prompt and answer) longer than ``item_limit``
        is refused (cut, it would lose its answer). ``every_token``: the batches hold each sequence's last token too,
        for whoever reads the activations (pruning's statistics), not only the scores."""
        if batch_size < 1:
            raise CpOnnxError(f"batch size must be at least 1, not {batch_size}")
        self.item_limit, self.every_token = item_limit, every_token
        self.items = list(items)
        self.continuations: list[Continuation] = []
        self.sequences: list[ScoredSequence] = []
        for k, item in enumerate(self.items):
            self._add_item(k, item, encode)
        for tokens in map(encode, general):
            tokens = tuple(tokens[:max_length])
            if len(tokens) > 1:
                self.continuations.append(Continuation(tokens[1:], None))
                self.sequences.append(ScoredSequence(tokens, 1, (len(self.continuations) - 1,)))
        self.batches = []
        for group in self._groups(share_prefixes):
            shared = _shared_length([self.sequences[s] for s in group]) if share_prefixes else 0
            order = sorted(group, key=lambda s: (len(self.sequences[s].tokens), s))
            self.batches += [self._batch(order[k : k + batch_size], shared) for k in range(0, len(order), batch_size)]

    def _groups(self, by_kind: bool) -> list[list[int]]:
        """Sequence indices batched together: one group, or one per item kind and shots (general texts last)."""
        if not by_kind:
            return [list(range(len(self.sequences)))]
        groups: dict[tuple[str, str] | None, list[int]] = {}
        for s, seq in enumerate(self.sequences):
            item = self.continuations[seq.continuations[0]].item
            groups.setdefault(None if item is None else (self.items[item].kind, self.items[item].shots), []).append(s)
        return [groups[key] for key in sorted(groups, key=lambda key: (key is None, key or ("", "")))]

    def _add_item(self, k: int, item: ProbeItem, encode: Encode) -> None:
        """The item's continuations, the answer first, each on the first sequence that can host it or on its own."""
        if item.options and item.answer not in item.options:
            raise CpOnnxError(f"probe item {item.id!r} has options {list(item.options)} without its answer {item.answer!r}; add the answer to the options")
        prompt = tuple(encode(item.shots + item.prompt))
        if not prompt:
            raise CpOnnxError(f"probe item {item.id!r}: the prompt tokenizes to nothing, so its first answer token has no logits; give a prompt")
        choices = list(enumerate(item.options)) if item.options else [(None, item.answer)]
        choices.sort(key=lambda choice: choice[1] != item.answer)  # stable: the answer, then the options in order
        hosts: list[tuple[tuple[int, ...], list[int]]] = []  # (tokens, continuations) of this item's sequences
        for option, text in choices:
            tokens = _continuation(item, prompt, text, encode)
            if self.item_limit is not None and len(prompt) + len(tokens) > self.item_limit:
                raise CpOnnxError(f"probe item {item.id[:60]!r} is {len(prompt) + len(tokens)} tokens with its shots, prompt and "
                                  f"{'answer' if option is None else 'option ' + repr(text[:20])}, more than {self.item_limit} "
                                  "(--max-item-length); shorten it, or raise the limit")
            self.continuations.append(Continuation(tokens, k, option))
            host = next((h for h in hosts if h[0][len(prompt) : len(prompt) + len(tokens) - 1] == tokens[:-1]), None)
            if host is None:
                host = (prompt + tokens, [])
                hosts.append(host)
            host[1].append(len(self.continuations) - 1)
        self.sequences += [ScoredSequence(tokens, len(prompt), tuple(members)) for tokens, members in hosts]

    def _batch(self, members: list[int], shared: int) -> TokenBatch:
        ids, mask = pad_batch([self.sequences[s].tokens[shared : self._needed(s)] for s in members])
        positions, targets, owners = [], [], []
        for row, s in enumerate(members):
            seq = self.sequences[s]
            for c in seq.continuations:
                tokens = self.continuations[c].tokens
                positions.append(row * ids.shape[1] + seq.start - 1 - shared + np.arange(len(tokens)))
                targets.append(np.asarray(tokens))
                owners.append(np.full(len(tokens), c))
        prefix = self.sequences[members[0]].tokens[:shared]
        return TokenBatch(ids, mask, *(np.concatenate(a).astype(np.int64) for a in (positions, targets, owners)), prefix=prefix)

    def _needed(self, s: int) -> int:
        """How many of sequence ``s``'s tokens run: up to the last one whose logits predict a target (the logits of a
        sequence's last token predict nothing scored, and causal attention lets no earlier position see it)."""
        seq = self.sequences[s]
        if self.every_token:
            return len(seq.tokens)
        return max(seq.start - 1 + len(self.continuations[c].tokens) for c in seq.continuations)

    @property
    def identity(self) -> str:
        """sha256 of the sequences run, the continuations scored and the item kinds: equal plans give equal metrics."""
        payload = json.dumps([SCORING_VERSION, [(s.tokens, s.start, s.continuations) for s in self.sequences],
                              [(c.tokens, c.item, c.option) for c in self.continuations],
                              [(i.kind, i.answer, i.options) for i in self.items]])
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def tokens(self) -> int:
        """Tokens run through the model per config (padding not counted)."""
        return sum(map(self._needed, range(len(self.sequences))))

    @property
    def tokens_run(self) -> int:
        """Tokens an evaluator with a KV cache runs per config: each shared prefix once, then the rest of every sequence."""
        return sum(map(len, {batch.prefix for batch in self.batches})) + sum(int(batch.attention_mask.sum()) for batch in self.batches)

    def metrics(self, results: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Metrics from ``token_scores`` of every batch, in batch order: overall, ``general_nll`` and ``by_kind``."""
        logprob, all_hit = self.continuation_scores(results)
        rows = self.item_rows(logprob, all_hit)
        general = [c for c, cont in enumerate(self.continuations) if cont.item is None]
        scored = sum(len(self.continuations[c].tokens) for c in general)
        result = {**_summary(rows), "general_nll": float(-logprob[general].sum() / scored) if general else None}
        kinds = dict.fromkeys(item.kind for item in self.items)
        result["by_kind"] = {kind: _summary([r for r, item in zip(rows, self.items) if item.kind == kind]) for kind in kinds}
        return result

    def continuation_scores(self, results: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Per continuation: the summed log-prob of its tokens, and whether each was the argmax."""
        logprob = np.zeros(len(self.continuations))
        all_hit = np.ones(len(self.continuations), dtype=bool)
        for batch, (token_logprob, hit) in zip(self.batches, results, strict=True):
            np.add.at(logprob, batch.owners, token_logprob)
            np.logical_and.at(all_hit, batch.owners, hit)
        return logprob, all_hit

    def item_rows(self, logprob: np.ndarray, all_hit: np.ndarray) -> list[dict]:
        """Per item: the answer's log-prob, greedy hit and (with options) whether it beats every other option."""
        of_item: dict[int, dict[int | None, int]] = {}
        for c, cont in enumerate(self.continuations):
            if cont.item is not None:
                of_item.setdefault(cont.item, {})[cont.option] = c
        rows = []
        for k, item in enumerate(self.items):
            found = of_item[k]
            answer = found[item.options.index(item.answer) if item.options else None]
            choice = None
            if item.options:
                totals = [logprob[found[o]] for o in range(len(item.options))]
                choice = float(int(np.argmax(totals)) == item.options.index(item.answer))
            rows.append({"answer_logprob": float(logprob[answer]), "greedy_accuracy": float(all_hit[answer]), "choice_accuracy": choice})
        return rows


def _continuation(item: ProbeItem, prompt: tuple[int, ...], text: str, encode: Encode) -> tuple[int, ...]:
    """The tokens ``text`` adds after the prompt in the tokenization of prompt + text."""
    joint = tuple(encode(item.shots + item.prompt + text))
    if joint[: len(prompt)] != prompt or len(joint) == len(prompt):
        raise CpOnnxError(
            f"probe item {item.id!r}: the prompt's tokens are not followed by tokens of {text!r} in the tokenization of prompt + {text!r}; "
            "end the prompt exactly where the answer starts and start the answer with a space"
        )
    return joint[len(prompt) :]


def _shared_length(sequences: list[ScoredSequence]) -> int:
    """How many leading tokens all ``sequences`` share, short of the first scored token's predictor."""
    first = sequences[0].tokens
    limit = min(min(len(s.tokens) for s in sequences), min(s.start for s in sequences) - 1)
    return next((k for k in range(limit) if any(s.tokens[k] != first[k] for s in sequences)), max(limit, 0))


def _summary(rows: list[dict]) -> dict:
    """Means of the per-item metrics (choice accuracy over the items with options; None without any)."""
    summary = {}
    for metric in METRICS:
        values = [r[metric] for r in rows if r[metric] is not None]
        summary[metric] = float(np.mean(values)) if values else None
    summary["items"] = len(rows)
    return summary


def token_scores(logits: np.ndarray, targets: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability of each target under its logits row [n, vocab], and whether it is the row's argmax.

    The exponentials are float32 (each at most 1, relative error 1e-7) and their sums float64: within 1e-7 of
    an all-float64 log-softmax, at a sixth of its time on a 150k vocabulary (no float64 copy of the logits).
    ``workers``: threads the rows are split across (numpy releases the GIL in its loops; the results are the same row
    by row). The evaluator passes its onnxruntime threads, idle meanwhile: one core took 3 s of the 1.5B shapes' analysis."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets)
    workers = min(workers, len(targets) // 32)
    if workers < 2:
        return _token_scores(logits, targets)
    cuts = np.linspace(0, len(targets), workers + 1).astype(int)
    parts = list(_pool().map(lambda k: _token_scores(logits[cuts[k] : cuts[k + 1]], targets[cuts[k] : cuts[k + 1]]), range(workers)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _token_scores(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(targets))
    best = logits.argmax(axis=1)
    top = logits[rows, best]  # the row's maximum, read at its argmax (one pass over the logits fewer)
    shifted = np.subtract(logits, top[:, None])
    np.exp(shifted, out=shifted)
    log_norm = top.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))
    return logits[rows, targets].astype(np.float64) - log_norm, best == targets


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="cp-onnx-scores")  # at most ``workers`` used at once


def score_model(runner: Runner, plan: ProbePlan, *, logits: str | None = None) -> dict:
    """Metrics of a whole model (its full logits output), e.g. the base or a routed model."""
    if any(batch.prefix for batch in plan.batches):
        raise CpOnnxError("score_model runs whole sequences; build the ProbePlan without share_prefixes")
    name = logits or runner.output_names[0]
    results = []
    for batch in plan.batches:
        full = runner.run(batch.input_ids, batch.attention_mask, [name])[name]
        rows = full.reshape(-1, full.shape[-1])[batch.positions]
        results.append(token_scores(rows, batch.targets))
    return plan.metrics(results)
