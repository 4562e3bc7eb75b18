"""Head influence: exact ablation effects, finite-difference estimates and composition against float64 transformers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import spearmanr

from cp_onnx.analysis import heads
from cp_onnx.analysis.perturbation import PerturbedRuns, base_activations
from cp_onnx.models.runner import Runner
from graph_passes import discover, graph_io
from graph_passes.ablate import ablate
from support import hooked_torch_logits, log_probs

TEXTS = ([5, 7, 9, 11, 13, 17, 19, 23], [3, 4, 99, 100, 7])


@pytest.fixture(scope="module", params=("llama", "gpt2"))
def influence(request, tiny_model):
    """(family, float64 torch model, per-head result, head means, model, layer map) for the two test texts."""
    hf, onnx_path = tiny_model(request.param)
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    texts = base_activations(proto, layer_map, TEXTS)
    runs = PerturbedRuns(proto, layer_map)
    means = heads.head_means(texts)
    stats = heads.HeadStats(layer_map.num_layers, layer_map.num_heads)
    for ids, text in zip(TEXTS, texts):
        base, results = runs.run(ids, heads.probes(text, means, range(layer_map.num_layers)))
        stats.add(text, base, results)
    return request.param, copy.deepcopy(hf).double(), stats.result(), means, proto, layer_map


_BASES: dict = {}  # keyed by family, not id(hf): a freed model's id can come back as the next family's model


def _base_logits(hf, family: str, ids: tuple) -> np.ndarray:
    if (family, ids) not in _BASES:
        _BASES[family, ids] = hooked_torch_logits(hf, family, ids=list(ids))
    return _BASES[family, ids]


def torch_effects(hf, family: str, layer: int, head: int, scale: float, shift=None) -> tuple[float, float, float]:
    """Mean loss change, mean KL(base || changed) and mean half Fisher variance of the logit change, over all texts."""
    num_heads = hf.config.num_attention_heads
    s = np.ones(num_heads)
    s[head] = scale
    sh = np.zeros((num_heads, 1, hf.config.hidden_size // num_heads))
    if shift is not None:
        sh[head, 0] = shift
    loss = kl = fisher = 0.0
    for ids in TEXTS:
        base = _base_logits(hf, family, tuple(ids))
        changed = hooked_torch_logits(hf, family, ids=ids, heads={layer: (s, sh)})
        lp, lq = log_probs(base), log_probs(changed)
        targets = (np.arange(len(ids) - 1), ids[1:])
        loss += np.sum(lp[targets] - lq[targets])
        p = np.exp(lp)
        kl += np.sum(p * (lp - lq))
        delta = changed - base
        fisher += np.sum(p * (delta - np.sum(p * delta, axis=-1, keepdims=True)) ** 2) / 2
    predictions, positions = sum(len(t) - 1 for t in TEXTS), sum(len(t) for t in TEXTS)
    return loss / predictions, kl / positions, fisher / positions


def test_exact_ablation_effects_match_torch(influence):
    family, hf, result, means, *_ = influence
    for l, h in np.ndindex(result["loss_zero"].shape):
        loss, kl, _ = torch_effects(hf, family, l, h, 0.0)
        assert result["loss_zero"][l, h] == pytest.approx(loss, rel=1e-3, abs=1e-6)
        assert result["kl_zero"][l, h] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        loss, kl, _ = torch_effects(hf, family, l, h, 0.0, means[l, h])
        assert result["loss_mean"][l, h] == pytest.approx(loss, rel=1e-3, abs=1e-6)
        assert result["kl_mean"][l, h] == pytest.approx(kl, rel=1e-3, abs=1e-7)


def test_estimates_are_the_finite_difference_toward_removal(influence):
    family, hf, result, *_ = influence
    a = heads.ALPHA
    for l, h in np.ndindex(result["loss_estimate"].shape):
        loss, _, fisher = torch_effects(hf, family, l, h, 1 - a)
        assert result["loss_estimate"][l, h] == pytest.approx(loss / a, rel=1e-3, abs=2e-5)
        assert result["kl_estimate"][l, h] == pytest.approx(fisher / a**2, rel=1e-3, abs=1e-6)


def test_loss_estimate_is_first_order_in_the_head_context(influence):
    """Against the exact derivative d loss / d scale at scale 1 (autograd), the one-sided step is off by O(ALPHA)."""
    import torch

    family, hf, result, *_ = influence
    num_layers, num_heads = result["loss_estimate"].shape
    scales = torch.ones((num_layers, num_heads), dtype=torch.float64, requires_grad=True)
    layers_path, proj_path = {"llama": ("model.layers", "self_attn.o_proj"), "gpt2": ("transformer.h", "attn.c_proj")}[family]
    layers = hf.get_submodule(layers_path)
    handles = []
    for l, layer in enumerate(layers):
        def scale_heads(mod, args, l=l):
            b, s, width = args[0].shape
            ctx = args[0].reshape(b, s, num_heads, width // num_heads) * scales[l][None, None, :, None]
            return (ctx.reshape(b, s, width),)
        handles.append(layer.get_submodule(proj_path).register_forward_pre_hook(scale_heads))
    total = 0
    try:
        for ids in TEXTS:
            logits = hf(input_ids=torch.tensor([ids])).logits[0]
            total = total + torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total.backward()
    finally:
        for handle in handles:
            handle.remove()
    gradient = -scales.grad.numpy() / sum(len(t) - 1 for t in TEXTS)  # removal = moving the scale from 1 to 0
    assert np.linalg.norm(result["loss_estimate"] - gradient) / np.linalg.norm(gradient) < 0.1
    assert result["spearman"]["loss_estimate~loss_zero"] > 0.8  # and it ranks heads as the exact ablation does


def test_composition_is_the_relative_change_of_later_layer_updates(influence):
    family, hf, result, *_ = influence
    num_layers, num_heads = result["loss_zero"].shape
    for l, h in ((0, 1), (1, 3)):
        scale = np.ones(num_heads)
        scale[h] = 0
        change, base_norm = np.zeros(num_layers), np.zeros(num_layers)
        for ids in TEXTS:
            before, after = [], []
            hooked_torch_logits(hf, family, ids=ids, layer_outputs=before)
            hooked_torch_logits(hf, family, ids=ids, heads={l: (scale, np.zeros((num_heads, 1, 1)))}, layer_outputs=after)
            embed = torch_embed(hf, family, ids)
            u_base = np.diff(np.stack([embed, *before]), axis=0)
            u_after = np.diff(np.stack([embed, *after]), axis=0)
            change += np.sum((u_after - u_base) ** 2, axis=(1, 2))
            base_norm += np.sum(u_base**2, axis=(1, 2))
        expected = np.where(np.arange(num_layers) > l, np.sqrt(change / base_norm), 0.0)
        np.testing.assert_allclose(result["composition"][l, h], expected, rtol=1e-3, atol=1e-6)


def test_exact_effects_are_those_of_the_ablate_pass(influence):
    _, _, result, means, proto, layer_map = influence
    for (l, h), mode in (((0, 2), "zero"), ((2, 1), "mean")):
        ablated = Runner(ablate(proto, layer_map, {l: [h]}, mode, {l: means[l].astype(np.float32)}))
        base = Runner(proto)
        loss = kl = 0.0
        for ids in TEXTS:
            feeds = base.feeds(np.array([ids]), np.ones((1, len(ids)), np.int64))
            lp = log_probs(base.session.run(["logits"], feeds)[0][0].astype(np.float64))
            lq = log_probs(ablated.session.run(["logits"], feeds)[0][0].astype(np.float64))
            targets = (np.arange(len(ids) - 1), ids[1:])
            loss += np.sum(lp[targets] - lq[targets])
            kl += np.sum(np.exp(lp) * (lp - lq))
        assert result[f"loss_{mode}"][l, h] == pytest.approx(loss / sum(len(t) - 1 for t in TEXTS), rel=1e-3, abs=1e-6)
        assert result[f"kl_{mode}"][l, h] == pytest.approx(kl / sum(len(t) for t in TEXTS), rel=1e-3, abs=1e-7)


def torch_embed(hf, family: str, ids) -> np.ndarray:
    """The residual stream entering layer 0 (transformers' first hidden state)."""
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[0][0].numpy()


def test_agreement_is_nan_for_constant_columns():
    columns = {name: np.arange(6.0).reshape(2, 3) for name in heads.COLUMNS}
    columns["kl_zero"] = np.ones((2, 3))
    found = heads.agreement(columns)
    assert found["loss_estimate~loss_zero"] == pytest.approx(1.0)
    assert np.isnan(found["kl_estimate~kl_zero"])


def test_choose_exact_alternates_between_the_two_rankings():
    """kl ranking: (0,0) 5, (1,1) 3, (1,2) 2, (0,1) 1 and (0,2) 1 (tie: by layer, head), (1,0) 0;
    |loss| ranking: (0,1) 9, (1,0) 8, (0,2) 1, then the zeros by (layer, head)."""
    columns = {"kl_estimate": np.array([[5.0, 1, 1], [0, 3, 2]]), "loss_estimate": np.array([[0.0, -9, 1], [8, 0, 0]])}
    assert heads.choose_exact(columns, 1) == [(0, 0)]
    assert heads.choose_exact(columns, 4) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert heads.choose_exact(columns, 5) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    every = [(l, h) for l in range(2) for h in range(3)]
    assert heads.choose_exact(columns, 6) == heads.choose_exact(columns, 99) == heads.choose_exact(columns, None) == every
    assert heads.choose_exact(columns, 0) == []
    columns["kl_estimate"][0, 0] = np.nan  # ranks last, not first
    assert heads.choose_exact(columns, 1) == [(1, 1)]


def test_heads_not_ablated_are_nan_and_agreement_uses_the_ablated(influence):
    """HeadStats fed every head's estimate but only some heads' ablations: those heads' columns and composition
    are the all-heads values, the others NaN; Spearman is over the ablated heads."""
    _, _, full, means, proto, layer_map = influence
    texts = base_activations(proto, layer_map, TEXTS)
    runs = PerturbedRuns(proto, layer_map)
    chosen = [(0, 1), (1, 0), (1, 3), (2, 2)]
    stats = heads.HeadStats(layer_map.num_layers, layer_map.num_heads)
    for ids, text in zip(TEXTS, texts):
        base, results = runs.run(ids, heads.estimate_probes(means, range(layer_map.num_layers)))
        stats.add(text, base, results)
        base, results = runs.run(ids, heads.ablation_probes(means, chosen))
        stats.add(text, base, results)
    result = stats.result()
    measured = np.zeros_like(result["exact"])
    measured[tuple(np.array(chosen).T)] = True
    np.testing.assert_array_equal(result["exact"], measured)
    for column in heads.COLUMNS:
        expected = full[column] if "estimate" in column else np.where(measured, full[column], np.nan)
        np.testing.assert_allclose(result[column], expected, rtol=1e-5, atol=1e-9, err_msg=column)
    np.testing.assert_allclose(result["composition"][measured], full["composition"][measured], rtol=1e-5, atol=1e-9)
    assert np.isnan(result["composition"][~measured]).all()
    a, b = full["kl_estimate"][measured], full["kl_zero"][measured]
    assert result["spearman"]["kl_estimate~kl_zero"] == pytest.approx(spearmanr(a, b).statistic)


def test_pruning_leaves_out_a_method_some_heads_lack():
    """head_ablation ranks the cheapest heads by loss_zero: with only the strongest ablated it would offer them first."""
    from cp_onnx.analysis.head_pruning import heads_section
    from cp_onnx.analysis.prune import head_scores

    rows = [{"layer": l, "head": h, "loss_estimate": float(l + h), "loss_zero": 1.0 if (l, h) == (1, 1) else None} for l in range(2) for h in range(2)]
    scores = head_scores({"heads": {"heads": rows}})
    assert list(scores) == ["head_first_order"]
    np.testing.assert_array_equal(scores["head_first_order"], [[0, 1], [1, 2]])
    assert heads_section(scores)["default"] == "head_first_order"
    for row in rows:
        row["loss_zero"] = 2.0 - row["layer"]
    assert set(head_scores({"heads": {"heads": rows}})) == {"head_first_order", "head_ablation"}
