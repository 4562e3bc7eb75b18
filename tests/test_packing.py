"""Packed batches: several sequences per row, each masked to itself, score as each sequence run alone under torch;
a graph that cannot run them packed runs them unpacked, with the same scores."""
from __future__ import annotations

import numpy as np
import pytest

from cp_onnx.models import evaluators
from cp_onnx.models.evaluators import Batches, ReuseEvaluator
from cp_onnx.models.scoring import TokenBatch, pack_batch, sequence_ids
from support import torch_token_logprob

SEQUENCES = [[1, 5, 9, 13, 17, 21, 25], [1, 6, 10], [1, 7, 11, 15, 19], [1, 8], [1, 30, 31, 32, 33, 34]]


def packed_batch(width: int) -> tuple[TokenBatch, list[tuple[int, int]]]:
    """Every token after each sequence's first scored, packed in rows of ``width``; (sequence, position) per target."""
    ids, mask, position_ids, offsets = pack_batch(SEQUENCES, width)
    scored = [(k, p) for k, tokens in enumerate(SEQUENCES) for p in range(1, len(tokens))]
    positions = np.array([offsets[k] + p - 1 for k, p in scored])
    targets = np.array([SEQUENCES[k][p] for k, p in scored])
    return TokenBatch(ids, mask, positions, targets, np.array([k for k, _ in scored]), position_ids=position_ids), scored


def test_rows_are_balanced_and_unpacking_gives_each_sequence_its_row():
    batch, scored = packed_batch(12)
    assert batch.input_ids.shape == (2, 12)  # 23 tokens, two rows: 7, 6, 5 (to the 6), 3 and 2 (to the 7): 12 and 11 tokens
    assert batch.attention_mask.sum() == sum(map(len, SEQUENCES))
    flat = batch.input_ids.reshape(-1)
    assert all(flat[position + 1] == target for position, target in zip(batch.positions, batch.targets))  # predictor, then its target
    sequences = sequence_ids(batch.position_ids, batch.attention_mask)
    assert (sequences >= 0).sum() == batch.attention_mask.sum() and sequences.max() == 2
    alone = batch.unpacked()
    assert alone.input_ids.shape == (5, 7) and alone.position_ids is None
    rows = [alone.input_ids[r, : alone.attention_mask[r].sum()].tolist() for r in range(5)]
    assert sorted(rows) == sorted(SEQUENCES)
    assert (alone.targets == batch.targets).all() and (alone.owners == batch.owners).all()
    assert all(alone.input_ids.reshape(-1)[position + 1] == target for position, target in zip(alone.positions, alone.targets))


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: local (sliding-window) and global attention masks
def test_packed_sequences_score_as_each_alone_under_torch(tiny_model, family):
    hf, onnx_path = tiny_model(family)
    batch, scored = packed_batch(12)
    evaluator = ReuseEvaluator(onnx_path, Batches([batch]), 1)
    assert evaluator.masks and evaluator.batches[0].position_ids is not None  # run packed, not unpacked
    layers = evaluator.num_layers
    paths = [list(range(layers)), [*range(2), *range(1, layers)]]  # the model, and layer 1 run twice
    for path, (logprob, _) in zip(paths, (result[0] for result in evaluator.paths_scores(paths))):
        expected = [torch_token_logprob(hf, SEQUENCES[k], path, p) for k, p in scored]
        assert logprob == pytest.approx(expected, abs=2e-5)


def test_a_graph_that_cannot_run_them_packed_runs_them_unpacked_with_the_same_scores(tiny_model, monkeypatch):
    _, onnx_path = tiny_model("llama")
    batch, _ = packed_batch(12)
    evaluator = ReuseEvaluator(onnx_path, Batches([batch]), 1)
    path = [0, *range(evaluator.num_layers)]  # layer 0 run twice
    packed = evaluator.path_scores(path)[0]
    monkeypatch.setattr(evaluators.ReuseEvaluator, "_packs_as_alone", lambda self: False)
    fallback = ReuseEvaluator(onnx_path, Batches([batch]), 1)
    assert fallback.batches[0].position_ids is None and fallback.batches[0].input_ids.shape == (5, 7)
    unpacked = fallback.path_scores(path)[0]
    assert unpacked[0] == pytest.approx(packed[0], abs=1e-5) and (unpacked[1] == packed[1]).all()


def test_the_prediction_replans_padded_batches_where_the_graph_cannot_run_packed_ones(tiny_llama, monkeypatch):
    """Same gains either way (the torch tests of test_predict check the packed ones); the padded plan is what runs."""
    from cp_onnx.analysis.predict import predict

    hf, model = tiny_llama
    questions = [("If 3x + 5 = 20, what is x?", "5", "multi_step"), ("Does a gecko have feathers?", "No", "syllogism"),
                 ("What comes after 2, 4, 6, 8?", "10", "sequence")]
    texts = ["If 3x + 5 = 20, then x = 5.", "2, 4, 6, 8: the next is 10."]
    packed = predict(model, texts, ["Some general text."], questions=questions, block_sizes=(1, 2))
    ran = []
    monkeypatch.setattr(evaluators.ReuseEvaluator, "_packs_as_alone", lambda self: False)
    original = evaluators.ReuseEvaluator.replan
    monkeypatch.setattr(evaluators.ReuseEvaluator, "replan", lambda self, plan: (ran.extend(plan.batches), original(self, plan))[1])
    padded = predict(model, texts, ["Some general text."], questions=questions, block_sizes=(1, 2))
    assert ran and all(batch.position_ids is None for batch in ran)
    for regime in packed:
        assert [b.score for b in padded[regime].blocks] == pytest.approx([b.score for b in packed[regime].blocks], abs=1e-5)
