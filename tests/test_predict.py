"""The default prediction: per-block loss changes against torch with the layers repeated, and the decision rule."""
from __future__ import annotations

import numpy as np
import pytest

from cp_onnx.analysis import predict as predict_module
from cp_onnx.analysis.predict import predict
from cp_onnx.errors import CpOnnxError
from test_sweep import tiny_llama  # noqa: F401  (the tiny llama with a BOS byte tokenizer, a module fixture)

REASONING = ["If 3x + 5 = 20, then x = 5.", "All cats purr. Tom is a cat, so Tom purrs.", "2, 4, 6, 8: the next is 10."]
DIGITS = set("0123456789")
GENERAL = ["The harbour was quiet in the early morning.", "Gulls circled over the nets."]


_TORCH_LOGPROBS: dict = {}


def torch_token_logprob(hf, tokens: list[int], path: list[int] | None, position: int) -> float:
    """Log-probability of tokens[position] under torch with ``path``'s layers run in order (memoised per sequence and path)."""
    import torch

    key = (tuple(tokens), None if path is None else tuple(path))
    if key not in _TORCH_LOGPROBS:
        model = hf.model
        layers, count = model.layers, hf.config.num_hidden_layers
        if path is not None:
            model.layers, hf.config.num_hidden_layers = torch.nn.ModuleList([layers[k] for k in path]), len(path)
        try:
            with torch.no_grad():
                logits = hf(torch.tensor([tokens]), use_cache=False).logits[0].double()
        finally:
            model.layers, hf.config.num_hidden_layers = layers, count
        _TORCH_LOGPROBS[key] = torch.log_softmax(logits, dim=-1)
    return _TORCH_LOGPROBS[key][position - 1, tokens[position]].item()


def test_block_gains_match_torch_with_the_block_run_twice(tiny_llama):
    hf, model = tiny_llama
    result = predict(model, REASONING, GENERAL, block_sizes=(1, 2))
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
    for rank, block in enumerate(result.blocks):
        path = [*range(block.end), *range(block.start, 3)]
        assert block.score == pytest.approx(gain(REASONING, path, digits_only=True), abs=1e-5)
        if rank >= predict_module.COST_BLOCKS:  # the cost side is measured for the best blocks only
            assert block.metrics["text_nll_change"] is None and block.metrics["general_nll_change"] is None
            continue
        assert block.metrics["text_nll_change"] == pytest.approx(-gain(REASONING, path), abs=1e-5)
        assert block.metrics["general_nll_change"] == pytest.approx(-gain(GENERAL, path), abs=1e-5)
        assert block.metrics["gain_lower_bound"] <= block.score + 1e-12
    assert [b.score for b in result.blocks] == sorted((b.score for b in result.blocks), reverse=True)
    assert result.decision == "abstain" and "only 2 calibration texts hold numbers" in result.reason  # fewer than MIN_TEXTS
    as_dict = result.as_dict()
    assert as_dict["decision"] == result.decision and len(as_dict["candidates"]) == 3
    assert (as_dict["block"] is None) == (result.decision == "abstain")


def test_decision_follows_the_bound_once_enough_texts_hold_numbers(tiny_llama, monkeypatch):
    monkeypatch.setattr(predict_module, "MIN_TEXTS", 2)
    result = predict(tiny_llama[1], REASONING, GENERAL, block_sizes=(1, 2))
    assert result.decision == ("help" if any(b.metrics["gain_lower_bound"] > 0 for b in result.blocks) else "abstain")
    chosen = result.as_dict()["block"]
    assert "above zero in 95% of 2000 resamples" in result.reason and "blocks scored" in result.reason
    if result.decision == "help":  # the best-ranked block whose joint bound is above zero
        named = next(b for b in result.blocks if b.metrics["gain_lower_bound"] > 0)
        assert chosen == {"start": named.start, "end": named.end} and result.reason.startswith(f"[{named.start}, {named.end})")
    else:
        assert chosen is None and all(b.metrics["gain_lower_bound"] <= 0 for b in result.blocks)


def test_texts_without_numbers_are_refused(tiny_llama):
    with pytest.raises(CpOnnxError, match="hold no numbers"):
        predict(tiny_llama[1], ["All cats purr. Tom is a cat, so Tom purrs."], GENERAL)


def test_lower_bound_worked_by_hand():
    # One text: every resample is that text, so the bound is its gain per token.
    assert predict_module._lower_bound(np.array([[3.0, -1.0]]), np.array([6.0])) == pytest.approx([0.5, -1 / 6])
    # Two texts of equal length gaining +1 and -1 per token: the estimate is 0, and every resample deviates
    # from it by 0 in units of its own standard error, so the bound is the estimate: not above zero.
    bound = predict_module._lower_bound(np.array([[4.0], [-4.0]]), np.array([4.0, 4.0]))
    assert bound == pytest.approx([0.0])
    # Every text gains: every resample gains at least the smallest per-token gain.
    assert predict_module._lower_bound(np.array([[2.0], [5.0], [3.0]]), np.array([4.0, 5.0, 3.0]))[0] >= 0.5
    # A text without scored tokens (no digits) adds nothing; resamples of only such texts are left out.
    assert predict_module._lower_bound(np.array([[3.0], [0.0]]), np.array([3.0, 0.0])) == pytest.approx([1.0])


def test_joint_bound_is_below_every_single_block_bound():
    # The joint critical value is the quantile of the largest standardised overshoot, at least each block's own.
    gains = np.random.default_rng(3).normal(0.0, 1.0, size=(10, 12)) * 5
    tokens = np.full(10, 5.0)
    joint = predict_module._lower_bound(gains, tokens)
    alone = np.array([predict_module._lower_bound(gains[:, [b]], tokens)[0] for b in range(gains.shape[1])])
    assert (joint <= alone + 1e-12).all() and (joint < alone).any()


def test_pure_noise_rarely_passes_for_help_when_picking_the_best_of_many():
    # 40 blocks whose per-text gains are noise around zero (no block helps), 10 texts, 200 simulated runs:
    # naming the best-looking block when its own bound is above zero does so in most runs; the joint bound
    # keeps that to about the stated 5%.
    rng = np.random.default_rng(0)
    tokens = np.full(10, 4.0)
    runs = [rng.normal(0.0, 1.0, size=(10, 40)) * tokens[:, None] for _ in range(200)]
    joint = np.mean([(predict_module._lower_bound(g, tokens) > 0).any() for g in runs])
    alone = np.mean([(predict_module._lower_bound(g[:, [int(np.argmax(g.sum(0)))]], tokens) > 0)[0] for g in runs])
    assert joint <= 0.08 and alone >= 0.5
    # Blocks that share most of their per-text gain (as neighbouring blocks do) are held to the same rate.
    shared = [(rng.normal(0, 1, size=(10, 1)) + 0.3 * rng.normal(0, 1, size=(10, 40))) * tokens[:, None] for _ in range(200)]
    assert np.mean([(predict_module._lower_bound(g, tokens) > 0).any() for g in shared]) <= 0.08
    # A block that does help (one standard deviation per text) still passes in a fair share of runs.
    helped = [g + np.eye(40)[5] * tokens[:, None] for g in runs]
    assert np.mean([(predict_module._lower_bound(g, tokens) > 0).any() for g in helped]) >= 0.2


def test_no_reasoning_texts_is_refused(tiny_llama):
    with pytest.raises(CpOnnxError, match="no reasoning calibration texts"):
        predict(tiny_llama[1], [], GENERAL)


def test_cost_side_is_measured_for_the_best_blocks_only(tiny_llama, monkeypatch):
    monkeypatch.setattr(predict_module, "COST_BLOCKS", 99)
    full = predict(tiny_llama[1], REASONING, GENERAL, block_sizes=(1, 2))
    monkeypatch.setattr(predict_module, "COST_BLOCKS", 2)
    few = predict(tiny_llama[1], REASONING, GENERAL, block_sizes=(1, 2))
    assert all(b.metrics["general_nll_change"] is not None for b in full.blocks)
    assert [(b.start, b.end, b.score) for b in few.blocks] == [(b.start, b.end, b.score) for b in full.blocks]
    assert [b.metrics for b in few.blocks[:2]] == [b.metrics for b in full.blocks[:2]]
    assert all(b.metrics["text_nll_change"] is None and b.metrics["general_nll_change"] is None for b in few.blocks[2:])


def test_screening_scores_the_middle_size_then_the_neighbours_of_its_leaders(tiny_llama, monkeypatch):
    full = predict(tiny_llama[1], REASONING, GENERAL, block_sizes=(1, 2, 3), screen=False)
    everything = {(b.start, b.end): b.score for b in full.blocks}
    assert len(everything) == full.candidate_blocks == 6
    monkeypatch.setattr(predict_module, "SCREEN_TOP", 1)
    screened = predict(tiny_llama[1], REASONING, GENERAL, block_sizes=(1, 2, 3))
    leader = max([(0, 2), (1, 3)], key=lambda b: (everything[b], -b[0]))
    expected = {b for b in everything if b[1] - b[0] == 2 or (abs(b[0] - leader[0]) <= 1 and abs(b[1] - leader[1]) <= 1)}
    assert {(b.start, b.end) for b in screened.blocks} == expected and screened.candidate_blocks == 6
    for block in screened.blocks:  # a block's score does not depend on which others were scored
        assert block.score == pytest.approx(everything[(block.start, block.end)], abs=1e-9)
    assert screened.as_dict()["blocks_scored"] == len(expected)


QUESTIONS = [("If 3x + 5 = 20, what is x?", "5", "multi_step"), ("Does a gecko have feathers?", "No", "syllogism"),
             ("What comes after 2, 4, 6, 8?", "10", "sequence")]


def test_zero_shot_gains_are_the_answers_log_probability_asked_alone_under_torch(tiny_llama, monkeypatch):
    """Each question asked as "Question: ...\\nAnswer:" and scored on its answer's tokens, one unit per question."""
    hf, model = tiny_llama
    result = predict(model, REASONING, GENERAL, block_sizes=(1, 2), regime=predict_module.ZERO_SHOT, questions=QUESTIONS)
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
        assert block.score == pytest.approx(gain([*range(block.end), *range(block.start, 3)]), abs=1e-5)
    kinds = result.by_kind[result.blocks[0].start, result.blocks[0].end]
    assert set(kinds) == {"multi_step", "syllogism", "sequence"}  # the questions' kinds, not the texts'
    shown = result.as_dict()
    assert shown["regime"] == "zero_shot" and shown["gain_per"] == "question" and "zero-shot" in shown["prompting"]
    assert "only 3 calibration questions state answers" in result.reason
    monkeypatch.setattr(predict_module, "MIN_TEXTS", 2)
    assert "resamples of the questions" in predict(model, REASONING, GENERAL, block_sizes=(1,), regime="zero_shot", questions=QUESTIONS).reason


def test_zero_shot_without_questions_and_unknown_regimes_are_refused(tiny_llama):
    with pytest.raises(CpOnnxError, match="needs calibration questions"):
        predict(tiny_llama[1], REASONING, GENERAL, regime=predict_module.ZERO_SHOT)
    with pytest.raises(CpOnnxError, match="unknown prompting regime"):
        predict(tiny_llama[1], REASONING, GENERAL, regime="one_shot")


def test_greedy_figures_count_what_the_model_itself_continues_with(tiny_llama, monkeypatch):
    """greedy_base and each block's greedy_change: the share of digit tokens (few-shot), or of questions whose every
    answer token is a hit (zero-shot). A random tiny model's argmax is almost never the text's token, which would leave
    every figure 0; so a hit is redefined here as a log-probability above LEVEL, read from the ONNX scores by predict and,
    independently, from torch by this test."""
    from cp_onnx.models.evaluators import ReuseEvaluator

    hf, model = tiny_llama
    level = -5.7  # near the median token's log-prob under this model (ln 256 = 5.55): some tokens and answers hit, some not
    scores = ReuseEvaluator.token_scores
    monkeypatch.setattr(ReuseEvaluator, "token_scores", lambda self, *a, **k: [(lp, lp > level) for lp, _ in scores(self, *a, **k)])
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

    for regime, expected in ((predict_module.FEW_SHOT, few_shot), (predict_module.ZERO_SHOT, zero_shot)):
        result = predict(model, REASONING, GENERAL, block_sizes=(1, 2), regime=regime, questions=QUESTIONS)
        base = expected(None)
        assert result.greedy_base == pytest.approx(base) and result.as_dict()["greedy_base"] == result.greedy_base
        changes = [block.metrics["greedy_change"] for block in result.blocks]
        assert changes == pytest.approx([expected([*range(b.end), *range(b.start, 3)]) - base for b in result.blocks])
        assert 0 < base < 1 and any(changes), regime  # the check above compared figures that vary
