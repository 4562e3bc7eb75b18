"""Block scores: parity with the reference implementation's rankings, and small cases worked by hand."""
from __future__ import annotations


import numpy as np
import pytest

from cp_onnx.analysis.scores import METHODS, layer_contrast, rank_blocks
from cp_onnx.models.evaluators import candidate_blocks
from cp_onnx.errors import CpOnnxError
from support import assert_same_top, load_reference, reference_stats

# The reference computed variance_z, rank_z and moderate_var_z in float32 (its variance and rank
# are numpy float32 scalars); emulating float32 reproduces its numbers bit for bit, while this
# float64 implementation differs by up to 6e-7. Hence 1e-6, not 1e-12.
SCORE_TOL = 1e-6


@pytest.mark.parametrize("method", ["stability", "anomaly", "composite", "boundary"])
def test_rankings_match_reference(method):
    reference = load_reference()
    expected = reference["rankings"][method]
    got = rank_blocks(reference_stats(reference), method)
    assert len(got) == len(expected) == 81
    assert_same_top(got, expected)
    by_block = {(r["start"], r["end"]): r for r in expected}
    for block in got:
        ref = by_block[(block.start, block.end)]
        assert block.score == pytest.approx(ref["score"], abs=SCORE_TOL), (block.start, block.end)
        assert block.metrics.keys() == ref["metrics"].keys(), (block.start, block.end)
        for key, value in ref["metrics"].items():
            assert block.metrics[key] == pytest.approx(value, abs=SCORE_TOL), (block.start, block.end, key)
    # The JSON form carries plain Python numbers, in the reference's layout.
    top = got[0].as_dict()
    assert top.keys() == expected[0].keys() and type(top["score"]) is float
    assert all(type(v) is float for v in top["metrics"].values())


def test_candidates_are_generated_size_by_size_then_by_start():
    assert candidate_blocks(6, (3, 4, 5)) == [(0, 3), (1, 4), (2, 5), (3, 6), (0, 4), (1, 5), (2, 6), (0, 5), (1, 6)]
    assert len(candidate_blocks(30, (3, 4, 5))) == 28 + 27 + 26
    assert candidate_blocks(4, (5, 3)) == [(0, 3), (1, 4)]  # a size larger than the model is skipped


# Six-layer statistics for the anomaly score (block size 3), worked by hand:
#   change     [0,0,0,6,6,6]:  mean 3, std 3   -> z over [0,3) -1, [1,4) -1/3, [2,5) +1/3, [3,6) +1
#   self-sim   [1,-1,1,-1,1,-1]: mean 0, std 1 -> z +1/3, -1/3, +1/3, -1/3; self_sim_z is minus that
#   variance   constant 5                      -> z 0 everywhere (std 0 + 1e-10)
#   rank       [3,3,1,1,3,1]: mean 2, std 1    -> z +1/3, -1/3, -1/3, -1/3
# anomaly: [0,3) -1-1/3+0+1/3 = -1; [1,4) -1/3+1/3-1/3 = -1/3; [2,5) 1/3-1/3-1/3 = -1/3; [3,6) 1+1/3-1/3 = 1
ANOMALY_STATS = {
    "representation_change": np.array([0, 0, 0, 6, 6, 6.0]),
    "self_similarity": np.array([1, -1, 1, -1, 1, -1.0]),
    "cross_example_variance": np.full(6, 5.0),
    "representation_rank": np.array([3, 3, 1, 1, 3, 1.0]),
}


def scores_of(blocks) -> dict[tuple[int, int], float]:
    return {(b.start, b.end): b.score for b in blocks}


def metrics_of(blocks) -> dict[tuple[int, int], dict[str, float]]:
    return {(b.start, b.end): b.metrics for b in blocks}


def test_anomaly_by_hand():
    blocks = rank_blocks(ANOMALY_STATS, "anomaly", (3,))
    assert scores_of(blocks) == pytest.approx({(0, 3): -1, (1, 4): -1 / 3, (2, 5): -1 / 3, (3, 6): 1})
    assert (blocks[0].start, blocks[-1].start) == (3, 0)
    assert metrics_of(blocks)[(3, 6)] == pytest.approx({"repr_change_z": 1, "self_sim_z": 1 / 3, "variance_z": 0, "rank_z": -1 / 3})


def test_stability_by_hand_with_terms_present_and_absent_at_the_edges():
    # change [8,4,2,2,2,2]: steps d = [4,2,0,0,0], mean 1.2, std 1.6.
    #   S: [0,3) d[0:3] mean 2 -> -(2-1.2)/1.6 = -0.5; [1,4) mean 2/3 -> 1/3; [2,5) mean 0 -> 0.75; [3,6) ends at L: none.
    # variance [1,1,1,1,3,3]: growth g_1..g_5 = [1,1,1,3,1], median 1; D = [0,0,0,2,0], mean 0.4, std 0.8.
    #   M: [0,3) starts at 0: none; [1,4) g_1..g_3 mean 1, dev 0 -> 0.5; [2,5) g_2..g_4 mean 5/3, dev 2/3 -> -1/3;
    #   [3,6) ends at L: none.
    # T only for start > 2: [3,6) before = mean(8,4,2) = 14/3, block mean 2 -> 1 - 6/14 = 4/7.
    # rank [3,3,1,1,3,1] -> z +1/3, -1/3, -1/3, -1/3, weighted 0.5.
    stats = {
        "representation_change": np.array([8, 4, 2, 2, 2, 2.0]),
        "cross_example_variance": np.array([1, 1, 1, 1, 3, 3.0]),
        "representation_rank": np.array([3, 3, 1, 1, 3, 1.0]),
    }
    blocks = rank_blocks(stats, "stability", (3,))
    metrics = metrics_of(blocks)
    assert metrics[(0, 3)] == pytest.approx({"stability_z": -0.5, "rank_z": 1 / 3})
    assert metrics[(1, 4)] == pytest.approx({"stability_z": 1 / 3, "moderate_var_z": 0.5, "rank_z": -1 / 3})
    assert metrics[(2, 5)] == pytest.approx({"stability_z": 0.75, "moderate_var_z": -1 / 3, "rank_z": -1 / 3})
    assert metrics[(3, 6)] == pytest.approx({"transition_score": 4 / 7, "rank_z": -1 / 3})
    # 1.5 S + M + T + 0.5 rank: -0.75 + 1/6; 0.5 + 0.5 - 1/6; 1.125 - 1/3 - 1/6; 4/7 - 1/6
    expected = {(0, 3): -7 / 12, (1, 4): 5 / 6, (2, 5): 0.625, (3, 6): 17 / 42}
    assert scores_of(blocks) == pytest.approx(expected)
    assert [(b.start, b.end) for b in blocks] == [(1, 4), (2, 5), (3, 6), (0, 3)]


def test_transition_term_clamps_at_zero_and_needs_positive_preceding_change():
    stats = dict(ANOMALY_STATS, representation_change=np.array([1, 1, 1, 5, 5, 5.0]))
    # before = 1, block mean 5: 1 - 5 = -4, clamped to 0 (present).
    assert metrics_of(rank_blocks(stats, "stability", (3,)))[(3, 6)]["transition_score"] == 0.0
    # ANOMALY_STATS' change is 0 before layer 3: no transition term at all.
    assert "transition_score" not in metrics_of(rank_blocks(ANOMALY_STATS, "stability", (3,)))[(3, 6)]


def test_composite_by_hand():
    # Stability on ANOMALY_STATS: steps [0,0,6,0,0], mean 1.2, std 2.4, so S = -(2-1.2)/2.4 = -1/3 for
    # [0,3), [1,4), [2,5); constant variance gives M = 0; [3,6) has no S, no M, no T (change before is 0).
    # stability: [0,3) -0.5+1/6 = -1/3; [1,4) -0.5+0-1/6 = -2/3; [2,5) -2/3; [3,6) -1/6.
    # composite = half of that plus half the anomaly (-1, -1/3, -1/3, 1).
    blocks = rank_blocks(ANOMALY_STATS, "composite", (3,))
    assert scores_of(blocks) == pytest.approx({(0, 3): -2 / 3, (1, 4): -1 / 2, (2, 5): -1 / 2, (3, 6): 5 / 12})
    m = metrics_of(blocks)[(3, 6)]
    assert m == pytest.approx({
        "stability_score": -1 / 6, "anomaly_score": 1, "stab_rank_z": -1 / 3,
        "anom_repr_change_z": 1, "anom_self_sim_z": 1 / 3, "anom_variance_z": 0, "anom_rank_z": -1 / 3,
    })
    assert metrics_of(blocks)[(1, 4)]["stab_moderate_var_z"] == 0.0


def test_boundary_by_hand():
    # fs = [0.9, 0.5, 1.0, 0.8, 0.4, 0] (the last layer has none).
    # [0,3): mean(.9,.5)=.7,  left none, right 1-fs[2]=0           -> .7
    # [1,4): mean(.5,1)=.75,  left 1-.9=.1, right 1-.8=.2: .15      -> .9
    # [2,5): mean(1,.8)=.9,   left 1-.5=.5, right 1-.4=.6: .55      -> 1.45
    # [3,6): mean(.8,.4)=.6,  left 1-1=0,   right none (end = L)    -> .6
    stats = {"forward_similarity": np.array([0.9, 0.5, 1.0, 0.8, 0.4, 0.0])}
    blocks = rank_blocks(stats, "boundary", (3,))
    assert scores_of(blocks) == pytest.approx({(0, 3): 0.7, (1, 4): 0.9, (2, 5): 1.45, (3, 6): 0.6})
    assert metrics_of(blocks)[(2, 5)] == pytest.approx({"internal_coherence": 0.9, "boundary_contrast": 0.55})
    # A one-layer block has no internal similarity: [2,3) scores (1-.5 + 1-1)/2 = .25.
    assert scores_of(rank_blocks(stats, "boundary", (1,)))[(2, 3)] == pytest.approx(0.25)


def test_layer_contrast_by_hand():
    # layer 0: change 2 vs 1 -> 1/2; self-sim .9 vs .5 -> .4 (not normalised); growth equal -> 0;
    #          variance 4 vs 1 -> 3/4; entropy missing in one -> left out: mean of 4 = 1.65/4.
    # layer 1: the same plus entropy 2 vs 1 -> 1/2: mean of 5 = 2.15/5.
    # layer 2: entropy 0 in one set (not positive) -> left out: 1.65/4.
    reasoning = {
        "representation_change": np.full(3, 2.0), "self_similarity": np.full(3, 0.9), "norm_growth": np.ones(3),
        "cross_example_variance": np.full(3, 4.0), "attention_entropy": np.array([1.0, 2.0, 2.0]),
    }
    general = {
        "representation_change": np.ones(3), "self_similarity": np.full(3, 0.5), "norm_growth": np.ones(3),
        "cross_example_variance": np.ones(3), "attention_entropy": np.array([np.nan, 1.0, 0.0]),
    }
    assert layer_contrast(reasoning, general) == pytest.approx([1.65 / 4, 2.15 / 5, 1.65 / 4])


def test_contrastive_by_hand():
    # Equal sets at layers 0-2 (contrast 0); at layers 3-5 every ratio is 2 vs 1 and self-sim 1 vs .5,
    # each giving .5, entropy missing: contrast [0,0,0,.5,.5,.5], mean .25, std .25
    # -> z over [0,3) -1, [1,4) -1/3, [2,5) +1/3, [3,6) +1. Half of it plus half the anomaly (-1, -1/3, -1/3, 1).
    general = {name: np.ones(6) for name in ("representation_change", "self_similarity", "norm_growth", "cross_example_variance")}
    reasoning = {name: np.array([1, 1, 1, 2, 2, 2.0]) for name in general}
    reasoning["self_similarity"] = np.array([1, 1, 1, 1.5, 1.5, 1.5])
    blocks = rank_blocks(ANOMALY_STATS, "contrastive", (3,), contrast_stats=(reasoning, general))
    # (the 1e-10 added to each std leaves about 4e-11 where the exact answer is 0)
    assert scores_of(blocks) == pytest.approx({(0, 3): -1, (1, 4): -1 / 3, (2, 5): 0, (3, 6): 1}, abs=1e-9)
    assert metrics_of(blocks)[(3, 6)] == pytest.approx({
        "repr_change_z": 1, "self_sim_z": 1 / 3, "variance_z": 0, "rank_z": -1 / 3,
        "anomaly_score": 1, "contrastive_z": 1, "contrastive_raw": 0.5,
    })


@pytest.mark.parametrize("method", ["stability", "anomaly", "composite"])
def test_constant_statistics_score_zero_and_keep_candidate_order(method):
    stats = {name: np.full(6, 2.0) for name in ANOMALY_STATS}
    blocks = rank_blocks(stats, method)
    # Every z is 0/(0 + 1e-10) = 0 and T = max(0, 1 - 2/2) = 0: all scores are exactly 0,
    # so the stable sort leaves the blocks in candidate order.
    assert all(b.score == 0.0 for b in blocks)
    assert [(b.start, b.end) for b in blocks] == candidate_blocks(6, (3, 4, 5))


def test_too_few_layers_names_the_fix():
    stats = {name: np.ones(2) for name in ANOMALY_STATS}
    with pytest.raises(CpOnnxError, match="the model has 2 layers, fewer than the smallest block size 3; pass smaller --block-sizes"):
        rank_blocks(stats, "anomaly")
    assert len(rank_blocks(stats, "anomaly", (1, 2))) == 3


def test_unknown_method_and_missing_contrast_stats():
    with pytest.raises(CpOnnxError, match="unknown scoring method 'magic'; choose one of " + ", ".join(METHODS)):
        rank_blocks(ANOMALY_STATS, "magic")
    with pytest.raises(CpOnnxError, match="contrast_stats"):
        rank_blocks(ANOMALY_STATS, "contrastive")
    with pytest.raises(CpOnnxError, match="lack forward_similarity"):
        rank_blocks(ANOMALY_STATS, "boundary")


def test_nan_in_a_used_statistic_is_an_error_naming_it_and_the_layer():
    stats = dict(ANOMALY_STATS, representation_change=np.array([0, 0, 0, 6, np.nan, 6]))
    with pytest.raises(CpOnnxError, match="representation_change is NaN/Inf at layer 4"):
        rank_blocks(stats, "stability")
    # Statistics a method does not read may be NaN: entropy (never scored), forward similarity for anomaly.
    stats = dict(ANOMALY_STATS, attention_entropy=np.full(6, np.nan), forward_similarity=np.full(6, np.nan))
    assert scores_of(rank_blocks(stats, "anomaly", (3,)))[(3, 6)] == pytest.approx(1)
    with pytest.raises(CpOnnxError, match="forward_similarity is NaN/Inf at layer 0"):
        rank_blocks(stats, "boundary")
