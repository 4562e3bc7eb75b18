"""The default prediction (method ``duplication_loss``): duplicate candidate blocks, measure how much better the
model then predicts the answers of the calibration texts, and name a block only where the gain is clear, for
each prompting regime.

No labels: the texts are scored as a language model reads them.
- few-shot (the texts as written): the log-probability gained on the tokens that hold digits, because that
  is where a reasoning text states what was computed; the other tokens are ordinary language, which
  duplicating any block makes worse (on SmolLM2 that average ranks seed 0's best block 35th of 81; the
  digit tokens rank it first: benchmarks/results/predictions_*.md). Each text runs up to its last number.
- zero-shot: the texts that state an ``answer``, each asked alone ("Question: ...\\nAnswer:") and scored
  on its answer's tokens (nats per question).
A block's gain depends on the regime (on SmolLM2's probe suite [2, 5) gains +0.82 nats per item zero-shot
and loses few-shot), so each regime gets its own decision, bound and reason.

Both regimes share one evaluator (the base model's layer outputs are kept; a block reruns only what
follows its departure from the base model) and race their blocks over their units (cp_onnx/analysis/racing.py):
zero-shot questions in looks of 8, 16, 24, 32, 48, 64 and all, dropping blocks clearly worse than the leader;
few-shot has too few texts to race (one look: the middle block size first, then its leaders' neighbours).
``screen=False`` is the exhaustive computation: every block on every unit.
A block is predicted to help only when a lower bound on its gain is above zero and at least MIN_TEXTS units
hold scored tokens; otherwise the method abstains and still ranks the least harmful blocks. The bound holds
for every block raced at once (max-t bootstrap over the units, widened for blocks dropped during the race):
the decision picks the best of dozens of noisy gains, and a bound made for one block alone would let that
choice's luck pass for an effect. Beside it, the change in greedy accuracy (what the model itself answers)
with its own bound, and the gain per kind of calibration text (cp_onnx/analysis/kinds.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from cp_onnx.analysis import bootstrap, racing
from cp_onnx.analysis.bootstrap import RESAMPLES
from cp_onnx.analysis.kinds import KindGain, kind_gains
from cp_onnx.analysis.scores import Block
from cp_onnx.calibration import YOUR_TEXTS
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.evaluators import BASELINE, Batches, ReuseEvaluator, candidate_blocks
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import pad_batch
from cp_onnx.models.scoring import PROMPT, ProbeItem, ProbePlan, TokenBatch, pack_batch
from cp_onnx.regimes import FEW_SHOT, REGIMES, ZERO_SHOT
from graph_passes.edit import Edit

METHOD = "duplication_loss"
CONFIDENCE = 0.95  # one-sided, simultaneous: every raced block's bound holds at once in 95% of resamples
# A percentile bootstrap over a handful of texts understates the spread (few distinct resamples): with
# 5 texts (4 holding numbers) SmolLM2's top block looked certain (+0.12 lower bound) and did not help.
MIN_TEXTS = 8  # units (texts holding numbers, questions) below which the method abstains whatever the bound says
KIND_BOUNDS = ("two-sided, holding for every block still racing at the end and every kind at once; "
               "a kind with fewer than min_texts units holding scored tokens is unclear and has none")
# The greedy change needs answers that change: with fewer changed units than this the bound would rest on a
# handful of resampled values, and the report says it cannot bound the change instead.
MIN_CHANGED = 5


@dataclass(frozen=True)
class Measure:
    """How the prediction measures a prompting regime on calibration texts, and what its figures mean to a reader."""

    prompting: str
    metric: str
    per: str  # the unit the gain is averaged over
    units: str  # what the bootstrap resamples


MEASURES = {
    ZERO_SHOT: Measure("zero-shot (each calibration question asked alone: 'Question: ...' then 'Answer:')",
                       "answer log-probability (the stated answer)", "question", "questions"),
    FEW_SHOT: Measure("few-shot (calibration texts as written: worked problems in running prose)",
                      "answer log-probability (digit tokens)", "digit token", "texts"),
}
# The race per regime. Zero-shot: a look every 8 questions, then every 16; after each the blocks still racing are
# capped (12, 8, 5, then 3), so the work is bounded where nothing separates them. Measured against the exhaustive
# computation on three models (benchmarks/results/race_agreement.md): the same decisions and top blocks.
# Few-shot: ten texts are too few to race; one look is the screen used before the race.
SCHEDULES = {
    ZERO_SHOT: racing.Schedule(looks=(8, 16, 24, 32, 48, 64, None), caps=(12, 8, 5, 3), alpha=0.001, early=True),
    FEW_SHOT: racing.Schedule(looks=(None,)),
}
EXHAUSTIVE = racing.Schedule(looks=(None,))


class NoNumbersError(CpOnnxError):
    """The reasoning texts hold no digit token to score (analyze skips the few-shot regime when the other was asked for)."""


@dataclass(frozen=True)
class Greedy:
    """How often the model itself continues with the right answer: the base share, and the change with a block duplicated.

    Zero-shot a question counts when every answer token is the argmax after the right ones before it (the sweep's greedy
    exact match); few-shot each digit token counts. The change's bounds are a 95% paired bootstrap over the units; None
    when fewer than MIN_CHANGED units changed (the calibration set cannot bound it)."""

    base: float
    change: float
    lower: float | None
    upper: float | None
    changed: int  # units whose count of hits differs with the block

    def as_dict(self) -> dict:
        return {"base": self.base, "change": self.change, "lower": self.lower, "upper": self.upper, "changed_units": self.changed,
                "bounded": self.lower is not None, "confidence": CONFIDENCE}


@dataclass(frozen=True)
class Prediction:
    """One regime's ranked blocks (score: gain per ``Measure.per``, nats) and the decision on the top one."""

    blocks: list[Block]
    decision: str  # "help" or "abstain"
    texts: dict[str, int]  # units scored per set
    reason: str = ""
    candidate_blocks: int = 0  # blocks of the requested sizes; ``blocks`` holds those raced
    layer_tokens: int = 0  # the work it ran: tokens (padding included) times layers, for benchmarks
    by_kind: dict[tuple[int, int], dict[str, KindGain]] = field(default_factory=dict)  # block -> kind of unit -> its gain there
    regime: str = FEW_SHOT
    greedy: Greedy | None = None  # for the block shown first (the named block, or the least harmful)
    race: dict = field(default_factory=dict)  # how the race went: units used, looks, blocks raced and still racing, early stop
    exhaustive_layer_tokens: int = 0  # the work of every block on every unit, for comparison

    @property
    def chosen_block(self) -> Block | None:
        """The block the decision names: the best-ranked one whose bound is above zero (None when abstaining)."""
        if self.decision != "help":
            return None
        return next(b for b in self.blocks if (b.metrics["gain_lower_bound"] or 0) > 0)

    @property
    def shown(self) -> Block:
        """The block every output shows first: the named one, else the best-ranked (the least harmful)."""
        return self.chosen_block or self.blocks[0]

    @property
    def greedy_base(self) -> float | None:
        return None if self.greedy is None else self.greedy.base

    def as_dict(self, least_harmful: int = 3) -> dict:
        top = self.shown
        measure = MEASURES[self.regime]
        shown = [top, *(b for b in self.blocks if b is not top)][:least_harmful]
        return {
            "method": METHOD,
            "regime": self.regime,
            "decision": self.decision,
            "reason": self.reason,
            "block": {"start": top.start, "end": top.end} if self.decision == "help" else None,
            "predicted_gain": top.score,
            "gain_lower_bound": top.metrics["gain_lower_bound"],
            "confidence": self.race.get("confidence", CONFIDENCE),
            # The named block first (readers take the decision's cost from it), then the best-ranked others.
            "candidates": [b.as_dict() for b in shown],
            "greedy": None if self.greedy is None else self.greedy.as_dict(),
            "greedy_base": self.greedy_base,
            "texts": dict(self.texts),
            "blocks_scored": len(self.blocks),
            "candidate_blocks": self.candidate_blocks,
            "prompting": measure.prompting,
            "metric": measure.metric,
            "gain_per": measure.per,
            "units": f"nats per {measure.per} of the reasoning calibration texts; positive = the duplicated model predicts them better",
            "race": dict(self.race),
            "work": {"layer_tokens": self.layer_tokens, "exhaustive_layer_tokens": self.exhaustive_layer_tokens},
            "kinds": {"confidence": CONFIDENCE, "bounds": KIND_BOUNDS, "min_texts": MIN_TEXTS,
                      "blocks": [{"start": b.start, "end": b.end, "by_kind": {kind: g.as_dict() for kind, g in self.by_kind[b.start, b.end].items()}}
                                 for b in shown if (b.start, b.end) in self.by_kind]},
        }


@dataclass
class Units:
    """One regime's calibration units as token batches (``owners``: the unit of each scored token)."""

    regime: str
    batches: list[TokenBatch]
    counts: np.ndarray  # scored tokens per unit
    kinds: list[str]
    order: np.ndarray  # the units in race order
    texts: dict[str, int]


def predict(model: ModelFolder, reasoning: Sequence[str], general: Sequence[str], *, regimes: Sequence[str] = REGIMES,
            questions: Sequence[tuple[str, str, str]] = (), kinds: Sequence[str] | None = None, block_sizes: Sequence[int] = (3, 4, 5),
            max_length: int = 128, threads: int | None = None, progress: Callable[[int, int], None] | None = None,
            screen: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Prediction]:
    """Per regime of ``regimes``, the blocks of ``block_sizes`` ranked by the log-probability they add to the answers, and
    the decision.

    Few-shot scores the digit tokens of ``reasoning`` (``kinds``: each text's kind of task, all YOUR_TEXTS when
    None); zero-shot asks each of ``questions`` (question, answer, kind) alone. The cost side (all tokens of the
    reasoning texts, the general texts) is measured for each regime's first block; the others' cost metrics are None.
    ``screen=False`` runs every block on every unit (the exhaustive computation the race is measured against).
    ``progress(percent, 100)``: the share of the planned work done (``planned_work``).
    Few-shot is left out, with a note to ``log``, when the texts hold no numbers and zero-shot was asked for too."""
    if not reasoning:
        raise CpOnnxError("no reasoning calibration texts to score blocks on; give at least one")
    unknown = [r for r in regimes if r not in MEASURES]
    if unknown or not regimes:
        raise CpOnnxError(f"unknown prompting regime {unknown[0] if unknown else regimes!r}; use {' or '.join(MEASURES)}")
    kinds = [YOUR_TEXTS] * len(reasoning) if kinds is None else list(kinds)
    if len(kinds) != len(reasoning):
        raise CpOnnxError(f"{len(kinds)} kinds for {len(reasoning)} reasoning texts; give one kind per text")
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731
    texts = [*reasoning, *general]
    cost_plan = ProbePlan([], encode, texts, max_length=max_length)
    if len(cost_plan.continuations) != len(texts):
        raise CpOnnxError("a calibration text tokenizes to a single token, which leaves nothing to predict; give longer texts")

    def plan(regime: str, packed: bool = True) -> Units:
        return (_question_units(questions, encode, packed=packed) if regime == ZERO_SHOT else
                _digit_units(model, reasoning, kinds, encode, max_length, packed=packed))

    units: dict[str, Units] = {}
    for regime in (r for r in REGIMES if r in regimes):
        try:
            units[regime] = plan(regime)
        except NoNumbersError as exc:
            if len(regimes) == 1:
                raise
            (log or print)(f"note: the few-shot prediction is skipped: {exc}")
    batches = [batch for u in units.values() for batch in u.batches]
    evaluator = ReuseEvaluator(model.onnx_path, Batches([*batches, *cost_plan.batches]), threads)
    if not evaluator.packs:  # a graph that cannot mask packed rows (fused attention): padded rows, split where padding grows
        units = {regime: plan(regime, packed=False) for regime in units}
        batches = [batch for u in units.values() for batch in u.batches]
        evaluator.replan(Batches([*batches, *cost_plan.batches]))
    candidates = candidate_blocks(evaluator.num_layers, tuple(block_sizes))
    sizes = sorted({end - start for start, end in candidates})  # the sizes that fit the model: the screen's middle one has blocks
    first = [b for b in candidates if b[1] - b[0] == sizes[len(sizes) // 2]] if screen and len(sizes) > 1 else candidates
    schedules = {regime: SCHEDULES[regime] if screen else EXHAUSTIVE for regime in units}
    cost_tokens = sum(int(batch.input_ids.size) for batch in cost_plan.batches)
    planned = {**{regime: planned_work(u, evaluator.num_layers, candidates, first, schedules[regime]) for regime, u in units.items()},
               "cost": cost_tokens * (evaluator.num_layers + len(units) * _mean_layers(evaluator.num_layers, candidates))}
    progress = _Progress(progress, evaluator, planned)
    found, at, spans = {}, 0, {}
    for regime, regime_units in units.items():
        began = evaluator.layer_tokens
        span = spans[regime] = range(at, at + len(regime_units.batches))
        at += len(regime_units.batches)
        found[regime] = _predict_regime(evaluator, regime_units, list(span), candidates, first, schedules[regime], progress)
        found[regime].layer_tokens_run = evaluator.layer_tokens - began
        progress.finished(regime, found[regime].layer_tokens_run)
    cost_part = list(range(len(batches), len(batches) + len(cost_plan.batches)))
    costs = _costs(evaluator, cost_plan, cost_part, list(dict.fromkeys(r.shown for r in found.values())), len(reasoning))
    progress.done()
    return {regime: raced.prediction(regime, len(reasoning), len(general), len(candidates), costs,
                                      _exhaustive_work([evaluator.batches[b] for b in spans[regime]], evaluator.num_layers, candidates))
            for regime, raced in found.items()}


class _Progress:
    """The share of the planned work (layer-tokens, ``planned_work``) done so far, in percent.

    Counting blocks misled: the race runs most of its blocks in its first look, on its cheapest questions, and its
    later looks run few blocks on many questions, so an ETA from blocks done was 20x too long early on. The plan
    assumes every cap binds (no early stop); a regime that finishes replaces its planned work with what it ran."""

    def __init__(self, report: Callable[[int, int], None] | None, evaluator: ReuseEvaluator, planned: dict[str, float]):
        self.report, self.evaluator, self.planned = report, evaluator, dict(planned)
        self.began, self.shown = evaluator.layer_tokens, -1
        if report:
            report(0, 100)

    def update(self) -> None:
        if self.report:
            done = self.evaluator.layer_tokens - self.began
            percent = min(99, int(100 * done / max(sum(self.planned.values()), 1)))
            if percent > self.shown:
                self.shown = percent
                self.report(percent, 100)

    def finished(self, part: str, work: int) -> None:
        """``part`` (a regime) ran ``work`` layer-tokens: its plan is replaced by what it ran."""
        self.planned[part] = work
        self.update()

    def done(self) -> None:
        if self.report:
            self.report(100, 100)


def _mean_layers(num_layers: int, blocks: Sequence[tuple[int, int]]) -> float:
    """Layers a duplicated block reruns, on average over ``blocks`` (from its start to the last layer)."""
    return float(np.mean([num_layers - start for start, _ in blocks]))


def planned_work(units: Units, num_layers: int, candidates: Sequence[tuple[int, int]], first: Sequence[tuple[int, int]],
                 schedule: racing.Schedule) -> float:
    """Layer-tokens a regime's race runs at most, for progress: the base model on every unit, and per look the blocks
    still racing (``first`` and the neighbours its leaders bring, then each look's cap) on the units the look adds."""
    tokens = _unit_tokens(units.batches, len(units.counts))[units.order]
    first_set = set(first)
    brought = np.mean([sum(1 for c in candidates if c not in first_set and racing.near(c, b)) for b in first])
    racing_now = min(len(candidates), len(first) + racing.SCREEN_TOP * brought)
    work, seen = tokens.sum() * num_layers, 0
    for look, count in enumerate(schedule.looks):
        upto = len(tokens) if count is None else min(count, len(tokens))
        work += racing_now * tokens[seen:upto].sum() * _mean_layers(num_layers, candidates)
        seen = upto
        cap = schedule.cap(look)
        racing_now = min(racing_now, cap) if cap else racing_now
        if seen == len(tokens):
            break
    return float(work)


@dataclass
class _Raced:
    """One regime's race, scored: what ``Prediction`` is made from once the shared cost side is measured."""

    units: Units
    result: racing.RaceResult
    base_hits: np.ndarray
    hits: dict
    ranked: list[tuple[int, int]]
    lower: dict
    critical: float
    confidence: float
    decision: str
    reason: str
    per_kind: dict
    layer_tokens_run: int = 0

    def prediction(self, regime: str, reasoning: int, general: int, candidates: int, costs: dict, exhaustive: int) -> Prediction:
        result, units = self.result, self.units
        seen = result.seen
        weights = units.counts[seen]
        blocks = []
        for block in self.ranked:
            scored = ~np.isnan(result.gains[block][seen])
            gain = float(np.nansum(result.gains[block][seen]) / max(weights[scored].sum(), 1e-12))
            metrics = {"gain_lower_bound": self.lower.get(block), "units": int(scored.sum()),
                       "greedy_change": self._greedy_change(block), **costs.get(block, _NO_COST)}
            blocks.append(Block(*block, gain, metrics))
        greedy = _greedy(self.hits.get(self.shown), self.base_hits, units.counts, seen)
        race = {"units_used": int(len(seen)), "units": int(len(units.counts)), "looks": result.history, "blocks_raced": len(result.gains),
                "blocks_racing_at_end": len(result.alive), "early_stop": result.stop, "confidence": self.confidence, "critical_value": self.critical}
        texts = {"reasoning": reasoning, "general": general, **units.texts}
        return Prediction(blocks, self.decision, texts, self.reason, candidates, self.layer_tokens_run, self.per_kind, regime, greedy, race, exhaustive)

    @property
    def shown(self) -> tuple[int, int]:
        """The named block (the best-ranked whose bound is above zero), else the best-ranked: its cost and greedy change are measured."""
        named = next((b for b in self.ranked if (self.lower.get(b) or 0) > 0), None) if self.decision == "help" else None
        return named or self.ranked[0]

    def _greedy_change(self, block) -> float | None:
        hits = self.hits.get(block)
        if hits is None:
            return None
        seen = self.result.seen
        held = ~np.isnan(hits[seen])
        return float((hits[seen][held] - self.base_hits[seen][held]).sum() / max(self.units.counts[seen][held].sum(), 1e-12))


def _predict_regime(evaluator: ReuseEvaluator, units: Units, span: list[int], candidates, first, schedule: racing.Schedule, progress: _Progress) -> _Raced:
    """Race one regime's units, then its bound, decision and per-kind gains."""
    batch_of = np.full(len(units.counts), -1, dtype=np.int64)  # -1: a unit without scored tokens (a text without numbers)
    for k, batch in enumerate(units.batches):
        batch_of[np.unique(batch.owners)] = k
    zero_shot = units.regime == ZERO_SHOT
    base_logprob = np.full(len(units.counts), np.nan)
    base_hits = np.full(len(units.counts), np.nan)
    hits: dict = {}

    def run(configs: list[Edit], unit_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per config, per unit of ``unit_ids``: summed log-prob of its scored tokens and its hits (zero-shot: 1 when all
        tokens hit). The configs are scored together (ReuseEvaluator.paths_scores)."""
        size = len(units.counts)
        chosen = sorted(set(batch_of[unit_ids].tolist()) - {-1})
        if not chosen:
            return [(np.zeros(len(unit_ids)), np.zeros(len(unit_ids))) for _ in configs]
        owners = np.concatenate([units.batches[k].owners for k in chosen])
        found = []
        paths = [config.path(evaluator.num_layers) for config in configs]
        for config, scored in zip(configs, evaluator.paths_scores(paths, [span[k] for k in chosen])):
            logprob, argmax = (np.concatenate(part) for part in zip(*scored))
            if not np.isfinite(logprob).all():
                raise CpOnnxError(f"the model's log-probabilities are not finite with the edit {config}; check the exported model")
            summed, hit = np.bincount(owners, weights=logprob, minlength=size), np.bincount(owners, weights=argmax, minlength=size)
            if zero_shot:
                hit = (hit == np.bincount(owners, minlength=size)).astype(np.float64)
            found.append((summed[unit_ids], hit[unit_ids]))
        return found

    def score(blocks: list, unit_ids: np.ndarray) -> list[np.ndarray]:
        missing = unit_ids[np.isnan(base_logprob[unit_ids])]
        if len(missing):
            [(base_logprob[missing], base_hits[missing])] = run([BASELINE], missing)
        gains = []
        for block, (logprob, hit) in zip(blocks, run([Edit.duplicate(*block) for block in blocks], unit_ids)):
            hits.setdefault(block, np.full(len(units.counts), np.nan))
            hits[block][unit_ids] = hit
            gains.append(logprob - base_logprob[unit_ids])
        progress.update()
        return gains

    def clear(alive, seen, gains) -> str | None:
        point, lower, upper, _ = bounds(np.stack([gains[b][seen] for b in alive], axis=1), units.counts[seen],
                                             len(gains), racing.EARLY_CONFIDENCE)
        leader = int(np.argmax(point))
        if lower[leader] > 0 and all(racing.near(b, alive[leader]) for b in alive):
            return "help"
        return "abstain" if (upper < 0).all() else None

    result = racing.race(candidates, first, units.order, units.counts, score, schedule, clear)
    seen, alive = result.seen, result.alive
    counts = units.counts[seen]
    confidence = racing.EARLY_CONFIDENCE if result.stop else CONFIDENCE
    gains = np.stack([result.gains[b][seen] for b in alive], axis=1)  # [units, blocks still racing]
    dropped = len(result.gains) - len(alive)
    point, lower, _, critical = bounds(gains, counts, len(result.gains) if dropped else None, confidence)
    order = sorted(range(len(alive)), key=lambda k: (-point[k], alive[k]))
    ranked = [alive[k] for k in order]
    dropped_blocks = sorted((b for b in result.gains if b not in alive), key=lambda b: (-np.nanmean(result.gains[b][seen]), b))
    with_numbers = int((counts > 0).sum())
    measure = MEASURES[units.regime]
    jointly = f"jointly for the {len(result.gains)} blocks raced" + (f" ({dropped} dropped on the way as clearly worse)" if dropped else "")
    if with_numbers < MIN_TEXTS:
        what = "questions state answers" if zero_shot else "texts hold numbers"
        more = 'give more texts with an "answer"' if zero_shot else "-n"
        decision, reason = "abstain", f"only {with_numbers} calibration {what}; at least {MIN_TEXTS} are needed to decide ({more})"
    elif (lower > 0).any():
        start, end = next(b for k, b in zip(order, ranked) if lower[k] > 0)
        decision, reason = "help", (f"[{start}, {end})'s gain is above zero in {confidence:.0%} of {RESAMPLES} resamples of the "
                                    f"{len(seen)} {measure.units}, {jointly}")
    else:
        decision, reason = "abstain", (f"no block's gain is above zero in {confidence:.0%} of {RESAMPLES} resamples of the "
                                       f"{len(seen)} {measure.units}, {jointly}")
    if result.stop:
        reason += f"; decided after {len(seen)} of {len(units.counts)} {measure.units}, the race's early stop"
    seen_kinds = [units.kinds[u] for u in seen]
    floor = _bonferroni(CONFIDENCE, 2 * len(result.gains) * len(set(seen_kinds)), with_numbers) if dropped else 0.0  # two-sided, every kind
    per_kind = dict(zip(alive, kind_gains(gains, counts, seen_kinds, confidence=CONFIDENCE, min_texts=MIN_TEXTS, floor=floor)))
    lower_by_block = {alive[k]: float(lower[k]) for k in range(len(alive))}
    return _Raced(units, result, base_hits, hits, ranked + dropped_blocks, lower_by_block, critical, confidence, decision, reason, per_kind)


def bounds(gains: np.ndarray, counts: np.ndarray, raced: int | None, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per block (a column of ``gains`` [units, blocks]): its gain per scored token, and lower and upper bounds that hold
    for all blocks at once with ``confidence``; and the critical value.

    Max-t bootstrap, studentised: units are resampled with replacement (resamples whose units hold no scored token
    are left out); in each, every block's deviation from its estimate is divided by that resample's own standard
    error, and the ``confidence`` quantile of the largest over blocks is the critical value c: bound = gain -+ c *
    standard error. Studentising matters with ten texts: dividing by one fixed spread instead passed pure noise
    as "help" in 36% of simulated runs of 40 blocks (tests/test_predict.py), this in about 5%.
    After a race (``raced``: blocks raced, of which only the columns of ``gains`` reached the end) the blocks left
    were chosen on the same units, so c is at least the one-block t quantile at 1 - (1 - confidence) / raced
    (Bonferroni over every block raced): without it, noise passed for "help" in 22 of 40 simulated null races."""
    weights = bootstrap.resample_weights(counts)
    rate = bootstrap.per_token(gains, counts)
    point, error = bootstrap.weighted_mean(rate, counts[None, :])
    t = bootstrap.studentised(*bootstrap.weighted_mean(rate, weights * counts), point)
    critical_low = max(0.0, float(np.quantile(t.max(axis=1), confidence)))
    critical_high = max(0.0, float(np.quantile((-t).max(axis=1), confidence)))
    if raced:
        guard = _bonferroni(confidence, raced, int((counts > 0).sum()))
        critical_low, critical_high = max(critical_low, guard), max(critical_high, guard)
    return point[0], point[0] - critical_low * error[0], point[0] + critical_high * error[0], critical_low


def _bonferroni(confidence: float, comparisons: int, units: int) -> float:
    """The one-comparison t quantile that holds for ``comparisons`` at once (Bonferroni), over ``units`` units."""
    return float(stats.t.ppf(1 - (1 - confidence) / comparisons, max(units - 1, 1)))


def _greedy(block_hits: np.ndarray | None, base_hits: np.ndarray, counts: np.ndarray, seen: np.ndarray) -> Greedy | None:
    """The greedy share without and with a block, and a paired bootstrap bound on the change (None with too few changes)."""
    if block_hits is None:
        return None
    held = seen[~np.isnan(block_hits[seen]) & (counts[seen] > 0)]
    if not len(held):
        return None
    total = counts[held].sum()
    base, change = base_hits[held], block_hits[held] - base_hits[held]
    changed = int((change != 0).sum())
    lower = upper = None
    if changed >= MIN_CHANGED:
        draws = bootstrap.resample_weights(counts[held])
        resampled = (draws @ change) / (draws @ counts[held])
        lower, upper = (float(v) for v in np.quantile(resampled, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]))
    return Greedy(float(base.sum() / total), float(change.sum() / total), lower, upper, changed)


# The best-ranked block of each regime (the one a decision names, or the least harmful) gets its cost side measured:
# all tokens of the reasoning texts and the general texts, run from the block on. Each costs about 4 blocks of the
# ranking (on Qwen2.5-1.5B shapes, 17 s of 181 for two more), and the decision reports one cost.
COST_BLOCKS = 1
_NO_COST = {"text_nll_change": None, "general_nll_change": None}


def _digit_units(model: ModelFolder, reasoning: Sequence[str], kinds: list[str], encode, max_length: int, *, packed: bool = True) -> Units:
    """Few-shot: each text cut after its last digit token, scored at its digit tokens (one unit per text)."""
    token_lists = [encode(text)[:max_length] for text in reasoning]
    digits = [numeric_tokens(model, np.asarray(tokens)) for tokens in token_lists]
    if not any(d[1:].any() for d in digits):
        raise NoNumbersError("the reasoning calibration texts hold no numbers, and this method scores the numbers a text states or derives; "
                             "give texts with numbers, or choose one of the paper's methods with --method (stability, anomaly, composite, boundary)")
    sequences = []
    for k, (tokens, d) in enumerate(zip(token_lists, digits)):
        at = np.flatnonzero(d)
        at = at[at > 0]
        if len(at):
            sequences.append((k, tokens[: int(at[-1]) + 1], at))
    batches = unit_batches(sequences, [range(len(reasoning))], packed=packed)
    counts = np.zeros(len(reasoning))
    for k, _, at in sequences:
        counts[k] = len(at)
    texts = {"with_numbers": int((counts > 0).sum()), "digit_tokens": int(counts.sum())}
    return Units(FEW_SHOT, batches, counts, kinds, np.arange(len(reasoning)), texts)


def _question_units(questions: Sequence[tuple[str, str, str]], encode, *, packed: bool = True) -> Units:
    """Zero-shot: each question asked alone and scored on its answer's tokens (one unit per question), batched per look."""
    if not questions:
        raise CpOnnxError('the zero-shot prediction needs calibration questions that state an "answer"; give a .jsonl file with them, '
                          'or choose --regime few')
    items = [ProbeItem(f"q{k}", kind, PROMPT.format(question=question), " " + answer) for k, (question, answer, kind) in enumerate(questions)]
    plan = ProbePlan(items, encode)  # no options: sequence k is question k, scored on its answer
    sequences = [(k, list(seq.tokens), np.arange(seq.start, len(seq.tokens))) for k, seq in enumerate(plan.sequences)]
    kinds = [kind for _, _, kind in questions]
    order = racing.interleave(kinds, [len(seq.tokens) for seq in plan.sequences])
    bounds = [0, *(min(n, len(order)) for n in SCHEDULES[ZERO_SHOT].looks if n is not None), len(order)]
    looks = [order[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    counts = np.ones(len(items))  # one unit of weight per question, whatever its answer's length: nats per question
    return Units(ZERO_SHOT, unit_batches(sequences, looks, packed=packed), counts, kinds, order, {"questions": len(items), "with_numbers": len(items)})


def unit_batches(sequences: list[tuple[int, list[int], np.ndarray]], looks: Sequence[Sequence[int]], *, packed: bool = True) -> list[TokenBatch]:
    """Token batches of (unit, tokens, scored positions), never mixing two looks (a race runs a look's batches only),
    at most PACK_TOKENS real tokens a batch, shortest first. ``packed``: the sequences packed into rows of about
    PACK_WIDTH tokens (scoring.pack_batch: every block reruns these tokens, and padding every row to the longest
    question cost 9% of the zero-shot work); else one sequence a row, a new batch where the next would pad the batch
    past PAD_SLACK times its real tokens. Owners = the unit. A sequence runs up to its last scored token's predictor:
    the last token's logits predict nothing scored (3% of the work)."""
    run = {unit: list(tokens[: int(at.max())]) for unit, tokens, at in sequences}  # the tokens each unit runs
    scored = {unit: (at, np.asarray(tokens)[at]) for unit, tokens, at in sequences}  # scored token indices, their tokens
    groups: list[list[int]] = []
    for look in looks:
        group, real = [], 0
        for unit in sorted((u for u in look if u in run), key=lambda u: (len(run[u]), u)):
            length = len(run[unit])
            full = real + length > PACK_TOKENS or (not packed and (len(group) + 1) * length > PAD_SLACK * (real + length))
            if group and full:
                groups.append(group)
                group, real = [], 0
            group.append(unit)
            real += length
        if group:
            groups.append(group)
    batches = []
    for group in groups:
        if packed:
            ids, mask, position_ids, offsets = pack_batch([run[u] for u in group], PACK_WIDTH)
        else:
            (ids, mask), position_ids = pad_batch([run[u] for u in group]), None
            offsets = np.arange(len(group)) * ids.shape[1]
        positions = [offset + scored[u][0] - 1 for offset, u in zip(offsets, group)]
        targets = [scored[u][1] for u in group]
        owners = [np.full(len(scored[u][0]), u) for u in group]
        batches.append(TokenBatch(ids, mask, *(np.concatenate(a).astype(np.int64) for a in (positions, targets, owners)), position_ids=position_ids))
    return batches


# Rows of packed sequences: a wider row wastes attention on other sequences' tokens (masked, still computed), a narrower
# one leaves more of its end empty. Three duplicated blocks on the 83 questions of Qwen2.5-1.5B shapes (2 AVX2 cores):
# padded batches 128-133 s; rows of 128 tokens 119-121 s, 256 114 s; SmolLM2: 11.8-12.4, 11.4-11.8, 11.5-11.6, 512 12.1-12.3.
PACK_WIDTH = 256
PACK_TOKENS = 1024
PAD_SLACK = 1.15  # unpacked: padded tokens per real token a batch may reach (SmolLM2's 8 digit texts: 223 padded for 198, not 256)


def _unit_tokens(batches: Sequence[TokenBatch], units: int) -> np.ndarray:
    """Per unit, its share of the tokens (padding included) of the batch that runs it."""
    tokens = np.zeros(units)
    for batch in batches:
        owners = np.unique(batch.owners)
        tokens[owners] = batch.input_ids.size / len(owners)
    return tokens


def _exhaustive_work(batches: Sequence[TokenBatch], num_layers: int, candidates: Sequence[tuple[int, int]]) -> int:
    """Layer-tokens of every candidate block (and the base model) on every unit of ``batches`` (as the evaluator runs
    them): what the race is measured against."""
    tokens = sum(int(batch.input_ids.size) for batch in batches)
    return tokens * (num_layers + sum(num_layers - start for start, _ in candidates))


def _costs(evaluator: ReuseEvaluator, plan: ProbePlan, part: list[int], blocks: list[tuple[int, int]], reasoning: int) -> dict:
    """Per block, the change of the mean NLL over all tokens of the reasoning texts and of the general texts."""
    tokens = np.array([len(c.tokens) for c in plan.continuations], dtype=np.float64)

    def logprob(scored) -> np.ndarray:
        return plan.continuation_scores(scored)[0]

    base = logprob(evaluator.token_scores(BASELINE, part))
    found = {}
    together = evaluator.paths_scores([Edit.duplicate(*block).path(evaluator.num_layers) for block in blocks], part)
    for block, scored in zip(blocks, together):
        gain = logprob(scored) - base
        general = -gain[reasoning:].sum() / tokens[reasoning:].sum() if len(tokens) > reasoning else None
        found[block] = {"text_nll_change": float(-gain[:reasoning].sum() / tokens[:reasoning].sum()),
                        "general_nll_change": None if general is None else float(general)}
    return found


def numeric_tokens(model: ModelFolder, ids: np.ndarray) -> np.ndarray:
    """Which token ids hold a digit (as the tokenizer spells them: "Ġ42", "▁7", "3")."""
    spell = model.tokenizer.id_to_token
    return np.array([any(ch.isdigit() for ch in (spell(int(i)) or "")) for i in ids], dtype=bool)
