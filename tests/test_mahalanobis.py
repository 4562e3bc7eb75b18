"""Mahalanobis anomaly: Ledoit-Wolf and distances by hand and by scipy, neuron logit weight against transformers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from cp_onnx.analysis import mahalanobis
from cp_onnx.analysis.perturbation import PerturbedRuns, TextBase, base_activations
from cp_onnx.errors import CpOnnxError
from graph_passes import discover, graph_io
from support import hooked_torch_logits


def ledoit_wolf_by_definition(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The estimator written as in the paper, with explicit outer products (slow, independent of the Gram shortcuts)."""
    n, d = x.shape
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / n
    mu = np.trace(sample) / d
    delta_sq = np.sum((sample - mu * np.eye(d)) ** 2) / d
    beta_bar_sq = sum(np.sum((np.outer(row, row) - sample) ** 2) / d for row in centred) / n**2
    shrinkage = min(beta_bar_sq, delta_sq) / delta_sq
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d), shrinkage


@pytest.mark.parametrize("n, d", [(12, 30), (40, 6)])
def test_ledoit_wolf_matches_the_definition(n, d):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    mean, cov, shrinkage = mahalanobis.ledoit_wolf(x)
    expected_cov, expected_shrinkage = ledoit_wolf_by_definition(x)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10, atol=1e-12)
    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-10)
    assert 0 < shrinkage < 1
    assert np.linalg.eigvalsh(cov)[0] > 0  # invertible although n < d in the first case


def test_distances_match_scipy_with_the_same_covariance():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((15, 8)) * np.arange(1, 9)
    mean, cov, _ = mahalanobis.ledoit_wolf(x)
    inverse = np.linalg.inv(cov)
    expected = [scipy_mahalanobis(row, mean, inverse) for row in x]
    np.testing.assert_allclose(mahalanobis.mahalanobis(x, mean, cov), expected, rtol=1e-10)


def test_distance_by_hand_on_a_diagonal_covariance():
    # cov = diag(4, 1): (3, 4) from (1, 0) is sqrt((2/2)^2 + 4^2) = sqrt(17).
    assert mahalanobis.mahalanobis(np.array([[3.0, 4.0]]), np.array([1.0, 0.0]), np.diag([4.0, 1.0]))[0] == pytest.approx(np.sqrt(17))


def test_too_few_samples_is_an_error():
    with pytest.raises(CpOnnxError, match="at least 2 samples"):
        mahalanobis.ledoit_wolf(np.ones((1, 4)))


def test_candidates_are_the_largest_mean_magnitudes():
    resid = np.zeros((3, 2, 4), np.float32)  # embed + 2 layers, 2 tokens, 4 dims
    resid[1] = [[1, -9, 0, 2], [1, -7, 0, -4]]  # layer 0: |mean| = 1, 8, 0, 3
    resid[2] = [[0, 0, 5, 0], [0, 1, -5, 0]]  # layer 1: 0, 0.5, 5, 0
    text = TextBase(np.array([1, 2]), resid, None)
    np.testing.assert_array_equal(mahalanobis.candidates([text], 2), [[1, 3], [2, 1]])


def test_rank_blocks_sums_the_z_scores_of_log_terms():
    layers = {"shift": np.array([50.0, 1, 1, 1, 1, 1]), "tail_ratio": np.array([1.0, 1, 1, 9, 9, 1]), "max_logit_share": np.array([1.0, 1, 1, 1, 5, 5])}
    blocks = mahalanobis.rank_blocks(layers, (2,))
    assert (blocks[0].start, blocks[0].end) == (3, 5)  # shift is reported, not scored: layer 0 does not win
    tail = np.log(layers["tail_ratio"])
    share = np.log(layers["max_logit_share"])
    expected = (tail[3:5].mean() - tail.mean()) / (tail.std() + 1e-10) + (share[3:5].mean() - share.mean()) / (share.std() + 1e-10)
    assert blocks[0].score == pytest.approx(expected)
    assert set(blocks[0].metrics) == {"tail_ratio_z", "max_logit_share_z"}


def test_neuron_logit_effect_matches_torch(tiny_model):
    """A candidate's logit effect is the RMS over tokens of |logits change| / ALPHA when it is stepped ALPHA toward zero."""
    hf, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    ids = [5, 7, 9, 11, 13, 17, 19, 23]
    text = base_activations(proto, layer_map, [ids])[0]
    neurons = mahalanobis.candidates([text], 2)
    stats = mahalanobis.AnomalyStats([text], neurons)
    _, results = PerturbedRuns(proto, layer_map).run(ids, mahalanobis.probes(text, neurons))
    stats.add(text, results)
    jacobian_norms = np.full(layer_map.num_layers + 1, 1.0)
    found = stats.result(jacobian_norms)
    base = hooked_torch_logits(hf, "llama", ids=ids)
    for neuron in found["neurons"]:
        l, i = neuron["layer"], neuron["dim"]
        if l + 1 == layer_map.num_layers:
            continue  # the head's input: transformers has no layer to hook there
        delta = np.zeros_like(text.resid[l + 1])
        delta[:, i] = -mahalanobis.ALPHA * text.resid[l + 1][:, i]
        changed = hooked_torch_logits(hf, "llama", ids=ids, resid={l + 1: delta})
        effect = np.sqrt(np.mean(np.sum((changed - base) ** 2, axis=-1))) / mahalanobis.ALPHA
        assert neuron["logit_effect"] == pytest.approx(effect, rel=2e-3)
        rms = np.sqrt(np.mean(text.resid[l + 1].astype(np.float64) ** 2, axis=0))
        typical = np.sqrt(np.mean(rms**2)) / np.sqrt(rms.size)  # frobenius_logits given as 1
        assert neuron["logit_share"] == pytest.approx(effect / typical, rel=2e-3)
    assert len(found["layers"]["shift"]) == layer_map.num_layers
    assert np.all(found["layers"]["distance_mean"] > 0)
