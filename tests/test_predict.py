"""The default prediction: per-block gains against torch with the layers repeated, the race against the exhaustive
computation, the bounds (worked by hand, and simulated on noise), the greedy figures, and the decision rule."""
from __future__ import annotations

import numpy as np
import pytest

from cp_onnx.analysis import predict as predict_module
from cp_onnx.analysis import racing
from cp_onnx.analysis.predict import bounds, predict
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.evaluators import candidate_blocks
from support import GENERAL, torch_token_logprob

REASONING = ["If 3x + 5 = 20, then x = 5.", "All cats purr. Tom is a cat, so Tom purrs.", "2, 4, 6, 8: the next is 10."]
DIGITS = set("0123456789")
QUESTIONS = [("If 3x + 5 = 20, what is x?", "5", "multi_step"), ("Does a gecko have feathers?", "No", "syllogism"),
             ("What comes after 2, 4, 6, 8?", "10", "sequence")]
FEW, ZERO = ("few_shot",), ("zero_shot",)

def duplicated(block) -> list[int]:
    return [*range(block.end), *range(block.start, 3)]


def test_few_shot_gains_match_torch_with_the_block_run_twice(tiny_llama):
    hf, model = tiny_llama
    result = predict(model, REASONING, GENERAL, regimes=FEW, block_sizes=(1, 2))["few_shot"]
    encoded = {text: model.encode([text])[0][0] for text in REASONING + GENERAL}
    decode = model.tokenizer.id_to_token

    def gain(texts, path, digits_only=False):
        """Log-prob gained per scored token, each text run alone through torch; the byte tokenizer spells digits as themselves."""
        total = count = 0.0
        for text in texts:
            ids = encoded[text]
            chosen = [p for p in range(1, len(ids)) if not digits_only or decode(ids[p]) in DIGITS]
            total += sum(torch_token_logprob(hf, ids, path, p) - torch_token_logprob(hf, ids, None, p) for p in chosen)
            count += len(chosen)
        return total / count

    assert result.texts == {"reasoning": 3, "general": 2, "with_numbers": 2, "digit_tokens": sum(ch.isdigit() for ch in "".join(REASONING))}
    assert len(result.blocks) == 5  # [0,1) [1,2) [2,3) [0,2) [1,3) on three layers
    for block in result.blocks:
        assert block.score == pytest.approx(gain(REASONING, duplicated(block), digits_only=True), abs=1e-5)
        assert block.metrics["gain_lower_bound"] <= block.score + 1e-12
    shown = result.shown  # the cost side is measured for the block shown first only
    assert shown.metrics["text_nll_change"] == pytest.approx(-gain(REASONING, duplicated(shown)), abs=1e-5)
    assert shown.metrics["general_nll_change"] == pytest.approx(-gain(GENERAL, duplicated(shown)), abs=1e-5)
    assert all(b.metrics["general_nll_change"] is None for b in result.blocks if b is not shown)
    assert [b.score for b in result.blocks] == sorted((b.score for b in result.blocks), reverse=True)
    assert result.decision == "abstain" and "only 2 calibration texts hold numbers" in result.reason  # fewer than MIN_TEXTS
    as_dict = result.as_dict()
    assert as_dict["decision"] == result.decision and len(as_dict["candidates"]) == 3 and as_dict["regime"] == "few_shot"
    assert (as_dict["block"] is None) == (result.decision == "abstain")


def test_zero_shot_gains_are_the_answers_log_probability_asked_alone_under_torch(tiny_llama, monkeypatch):
    """Each question asked as "Question: ...\\nAnswer:" and scored on its answer's tokens, one unit per question."""
    hf, model = tiny_llama
    result = predict(model, REASONING, GENERAL, regimes=ZERO, questions=QUESTIONS, block_sizes=(1, 2))["zero_shot"]
    assert result.regime == "zero_shot" and result.texts["questions"] == 3
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731

    def gain(path):
        total = 0.0
        for question, answer, _ in QUESTIONS:
            prompt = encode(f"Question: {question}\nAnswer:")
            ids = encode(f"Question: {question}\nAnswer: {answer}")
            assert ids[: len(prompt)] == prompt  # the answer's tokens follow the prompt's
            total += sum(torch_token_logprob(hf, ids, path, p) - torch_token_logprob(hf, ids, None, p) for p in range(len(prompt), len(ids)))
        return total / len(QUESTIONS)

    for block in result.blocks:
        assert block.score == pytest.approx(gain(duplicated(block)), abs=1e-5)
    kinds = result.by_kind[result.blocks[0].start, result.blocks[0].end]
    assert set(kinds) == {"multi_step", "syllogism", "sequence"}  # the questions' kinds, not the texts'
    shown = result.as_dict()
    assert shown["regime"] == "zero_shot" and shown["gain_per"] == "question" and "zero-shot" in shown["prompting"]
    assert "only 3 calibration questions state answers" in result.reason
    monkeypatch.setattr(predict_module, "MIN_TEXTS", 2)
    assert "resamples of the 3 questions" in predict(model, REASONING, GENERAL, regimes=ZERO, questions=QUESTIONS, block_sizes=(1,))["zero_shot"].reason


def test_both_regimes_come_from_one_call_and_equal_each_regime_alone(tiny_llama):
    model = tiny_llama[1]
    both = predict(model, REASONING, GENERAL, questions=QUESTIONS, block_sizes=(1, 2))
    assert list(both) == ["zero_shot", "few_shot"]  # REGIMES order
    for regime in both:
        alone = predict(model, REASONING, GENERAL, regimes=(regime,), questions=QUESTIONS, block_sizes=(1, 2))[regime]
        assert [(b.start, b.end, b.score) for b in both[regime].blocks] == [(b.start, b.end, b.score) for b in alone.blocks]
        assert both[regime].decision == alone.decision


def test_decision_follows_the_bound_once_enough_texts_hold_numbers(tiny_llama, monkeypatch):
    monkeypatch.setattr(predict_module, "MIN_TEXTS", 2)
    result = predict(tiny_llama[1], REASONING, GENERAL, regimes=FEW, block_sizes=(1, 2))["few_shot"]
    assert result.decision == ("help" if any(b.metrics["gain_lower_bound"] > 0 for b in result.blocks) else "abstain")
    chosen = result.as_dict()["block"]
    assert "above zero in 95% of 2000 resamples" in result.reason and "blocks raced" in result.reason
    if result.decision == "help":  # the best-ranked block whose joint bound is above zero
        named = next(b for b in result.blocks if b.metrics["gain_lower_bound"] > 0)
        assert chosen == {"start": named.start, "end": named.end} and result.reason.startswith(f"[{named.start}, {named.end})")
    else:
        assert chosen is None and all(b.metrics["gain_lower_bound"] <= 0 for b in result.blocks)


def test_texts_without_numbers_are_refused_alone_and_skipped_beside_zero_shot(tiny_llama):
    no_numbers = ["All cats purr. Tom is a cat, so Tom purrs."]
    with pytest.raises(CpOnnxError, match="hold no numbers"):
        predict(tiny_llama[1], no_numbers, GENERAL, regimes=FEW)
    notes = []
    both = predict(tiny_llama[1], no_numbers, GENERAL, questions=QUESTIONS, block_sizes=(1,), log=notes.append)
    assert list(both) == ["zero_shot"] and "few-shot prediction is skipped" in notes[0]


def test_no_reasoning_texts_no_questions_and_unknown_regimes_are_refused(tiny_llama):
    with pytest.raises(CpOnnxError, match="no reasoning calibration texts"):
        predict(tiny_llama[1], [], GENERAL)
    with pytest.raises(CpOnnxError, match="needs calibration questions"):
        predict(tiny_llama[1], REASONING, GENERAL, regimes=ZERO)
    with pytest.raises(CpOnnxError, match="unknown prompting regime"):
        predict(tiny_llama[1], REASONING, GENERAL, regimes=("one_shot",))


def test_screening_scores_the_middle_size_then_the_neighbours_of_its_leaders(tiny_llama, monkeypatch):
    full = predict(tiny_llama[1], REASONING, GENERAL, regimes=FEW, block_sizes=(1, 2, 3), screen=False)["few_shot"]
    everything = {(b.start, b.end): b.score for b in full.blocks}
    assert len(everything) == full.candidate_blocks == 6
    monkeypatch.setattr(racing, "SCREEN_TOP", 1)
    screened = predict(tiny_llama[1], REASONING, GENERAL, regimes=FEW, block_sizes=(1, 2, 3))["few_shot"]
    leader = max([(0, 2), (1, 3)], key=lambda b: (everything[b], -b[0]))
    expected = {b for b in everything if b[1] - b[0] == 2 or (abs(b[0] - leader[0]) <= 1 and abs(b[1] - leader[1]) <= 1)}
    assert {(b.start, b.end) for b in screened.blocks} == expected and screened.candidate_blocks == 6
    for block in screened.blocks:  # a block's score does not depend on which others were scored
        assert block.score == pytest.approx(everything[(block.start, block.end)], abs=1e-9)
    assert screened.as_dict()["blocks_scored"] == len(expected)


def test_the_race_gives_each_block_what_the_exhaustive_computation_gives_on_the_same_questions(tiny_llama, monkeypatch):
    """A raced block's gains are the exhaustive ones on the units it ran; the blocks still racing ran every unit; the work
    is less. Twenty questions and looks of 4, 8, 12 and all, so that the race drops blocks on this tiny model."""
    model = tiny_llama[1]
    questions = [(f"What is {a} plus {b}?", str(a + b), ("arithmetic", "sequence")[k % 2]) for k, (a, b) in enumerate(zip(range(1, 21), range(3, 23)))]
    monkeypatch.setitem(predict_module.SCHEDULES, "zero_shot", racing.Schedule(looks=(4, 8, 12, None), caps=(4, 3, 2), alpha=0.2))
    raced = predict(model, REASONING, GENERAL, regimes=ZERO, questions=questions, block_sizes=(1, 2))["zero_shot"]
    reports = []
    full = predict(model, REASONING, GENERAL, regimes=ZERO, questions=questions, block_sizes=(1, 2), screen=False,
                   progress=lambda done, total: reports.append((done, total)))["zero_shot"]
    exhaustive = {(b.start, b.end): b for b in full.blocks}
    # Progress is the share of the planned work, rising to 100; the plan of the exhaustive computation is its work.
    assert reports[0] == (0, 100) and reports[-1] == (100, 100) and [d for d, _ in reports] == sorted(d for d, _ in reports)
    layers = tiny_llama[0].config.num_hidden_layers
    blocks = candidate_blocks(layers, (1, 2))
    units = predict_module._question_units(questions, lambda text: model.encode([text])[0][0])
    assert predict_module.planned_work(units, layers, blocks, blocks, predict_module.EXHAUSTIVE) == full.layer_tokens
    race = raced.as_dict()["race"]
    assert race["blocks_racing_at_end"] < race["blocks_raced"] <= len(exhaustive)  # something was dropped
    assert raced.layer_tokens < full.layer_tokens and full.layer_tokens == full.exhaustive_layer_tokens
    racing_at_end = raced.blocks[: race["blocks_racing_at_end"]]  # ranked first, then the blocks dropped on the way
    for block in racing_at_end:  # scored on every question used: the exhaustive figure
        assert block.metrics["units"] == race["units_used"] == 20 and block.metrics["gain_lower_bound"] is not None
        assert block.score == pytest.approx(exhaustive[block.start, block.end].score, abs=1e-9)
    for block in raced.blocks[len(racing_at_end):]:  # dropped: fewer questions, no bound
        assert block.metrics["units"] < 20 and block.metrics["gain_lower_bound"] is None


def test_bounds_worked_by_hand():
    # One unit: every resample is that unit, so the bound is its gain per token.
    assert bounds(np.array([[3.0, -1.0]]), np.array([6.0]), None, 0.95)[1] == pytest.approx([0.5, -1 / 6])
    # Two units of equal length gaining +1 and -1 per token: the estimate is 0, and every resample deviates
    # from it by 0 in units of its own standard error, so the bound is the estimate: not above zero.
    assert bounds(np.array([[4.0], [-4.0]]), np.array([4.0, 4.0]), None, 0.95)[1] == pytest.approx([0.0])
    # Every unit gains: every resample gains at least the smallest per-token gain.
    assert bounds(np.array([[2.0], [5.0], [3.0]]), np.array([4.0, 5.0, 3.0]), None, 0.95)[1][0] >= 0.5
    # A unit without scored tokens (no digits) adds nothing; resamples of only such units are left out.
    assert bounds(np.array([[3.0], [0.0]]), np.array([3.0, 0.0]), None, 0.95)[1] == pytest.approx([1.0])
    # After a race of 40 blocks, the critical value is at least the one-block t quantile at 1 - 0.05 / 40 (Bonferroni).
    gains = np.random.default_rng(1).normal(0.3, 1.0, size=(30, 2))
    *_, critical = bounds(gains, np.ones(30), 40, 0.95)
    from scipy import stats

    assert critical >= stats.t.ppf(1 - 0.05 / 40, 29) - 1e-12


def test_joint_bound_is_below_every_single_block_bound():
    # The joint critical value is the quantile of the largest standardised overshoot, at least each block's own.
    gains = np.random.default_rng(3).normal(0.0, 1.0, size=(10, 12)) * 5
    tokens = np.full(10, 5.0)
    joint = bounds(gains, tokens, None, 0.95)[1]
    alone = np.array([bounds(gains[:, [b]], tokens, None, 0.95)[1][0] for b in range(gains.shape[1])])
    assert (joint <= alone + 1e-12).all() and (joint < alone).any()


def test_pure_noise_rarely_passes_for_help_when_picking_the_best_of_many():
    # 40 blocks whose per-text gains are noise around zero (no block helps), 10 texts, 200 simulated runs:
    # naming the best-looking block when its own bound is above zero does so in most runs; the joint bound
    # keeps that to about the stated 5%.
    rng = np.random.default_rng(0)
    tokens = np.full(10, 4.0)
    runs = [rng.normal(0.0, 1.0, size=(10, 40)) * tokens[:, None] for _ in range(200)]
    joint = np.mean([(bounds(g, tokens, None, 0.95)[1] > 0).any() for g in runs])
    alone = np.mean([(bounds(g[:, [int(np.argmax(g.sum(0)))]], tokens, None, 0.95)[1] > 0)[0] for g in runs])
    assert joint <= 0.08 and alone >= 0.5
    # Blocks that share most of their per-text gain (as neighbouring blocks do) are held to the same rate.
    shared = [(rng.normal(0, 1, size=(10, 1)) + 0.3 * rng.normal(0, 1, size=(10, 40))) * tokens[:, None] for _ in range(200)]
    assert np.mean([(bounds(g, tokens, None, 0.95)[1] > 0).any() for g in shared]) <= 0.08
    # A block that does help (one standard deviation per text) still passes in a fair share of runs.
    helped = [g + np.eye(40)[5] * tokens[:, None] for g in runs]
    assert np.mean([(bounds(g, tokens, None, 0.95)[1] > 0).any() for g in helped]) >= 0.2


def _simulated_race(rng, helps: float | None, schedule: racing.Schedule, guard: bool) -> bool:
    """One race of the 81 blocks of sizes 3-5 on 30 layers over 83 simulated questions: question difficulty shared by
    all blocks, heavy-tailed noise; most blocks harmful and one of the middle size (where the screen starts: the race
    finds others through their neighbours, which real models make alike) gaining ``helps``, or (None) every block
    worth nothing. Whether it says "help"."""
    blocks = [(s, s + k) for k in (3, 4, 5) for s in range(31 - k)]
    truth = np.zeros(len(blocks)) if helps is None else -np.abs(rng.normal(0.0, 1.0, len(blocks)))
    if helps is not None:
        start = int(rng.integers(27))
        truth[blocks.index((start, start + 4))] = helps
    shared = rng.standard_t(3, size=83) * 0.7
    gains = {b: truth[k] + 0.5 * shared + 0.8 * rng.standard_t(3, size=83) for k, b in enumerate(blocks)}
    result = racing.race(blocks, [b for b in blocks if b[1] - b[0] == 4], np.arange(83), np.ones(83),
                         lambda group, units: [gains[b][units] for b in group], schedule)
    matrix = np.stack([result.gains[b][result.seen] for b in result.alive], axis=1)
    _, lower, _, _ = bounds(matrix, np.ones(len(result.seen)), len(result.gains) if guard else None, 0.95)
    return bool((lower > 0).any())


def test_a_race_holds_the_bound_on_noise_only_with_the_blocks_it_dropped_counted():
    """The blocks still racing were picked on the same questions; a bound over them alone passed noise for "help" in
    most simulated races; counting every block raced (the Bonferroni floor) keeps it near the stated 5%, and a real gain
    of one nat per question is still found."""
    schedule = predict_module.SCHEDULES["zero_shot"]
    rng = np.random.default_rng(7)
    for worth in (None, 0.0):  # every block worth nothing; most harmful and the best worth nothing
        assert np.mean([_simulated_race(rng, worth, schedule, guard=True) for _ in range(40)]) <= 0.075
    assert np.mean([_simulated_race(rng, None, schedule, guard=False) for _ in range(40)]) >= 0.2
    assert np.mean([_simulated_race(rng, 1.0, schedule, guard=True) for _ in range(20)]) >= 0.8


def test_greedy_figures_count_what_the_model_itself_continues_with(tiny_llama, monkeypatch):
    """greedy.base and each block's greedy_change: the share of digit tokens (few-shot), or of questions whose every
    answer token is a hit (zero-shot). A random tiny model's argmax is almost never the text's token, which would leave
    every figure 0; so a hit is redefined here as a log-probability above LEVEL, read from the ONNX scores by predict and,
    independently, from torch by this test."""
    from cp_onnx.models.evaluators import ReuseEvaluator

    hf, model = tiny_llama
    level = -5.7  # near the median token's log-prob under this model (ln 256 = 5.55): some tokens and answers hit, some not
    head = ReuseEvaluator._head  # every scored token passes through here, whichever way its path was run

    def thresholded(self, *args, **kwargs):
        logprob, _ = head(self, *args, **kwargs)
        return logprob, logprob > level

    monkeypatch.setattr(ReuseEvaluator, "_head", thresholded)
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731
    decode = model.tokenizer.id_to_token

    def hit(ids, path, p):
        return torch_token_logprob(hf, ids, path, p) > level

    def few_shot(path):  # hits per digit token, all texts
        hits = [hit(encode(t), path, p) for t in REASONING for p in range(1, len(encode(t))) if decode(encode(t)[p]) in DIGITS]
        return np.mean(hits)

    def zero_shot(path):  # questions whose answer tokens are all hits
        def answered(question, answer):
            prompt, ids = encode(f"Question: {question}\nAnswer:"), encode(f"Question: {question}\nAnswer: {answer}")
            return all(hit(ids, path, p) for p in range(len(prompt), len(ids)))
        return np.mean([answered(q, a) for q, a, _ in QUESTIONS])

    found = predict(model, REASONING, GENERAL, questions=QUESTIONS, block_sizes=(1, 2))
    for regime, expected in (("few_shot", few_shot), ("zero_shot", zero_shot)):
        result = found[regime]
        base = expected(None)
        assert result.greedy.base == pytest.approx(base) and result.as_dict()["greedy"]["base"] == result.greedy.base
        changes = [block.metrics["greedy_change"] for block in result.blocks]
        assert changes == pytest.approx([expected(duplicated(b)) - base for b in result.blocks])
        assert result.greedy.change == pytest.approx(result.shown.metrics["greedy_change"])
        assert 0 < base < 1 and any(changes), regime  # the check above compared figures that vary


def test_greedy_change_is_bounded_by_a_paired_bootstrap_or_said_unbounded():
    counts, seen = np.ones(40), np.arange(40)
    base = np.zeros(40)
    block = np.zeros(40)
    block[:12] = 1  # 12 of 40 answers turn right, none turns wrong
    found = predict_module._greedy(block, base, counts, seen)
    assert found.change == pytest.approx(0.3) and found.changed == 12
    assert 0 < found.lower < 0.3 < found.upper <= 0.5  # resampled shares of 40 answers around 12/40
    few = np.zeros(40)
    few[:3] = 1  # three changed answers cannot bound the change
    unbounded = predict_module._greedy(few, base, counts, seen)
    assert unbounded.lower is None and unbounded.upper is None and unbounded.as_dict()["bounded"] is False
