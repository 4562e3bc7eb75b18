"""A race of candidate blocks over calibration units: score every block on a few units, drop the ones clearly
worse than the leader, and give the units left only to the blocks still in contention.

The work of the default prediction is layer-tokens per block: each block reruns every unit's tokens from
the layer where it departs from the base model. Most blocks are far worse than the best (on SmolLM2,
[0, 4) loses 23 nats per question where [2, 5) gains 0.6), and a handful of questions show it; the
exhaustive computation still runs every block on all 83. The race runs units in looks (``looks``: the
number of units seen after each), and after each look:
- adds the neighbours (start and end within one layer) of the SCREEN_TOP leaders not yet scored, which
  catch up on the units seen so far (screening: the middle block size starts, as before the race);
- drops every block whose paired gap to the leader is below zero at 1 - ``alpha`` (one-sided t over the
  units seen; paired, because a question hard for one block is hard for all);
- keeps at most ``caps[look]`` blocks, the best by their gain so far, so that the work is bounded even
  where nothing separates (a model whose blocks all do the same);
- stops early when the decision is already clear at EARLY_CONFIDENCE: the leader's lower bound is above
  zero and every block still racing lies within one layer of it (the named block cannot move further),
  or no block's upper bound reaches zero.
The blocks still racing at the end have been scored on every unit used; the decision's bound is taken
over them, and widened for the blocks dropped on the way (``prediction.race_bounds``).
Measured against the exhaustive computation in benchmarks/results/race_agreement.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats

Block = tuple[int, int]
SCREEN_TOP = 3  # leaders whose neighbours join the race (the screen's, before the race: see predict.py)
EARLY_CONFIDENCE = 0.99  # an early stop needs more than the 95% of the decision made on every unit
MIN_EARLY_UNITS = 16  # no early stop before this many units: a studentised bound over fewer is unreliable


@dataclass(frozen=True)
class Schedule:
    """How a race runs: units seen after each look (None: all), blocks kept after each, the drop level."""

    looks: tuple[int | None, ...] = (None,)
    caps: tuple[int, ...] = ()
    alpha: float = 0.001
    early: bool = False

    def cap(self, look: int) -> int | None:
        return self.caps[min(look, len(self.caps) - 1)] if self.caps else None


@dataclass
class RaceResult:
    """Per block raced, its gain on each unit it was scored on (NaN elsewhere); the blocks still racing at the end."""

    gains: dict[Block, np.ndarray]
    alive: list[Block]
    units: int  # units seen (every alive block was scored on the first ``units`` in race order)
    order: np.ndarray  # the units in race order
    stop: str | None = None  # "help" or "abstain" when the race stopped early on a clear decision
    history: list[dict] = field(default_factory=list)  # per look: units seen, blocks racing, dropped

    @property
    def seen(self) -> np.ndarray:
        return self.order[: self.units]


def near(a: Block, b: Block) -> bool:
    """Start and end each within one layer."""
    return abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1


def race(candidates: Sequence[Block], first: Sequence[Block], order: np.ndarray, weights: np.ndarray,
         score: Callable[[list[Block], np.ndarray], list[np.ndarray]], schedule: Schedule,
         clear: Callable[[list[Block], np.ndarray, dict], str | None] | None = None) -> RaceResult:
    """Race ``first`` (then the leaders' neighbours among ``candidates``) over the units in ``order``.

    ``score(blocks, units)`` returns each block's gain on each of ``units`` (blocks scored together share their
    work: see ReuseEvaluator.paths_scores); ``weights`` [units] are the scored
    tokens per unit (a unit's gain is a sum over them). ``clear(alive, seen, gains)`` says whether the
    decision is already clear ("help", "abstain" or None), for an early stop."""
    total = len(order)
    gains: dict[Block, np.ndarray] = {}
    done: dict[Block, int] = {}  # units (in race order) each block has been scored on
    alive = list(dict.fromkeys(first))
    history, stop, seen = [], None, 0

    def catch_up(blocks: list[Block], upto: int) -> None:
        """Score ``blocks`` on the units up to ``upto`` they have not seen, those with the same units together."""
        behind: dict[int, list[Block]] = {}
        for block in blocks:
            gains.setdefault(block, np.full(len(weights), np.nan))
            behind.setdefault(done.get(block, 0), []).append(block)
        for since, group in behind.items():
            units = order[since:upto]
            if len(units):
                for block, gain in zip(group, score(group, units)):
                    gains[block][units] = gain
            done.update(dict.fromkeys(group, upto))

    for look, count in enumerate(schedule.looks):
        seen = total if count is None else min(count, total)
        catch_up(alive, seen)
        units = order[:seen]
        rate = lambda b: gains[b][units].sum() / max(weights[units].sum(), 1e-12)  # noqa: E731
        leaders = sorted(alive, key=lambda b: (-rate(b), b))[:SCREEN_TOP]
        joining = [block for block in candidates if block not in gains and any(near(block, leader) for leader in leaders)]
        catch_up(joining, seen)
        alive.extend(joining)
        if seen == total:
            history.append({"units": seen, "racing": len(alive), "dropped": 0})
            break
        leader = min(alive, key=lambda b: (-rate(b), b))
        kept = [b for b in alive if b == leader or not _clearly_worse(gains[b][units], gains[leader][units], weights[units], schedule.alpha)]
        kept.sort(key=lambda b: (-rate(b), b))
        kept = kept[: schedule.cap(look)] if schedule.cap(look) else kept
        history.append({"units": seen, "racing": len(alive), "dropped": len(alive) - len(kept)})
        alive = kept
        if schedule.early and clear is not None and (weights[units] > 0).sum() >= MIN_EARLY_UNITS:
            stop = clear(alive, units, gains)
            if stop:
                break
    return RaceResult(gains, alive, seen, np.asarray(order), stop, history)


def _clearly_worse(block: np.ndarray, leader: np.ndarray, weights: np.ndarray, alpha: float) -> bool:
    """Whether the block's gain per scored token is below the leader's at 1 - alpha (one-sided paired t over units)."""
    held = weights > 0
    if held.sum() < 3:
        return False
    gap = (block[held] - leader[held]) / weights[held].mean()
    spread = gap.std(ddof=1)
    if spread == 0:
        return gap.mean() < 0
    return gap.mean() + stats.t.ppf(1 - alpha, len(gap) - 1) * spread / np.sqrt(len(gap)) < 0


def interleave(kinds: Sequence[str], lengths: Sequence[int]) -> np.ndarray:
    """Units in race order: one of each kind in turn (so that every look sees every kind), shortest first within a kind
    (the first looks, which every block runs, cost the fewest tokens); ties by index."""
    by_kind: dict[str, list[int]] = {}
    for unit in sorted(range(len(kinds)), key=lambda u: (lengths[u], u)):
        by_kind.setdefault(kinds[unit], []).append(unit)
    queues = list(by_kind.values())
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return np.asarray(order, dtype=np.int64)
