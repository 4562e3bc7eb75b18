"""Which layers a model can lose: pruning predictions from calibration texts alone.

One ReuseEvaluator (the sweep's) runs the calibration texts through the base model once, layer by
layer, and keeps every layer's output. The published statistics read those outputs; the loss methods
run any removal exactly, from the layer where its path departs from the base model's, so a removal
of late layers costs only those layers and the head. For each n = 1..max_layers each method names the
n layers it would remove (its *choice*) and, where it has one, a ranking of the contiguous blocks of n:

- ``block_influence`` (ShortGPT, Men et al. 2024): BI_i = 1 - mean over all tokens of cos(x_i, x_{i+1}),
  the layer's input and output; the n layers with the lowest BI. Blocks are ranked by their summed BI
  (ShortGPT ranks layers only; the block ranking is there to compare it with the sweep).
- ``angular_distance`` (Gromov et al. 2024): d(l, n) = arccos(cos(x_l, x_{l+n})) / pi between the
  streams entering layers l and l+n, at each text's last token as the paper computes it, averaged over
  texts; the block [l, l+n) with the smallest d.
- ``sleb`` (Song et al. 2024): remove layers one at a time, each time the one whose removal raises the
  mean next-token loss (NLL) of the general calibration texts least (SLEB calibrates on general text).
  Blocks are ranked by the same loss.
- ``removal_loss`` (the default): the same exact loss on the reasoning calibration texts, with the search
  chosen on held-out texts. Two searches can name n layers: the contiguous block of n with the least loss
  and SLEB's greedy set. The greedy set tries ~n x L removals against ~L blocks, so its least loss is the
  more optimistic of the two (a best of more noisy candidates). So the texts are split in two halves;
  each search picks its n layers on one half and is scored on the other, and the search whose picks lose
  less on the texts they did not see, summed over both halves, picks again on all texts. The texts matter
  more than the search: on SmolLM2 the general texts' loss (SLEB's) picks layer 9 as the cheapest single
  layer, which costs 0.43 nats per probe item, and the reasoning texts' loss picks layer 3, which costs
  nothing (+0.01); the held-out choice matters at 3-4 layers, where the greedy set's lower calibration loss
  cost 0.37-0.93 nats per probe item against 0.05-0.17 for the block (benchmarks/results/prune_smollm2.md).

Lower scores mean "cheaper to remove" for every method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cp_onnx.analysis.scores import Block
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.scoring import ProbePlan
from cp_onnx.models.evaluators import Batches, ReuseEvaluator
from cp_onnx.models.model import ModelFolder
from graph_passes.edit import Edit

DEFAULT = "removal_loss"
FOLDS = 2  # halves of the reasoning texts on which the default's two searches are held out against each other
OBJECTIVE = {"sleb": "general", DEFAULT: "reasoning"}  # whose calibration texts' loss each loss method minimises
METHODS = ("block_influence", "angular_distance", "sleb", DEFAULT)
PAPERS = {"block_influence": "ShortGPT (Men et al., 2024)", "angular_distance": "Gromov et al., 2024", "sleb": "SLEB (Song et al., 2024)",
          DEFAULT: "cp-onnx: exact loss of the removal on the reasoning texts, blocks and greedy sets"}


@dataclass(frozen=True)
class Removal:
    """The layers one method would remove (ascending), with the method's score for them (lower = cheaper)."""

    layers: tuple[int, ...]
    score: float
    nll: dict[str, float] | None = None  # the calibration loss of this removal per text set, where it was run

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "score": self.score, "nll": self.nll}


@dataclass
class LayerPruning:
    """Per method: its choice for each n, and its ranking of the contiguous blocks (cheapest first)."""

    num_layers: int
    choices: dict[str, dict[int, Removal]]
    blocks: dict[str, list[Block]]
    per_layer: dict[str, list[float]]  # block_influence per layer; the default's loss increase with each single layer removed
    base_nll: dict[str, float]
    texts: dict[str, int]
    token_layers: int = 0  # the work the loss methods ran: tokens (padding included) times layers
    timings: dict[str, float] = field(default_factory=dict)
    searches: dict[int, str] = field(default_factory=dict)  # per n, the default's search ("block" or "greedy") chosen on held-out texts

    def as_dict(self, top: int | None = 5) -> dict:
        return {
            "default": DEFAULT,
            "default_search": {str(n): search for n, search in sorted(self.searches.items())},
            "papers": PAPERS,
            "num_layers": self.num_layers,
            "texts": self.texts,
            "base_nll": self.base_nll,
            "per_layer": self.per_layer,
            "methods": {m: {"choices": [{"n": n, **r.as_dict()} for n, r in sorted(self.choices[m].items())],
                            "blocks": [b.as_dict() for b in _top_per_size(self.blocks[m], top)]} for m in self.choices},
            "units": "score: lower is cheaper to remove; nll: mean next-token loss (nats) of the calibration texts with the layers removed",
        }


class RemovalLoss:
    """The calibration texts' mean NLL per token with any set of layers removed, per text set, each run once (cached).

    Each set's texts are batched apart, so a search that minimises one set's loss runs only its texts. A set
    named in ``folds`` is also split into that many parts ("reasoning/0", "reasoning/1", texts dealt in
    turn), each a set of its own; the whole set's loss is their token-weighted mean."""

    def __init__(self, model: ModelFolder, texts: dict[str, Sequence[str]], *, max_length: int, threads: int | None,
                 folds: dict[str, int] | None = None):
        encode = lambda text: model.encode([text])[0][0]  # noqa: E731
        self.whole: dict[str, tuple[str, ...]] = {}  # a split set: its parts
        self.sets = [name for name, group in texts.items() if group]  # the text sets as given (a split set once, not its parts)
        groups = {}
        for name, group in texts.items():
            k = min((folds or {}).get(name, 1), len(group))
            if k > 1:
                self.whole[name] = tuple(f"{name}/{i}" for i in range(k))
                groups.update({part: group[i::k] for i, part in enumerate(self.whole[name])})
            elif group:
                groups[name] = group
        self.plans = {name: ProbePlan([], encode, group, max_length=max_length, every_token=True) for name, group in groups.items()}
        if any(len(plan.continuations) != len(groups[name]) for name, plan in self.plans.items()):
            raise CpOnnxError("a calibration text tokenizes to a single token, which leaves nothing to predict; give longer texts")
        batches, self.parts = [], {}
        for name, plan in self.plans.items():
            self.parts[name] = range(len(batches), len(batches) + len(plan.batches))
            batches += plan.batches
        self.tokens = {name: float(sum(len(c.tokens) for c in plan.continuations)) for name, plan in self.plans.items()}
        self.tokens.update({name: sum(self.tokens[p] for p in parts) for name, parts in self.whole.items()})
        self.evaluator = ReuseEvaluator(model.onnx_path, Batches(batches), threads)
        self.num_layers = self.evaluator.num_layers
        self._cache: dict[tuple[tuple[int, ...], str], float] = {}

    def __call__(self, removed: Sequence[int], group: str) -> float:
        """Mean NLL per token of one text set with ``removed`` gone."""
        if group in self.whole:
            return sum(self(removed, part) * self.tokens[part] for part in self.whole[group]) / self.tokens[group]
        key = (tuple(sorted(set(removed))), group)
        if key not in self._cache:
            path = [l for l in range(self.num_layers) if l not in key[0]]
            logprob = self.plans[group].continuation_scores(self.evaluator.path_scores(path, self.parts[group]))[0]
            if not np.isfinite(logprob).all():
                raise CpOnnxError(f"the model's log-probabilities are not finite with layers {list(key[0])} removed; check the exported model")
            self._cache[key] = float(-logprob.sum() / self.tokens[group])
        return self._cache[key]

    def known(self, removed: Sequence[int], group: str) -> bool:
        return all((tuple(sorted(set(removed))), part) in self._cache for part in self.whole.get(group, (group,)))

    def every_set(self, removed: Sequence[int]) -> dict[str, float]:
        """The loss of every text set, and of all their tokens together ("all")."""
        found = {group: self(removed, group) for group in self.sets}
        return {**found, "all": sum(found[g] * self.tokens[g] for g in found) / sum(self.tokens[g] for g in found)}

    def rebase(self, removed: Sequence[int]) -> None:
        """Keep the outputs of the model without ``removed``: a greedy step's candidates then resume from them."""
        path = [l for l in range(self.num_layers) if l not in set(removed)]
        if path != self.evaluator.base_path:
            self.evaluator.rebase(path)

    def streams(self):
        """Per batch: the residual stream entering every layer and leaving the last, [layers + 1, rows, seq, hidden], and the mask."""
        self.rebase(())
        ev = self.evaluator
        for b, batch in enumerate(ev.plan.batches):
            yield np.stack([ev.base_context(b)[ev.embed], *(ev.outputs.get(b, l) for l in range(self.num_layers))]), batch.attention_mask


def predict_layers(model: ModelFolder, reasoning: Sequence[str], general: Sequence[str], *, max_layers: int | None = None,
                   methods: Sequence[str] = METHODS, max_length: int = 128, threads: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> LayerPruning:
    """Each method's choice of 1..``max_layers`` layers (default a quarter of them) and block ranking, from the calibration texts.

    With only some ``methods`` (what `cp-onnx prune` asks for), the loss methods run the blocks of
    ``max_layers`` layers alone, not every size."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CpOnnxError(f"unknown layer pruning method {unknown[0] if unknown else None!r}; choose from {', '.join(METHODS)}")
    if not general:
        raise CpOnnxError("pruning predictions need general calibration texts (SLEB's loss is theirs); give at least one")
    began = time.perf_counter()
    loss = RemovalLoss(model, {"reasoning": reasoning, "general": general}, max_length=max_length, threads=threads,
                       folds={OBJECTIVE[DEFAULT]: FOLDS} if DEFAULT in methods else None)
    L = loss.num_layers
    max_layers = max(1, L // 4) if max_layers is None else max_layers
    if not 1 <= max_layers < L:
        raise CpOnnxError(f"can remove 1 to {L - 1} layers of this {L}-layer model, not {max_layers}")
    sizes = range(1, max_layers + 1)
    blocks = [(s, s + n) for n in sizes for s in range(L - n + 1)]
    run_sizes = sizes if set(methods) == set(METHODS) else [max_layers]
    losses = [m for m in ("sleb", DEFAULT) if m in methods]
    held_out = loss.whole.get(OBJECTIVE[DEFAULT], ()) if DEFAULT in methods else ()
    greedy_runs = len(losses) + len(held_out)  # SLEB's, the default's, and the default's on each part of its texts
    total = len(losses) * sum(L - n + 1 for n in run_sizes) + greedy_runs * sum(L - k for k in range(1, max_layers))  # blocks, greedy steps 2..
    done = 0

    def measured(removed, group: str) -> float:
        nonlocal done
        fresh = not loss.known(removed, group)
        value = loss(removed, group)
        if progress and fresh:
            done += 1
            progress(done, total)
        return value

    base = loss.every_set(())
    bi, angular = _statistics(loss)
    run = [b for b in blocks if b[1] - b[0] in run_sizes]
    cost = {m: {b: measured(range(*b), OBJECTIVE[m]) - base[OBJECTIVE[m]] for b in run} for m in losses}
    ranked = {"block_influence": _rank(blocks, lambda b: float(bi[b[0] : b[1]].sum())),
              "angular_distance": _rank(blocks, lambda b: float(angular[b[1] - b[0]][b[0]])),
              **{m: _rank(run, cost[m].__getitem__) for m in losses}}
    greedy = {m: _greedy(measured, loss.rebase, L, max_layers, OBJECTIVE[m]) for m in losses}
    greedy_on = {part: _greedy(measured, loss.rebase, L, max_layers, part) for part in held_out}
    if DEFAULT in greedy:
        greedy_on[OBJECTIVE[DEFAULT]] = greedy[DEFAULT]
    searches: dict[int, str] = {}
    choices: dict[str, dict[int, tuple[tuple[int, ...], float]]] = {m: {} for m in methods}
    for n in sizes:
        if "block_influence" in methods:
            lowest = tuple(sorted(np.argsort(bi, kind="stable")[:n].tolist()))
            choices["block_influence"][n] = (lowest, float(bi[list(lowest)].sum()))
        if "angular_distance" in methods:
            start = int(np.argmin(angular[n]))  # the first of equal distances
            choices["angular_distance"][n] = (tuple(range(start, start + n)), float(angular[n][start]))
        if "sleb" in methods:
            choices["sleb"][n] = (greedy["sleb"][n], measured(greedy["sleb"][n], "general") - base["general"])
        if DEFAULT in methods and n in run_sizes:
            objective = OBJECTIVE[DEFAULT]
            picks = {"block": lambda group: _best_block(measured, L, n, group), "greedy": lambda group: greedy_on[group][n]}
            search = _held_out_search(measured, picks, held_out) if held_out else "block"
            searches[n] = search
            pick = picks[search](objective)
            choices[DEFAULT][n] = (pick, measured(pick, objective) - base[objective])
    removals = {m: {n: Removal(layers, score, loss.every_set(layers)) for n, (layers, score) in found.items()} for m, found in choices.items()}
    if progress:
        progress(done, done)  # greedy steps reuse blocks already run, and every choice's loss is added: the estimate is rough
    per_layer = {"block_influence": bi.tolist()}
    if DEFAULT in cost and all((l, l + 1) in cost[DEFAULT] for l in range(L)):
        per_layer[DEFAULT] = [cost[DEFAULT][(l, l + 1)] for l in range(L)]
    texts = {"reasoning": len(reasoning), "general": len(general), "tokens": int(sum(loss.tokens[g] for g in loss.sets))}
    return LayerPruning(L, removals, {m: ranked[m] for m in methods}, per_layer, base, texts, loss.evaluator.layer_tokens,
                        {"pruning_layers_s": time.perf_counter() - began}, searches)


def _statistics(loss: RemovalLoss) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """ShortGPT's Block Influence per layer, and Gromov's angular distance d[n][l] at each text's last token."""
    L = loss.num_layers
    cos_sum, count = np.zeros(L), 0
    angle_sum, texts = np.zeros((L + 1, L + 1)), 0
    for streams, mask in loss.streams():
        x = streams.astype(np.float64)
        unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
        real = mask.astype(bool)
        cos_sum += np.einsum("lrsd,lrsd->lrs", unit[:-1], unit[1:])[:, real].sum(axis=1)
        count += int(real.sum())
        last = unit[:, np.arange(len(mask)), real.sum(axis=1) - 1]  # [L + 1, rows, hidden]: each text's last token
        angle_sum += (np.arccos(np.clip(np.einsum("ard,brd->abr", last, last), -1.0, 1.0)) / np.pi).sum(axis=2)
        texts += len(mask)
    angle = angle_sum / texts  # each text's distance, then the mean over texts
    return 1.0 - cos_sum / count, {n: np.array([angle[l, l + n] for l in range(L - n + 1)]) for n in range(1, L)}


def _greedy(measured: Callable[[Sequence[int], str], float], rebase: Callable[[Sequence[int]], None], num_layers: int, steps: int,
            group: str) -> dict[int, tuple[int, ...]]:
    """SLEB's search: remove the layer whose removal (beside those already gone) gives the lowest loss, ``steps`` times.
    Each step's candidates resume from the outputs of the model as the last step left it (``rebase``)."""
    removed: tuple[int, ...] = ()
    found = {}
    for n in range(1, steps + 1):
        rebase(removed)
        options = [tuple(sorted((*removed, l))) for l in range(num_layers) if l not in removed]
        removed = min(options, key=lambda layers: (measured(layers, group), layers))
        found[n] = removed
    return found


def _best_block(measured: Callable[[Sequence[int], str], float], num_layers: int, n: int, group: str) -> tuple[int, ...]:
    """The contiguous block of n layers whose removal gives ``group`` the least loss (ties: the earliest)."""
    return min((tuple(range(s, s + n)) for s in range(num_layers - n + 1)), key=lambda layers: (measured(layers, group), layers))


def _held_out_search(measured: Callable[[Sequence[int], str], float], picks: dict[str, Callable[[str], tuple[int, ...]]],
                     parts: Sequence[str]) -> str:
    """The search whose picks, each made on one part of the texts, lose least on the other parts (summed; ties: the first).

    A search that tries more candidates finds a lower loss on the texts it searched by chance alone; the
    texts it did not search show what its pick is worth."""
    def held_out(search: str) -> float:
        return sum(measured(picks[search](part), other) for part in parts for other in parts if other != part)

    return min(picks, key=held_out)


def _rank(blocks: list[tuple[int, int]], score: Callable[[tuple[int, int]], float]) -> list[Block]:
    """Blocks cheapest first (ties: smaller, then earlier)."""
    scored = [(score(b), b) for b in blocks]
    return [Block(b[0], b[1], s, {}) for s, b in sorted(scored, key=lambda sb: (sb[0], sb[1][1] - sb[1][0], sb[1][0]))]


def _top_per_size(blocks: list[Block], top: int) -> list[Block]:
    """The ``top`` cheapest blocks of each size, size by size."""
    sizes = sorted({b.end - b.start for b in blocks})
    return [b for n in sizes for b in [b for b in blocks if b.end - b.start == n][:top]]


def pruning_section(model: ModelFolder, reasoning: Sequence[str], general: Sequence[str], report: dict, *, max_length: int = 128,
                    threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """report.json's ``pruning``: every layer method's choices and block rankings and, when the report holds head
    influence (``analyze --heads``), the heads ranked by it."""
    from cp_onnx.analysis import head_pruning

    layers = predict_layers(model, reasoning, general, max_length=max_length, threads=threads, progress=progress)
    section = {"layers": layers.as_dict(top=None)}
    scores = head_scores(report)
    if scores:
        section["heads"] = head_pruning.heads_section(scores)
    return section


def head_scores(report: dict) -> dict[str, np.ndarray]:
    """Per head pruning method, [layers, heads] of the report's head influence column it ranks by; a method whose
    column some head lacks (ablated exactly only for the strongest heads: --exact-heads N) is left out, since its
    unmeasured heads would rank as the most expensive to remove, not where they belong."""
    from cp_onnx.analysis import head_pruning

    rows = (report.get("heads") or {}).get("heads")
    if not rows:
        return {}
    shape = (max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1)
    scores = {}
    for method, column in head_pruning.METHODS.items():
        if any(row.get(column) is None for row in rows):
            continue
        table = np.full(shape, np.nan)
        for row in rows:
            table[row["layer"], row["head"]] = row[column]
        scores[method] = table
    return scores


def choose_edit(model: ModelFolder, *, layers: int = 0, heads: int = 0, layer_method: str = DEFAULT, head_method: str | None = None,
                removed: Sequence[int] = (), calibration_source: str | None = None, n: int = 10, max_length: int = 128, threads: int | None = None,
                progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> Edit:
    """The removal of ``layers`` layers and ``heads`` heads that the named methods choose on the calibration texts, as one
    Edit (beside the layers already ``removed``, whose heads are not chosen)."""
    from cp_onnx import calibration
    from cp_onnx.analysis import head_pruning

    head_method = head_method or head_pruning.DEFAULT
    if layer_method not in METHODS or head_method not in head_pruning.METHODS:
        raise CpOnnxError(f"unknown pruning method; layers: {', '.join(METHODS)}; heads: {', '.join(head_pruning.METHODS)}")
    reasoning = calibration.load_calibration(calibration_source, n=n)
    general = calibration.load_calibration("general", n=n)
    removed = list(removed)
    if layers:
        found = predict_layers(model, reasoning, general, max_layers=layers, max_length=max_length, threads=threads,
                                     methods=(layer_method,), progress=progress)
        removed = list(found.choices[layer_method][layers].layers)
        log(f"{layer_method} removes layers {removed}")
    chosen: dict[int, list[int]] = {}
    if heads:
        scores = head_pruning.head_scores(model, reasoning, max_length=max_length, threads=threads, progress=progress)  # as removal_loss: the reasoning texts
        chosen = head_pruning.choose_heads(scores[head_method], heads, skip_layers=removed)
        log(f"{head_method} removes {heads} heads: " + ", ".join(f"layer {l}: {hs}" for l, hs in chosen.items()))
    kept = [layer for layer in range(model.num_layers) if layer not in set(removed)]
    if not kept:
        raise CpOnnxError(f"cannot remove layers {sorted(set(removed))} of this {model.num_layers}-layer model: keep at least one")
    edit = Edit.layers(kept) if removed else Edit()
    return edit.with_heads(chosen) if chosen else edit
