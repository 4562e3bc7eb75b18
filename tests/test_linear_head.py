"""Single rows measured from the normed hidden state (linear_head): against the full head and against float64 torch."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from cp_onnx.analysis import heads, mahalanobis
from cp_onnx.analysis.perturbation import PerturbedRuns, Probe, base_activations
from graph_passes import discover, graph_io
from support import hooked_torch_logits, log_probs

IDS = [5, 7, 9, 11, 13, 17, 19, 23]
WANTED = frozenset({"loss", "fisher", "logit_change"})  # every measure a linear row gives


@pytest.fixture(scope="module", params=("llama", "gpt2"))
def setup(request, tiny_model):
    """(family, float64 torch model, model, layer map, base text, probes: every head's ALPHA step and the Mahalanobis rows)."""
    hf, onnx_path = tiny_model(request.param)
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    text = base_activations(proto, layer_map, [IDS])[0]
    steps = heads.probes(text, heads.head_means([text]), range(layer_map.num_layers), exact=False)
    probes = [Probe(p.key, p.rows, p.step, WANTED) for p in steps + mahalanobis.probes(text, mahalanobis.candidates([text], 2))]
    return request.param, copy.deepcopy(hf).double(), proto, layer_map, text, probes


def head_step_logits(hf, family: str, key: tuple) -> np.ndarray:
    """float64 torch logits with head (l, h) of the probe key scaled by 1 - ALPHA."""
    _, _, l, h = key
    num_heads = hf.config.num_attention_heads
    scale = np.ones(num_heads)
    scale[h] = 1 - heads.ALPHA
    return hooked_torch_logits(hf, family, ids=IDS, heads={l: (scale, np.zeros((num_heads, 1, 1)))})


def test_linear_rows_match_the_full_head(setup):
    """The same rows through both paths. Their logit changes are ~1e-2 of the values each path rounds to float32
    (logits or normed states, 6e-8 relative), so each carries ~1e-5 relative noise (measured: up to 2e-5 in the
    Fisher variance, a square): 2e-4 leaves ten times that. The loss differs by the third-order term the linear
    path leaves out (bounded in the next test) and float32 noise of the full head's log-sum-exp: below 1e-6 nats."""
    _, _, proto, layer_map, _, probes = setup
    linear_base, linear = PerturbedRuns(proto, layer_map).run(IDS, probes)
    full_base, full = PerturbedRuns(proto, layer_map, linear_rows=False).run(IDS, probes)
    for a, b in zip(linear, full):
        a, b = a.rows[0], b.rows[0]
        np.testing.assert_allclose(a.logit_change, b.logit_change, rtol=2e-4)
        np.testing.assert_allclose(a.fisher, b.fisher, rtol=2e-4)
        np.testing.assert_allclose(a.loss - linear_base.loss, b.loss - full_base.loss, rtol=0, atol=1e-6)


def test_linear_rows_are_the_second_order_expansion_of_the_exact_change(setup):
    """Against float64 torch logits z (base) and z + d (head stepped): |d|, Var_p(d), and the loss change to second order
    E_p d - d_target + Var_p(d) / 2, within 1e-3 (the float32 model against float64, as elsewhere); that expansion is
    within its Taylor bound of the exact change log E_p e^d - d_target: the remainder of a cumulant generating function
    at t = 1 is at most (4/3) e^(2 max|x|) E_p|x|^3 for the centred change x."""
    family, hf, proto, layer_map, _, probes = setup
    base_row, results = PerturbedRuns(proto, layer_map).run(IDS, probes)
    base = hooked_torch_logits(hf, family, ids=IDS)
    p, positions, targets = np.exp(log_probs(base)), np.arange(len(IDS) - 1), np.array(IDS[1:])
    for result in results:
        if result.probe.key[0] != heads.KIND:
            continue
        row = result.rows[0]
        d = head_step_logits(hf, family, result.probe.key) - base
        mean = np.sum(p * d, axis=-1)
        x = d - mean[:, None]
        variance = np.sum(p * x**2, axis=-1)
        np.testing.assert_allclose(row.logit_change, np.linalg.norm(d, axis=-1), rtol=1e-3)
        np.testing.assert_allclose(row.fisher, variance, rtol=1e-3, atol=1e-12)
        second_order = (mean + variance / 2)[:-1] - d[positions, targets]
        np.testing.assert_allclose(row.loss - base_row.loss, second_order, rtol=1e-3, atol=1e-8)
        exact = np.log(np.sum(p * np.exp(d), axis=-1))[:-1] - d[positions, targets]
        bound = (4 / 3 * np.exp(2 * np.abs(x).max(axis=-1)) * np.sum(p * np.abs(x) ** 3, axis=-1))[:-1]
        assert np.all(np.abs(exact - second_order) <= bound), result.probe.key


def test_fisher_is_summed_over_the_most_likely_tokens(setup):
    """With top_tokens = 16 of 256, the variance is that of the 16 most likely tokens under p renormalised within
    them; the loss's first-order term still sums over the whole vocabulary."""
    family, hf, proto, layer_map, _, probes = setup
    top = 16
    base_row, results = PerturbedRuns(proto, layer_map, top_tokens=top).run(IDS, probes)
    base = hooked_torch_logits(hf, family, ids=IDS)
    p, positions, targets = np.exp(log_probs(base)), np.arange(len(IDS) - 1), np.array(IDS[1:])
    for result in results[:4]:
        d = head_step_logits(hf, family, result.probe.key) - base
        kept = np.argsort(-p, axis=-1, kind="stable")[:, :top]
        p_top, d_top = np.take_along_axis(p, kept, -1), np.take_along_axis(d, kept, -1)
        p_top /= p_top.sum(axis=-1, keepdims=True)
        variance = np.sum(p_top * (d_top - np.sum(p_top * d_top, axis=-1, keepdims=True)) ** 2, axis=-1)
        row = result.rows[0]
        np.testing.assert_allclose(row.fisher, variance, rtol=1e-3, atol=1e-12)
        expected = (np.sum(p * d, axis=-1) + variance / 2)[:-1] - d[positions, targets]
        np.testing.assert_allclose(row.loss - base_row.loss, expected, rtol=1e-3, atol=1e-8)


def test_only_rows_that_need_no_kl_skip_the_full_head(setup, monkeypatch):
    """A KL needs every logit: those rows (the exact ablations) still run the vocabulary-wide head; the others do not."""
    _, _, proto, layer_map, _, probes = setup
    runs = PerturbedRuns(proto, layer_map)
    called = []
    full_head = runs._logits
    monkeypatch.setattr(runs, "_logits", lambda stream, context: called.append(len(stream)) or full_head(stream, context))
    runs.run(IDS, probes)
    assert called == [1]  # the base row only
    called.clear()
    with_kl = [Probe(p.key, p.rows, p.step, WANTED | {"kl"}) for p in probes[:3]]
    _, results = runs.run(IDS, probes[3:6] + with_kl)
    assert sum(called) == 1 + 3 and all(r.rows[0].kl is not None for r in results[3:])
