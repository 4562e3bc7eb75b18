"""perturb and ablate passes against transformers with the same change made by hooks (tiny llama and gpt2)."""
from __future__ import annotations

import numpy as np
import pytest

from cp_onnx.analysis.perturbation import perturb_feeds
from cp_onnx.models.runner import Runner
from graph_passes import GraphPassError, discover, graph_io
from graph_passes.ablate import ablate
from graph_passes.perturb import head_scale_input, head_shift_input, perturb, resid_input
from support import TEXT_IDS, hooked_torch_logits

FAMILIES = ("llama", "gpt2")
REL = 1e-4


def rel_err(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_model):
    hf, onnx_path = tiny_model(request.param)
    proto = graph_io.load(onnx_path)
    return request.param, hf, proto, discover(proto)


def onnx_logits(proto, extra: dict | None = None) -> np.ndarray:
    """Logits of the one test text; ``extra`` feeds the perturbation inputs."""
    runner = Runner(proto)
    ids = np.array([TEXT_IDS])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    feeds = {k: v for k, v in feeds.items() if k in runner.input_names}
    return runner.session.run(["logits"], {**feeds, **(extra or {})})[0][0]


def identity_feeds(layer_map, layers=(), head_layers=()) -> dict:
    return perturb_feeds(layer_map, 1, len(TEXT_IDS), layers, head_layers)


def test_zeros_and_ones_leave_the_model_unchanged(family):
    name, hf, proto, layer_map = family
    perturbed = perturb(proto, layer_map, layers=range(3), heads=range(3))
    assert np.array_equal(onnx_logits(perturbed, identity_feeds(layer_map, range(3), range(3))), onnx_logits(proto))


def test_residual_input_adds_to_the_layer_input(family):
    name, hf, proto, layer_map = family
    rng = np.random.default_rng(0)
    delta = (0.5 * rng.standard_normal((len(TEXT_IDS), layer_map.hidden_size))).astype(np.float32)
    for layer in range(3):
        feeds = identity_feeds(layer_map, [layer])
        feeds[resid_input(layer)] = delta[None]
        expected = hooked_torch_logits(hf, name, resid={layer: delta})
        assert rel_err(onnx_logits(perturb(proto, layer_map, layers=[layer]), feeds), expected) < REL
        assert rel_err(expected, hooked_torch_logits(hf, name)) > 1e-2  # the change is visible, not noise


def test_head_scale_and_shift_change_the_context_before_the_projection(family):
    name, hf, proto, layer_map = family
    rng = np.random.default_rng(1)
    h, k = layer_map.num_heads, layer_map.head_dim
    scale = np.array([1.0, 0.3, -1.0, 2.0], np.float32)[:h]
    shift = (0.2 * rng.standard_normal((h, len(TEXT_IDS), k))).astype(np.float32)
    feeds = identity_feeds(layer_map, head_layers=[1])
    feeds[head_scale_input(1)], feeds[head_shift_input(1)] = scale[None], shift[None]
    expected = hooked_torch_logits(hf, name, heads={1: (scale, shift)})
    assert rel_err(onnx_logits(perturb(proto, layer_map, heads=[1]), feeds), expected) < REL


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablate_equals_hooked_projection_input(family, mode):
    name, hf, proto, layer_map = family
    h, k = layer_map.num_heads, layer_map.head_dim
    means = {2: np.random.default_rng(2).standard_normal((h, k)).astype(np.float32)}
    scale, shift = np.ones(h, np.float32), np.zeros((h, 1, k), np.float32)
    for head in (0, 3):
        scale[head] = 0
        if mode == "mean":
            shift[head, 0] = means[2][head]
    expected = hooked_torch_logits(hf, name, heads={2: (scale, shift)})
    ablated = ablate(proto, layer_map, {2: [0, 3]}, mode, means if mode == "mean" else None)
    assert rel_err(onnx_logits(ablated), expected) < REL
    assert rel_err(expected, hooked_torch_logits(hf, name)) > 1e-3


def test_ablating_nothing_copies_the_model(family):
    _, _, proto, layer_map = family
    assert np.array_equal(onnx_logits(ablate(proto, layer_map, {1: []})), onnx_logits(proto))


@pytest.mark.parametrize("call, message", [
    (lambda p, m: perturb(p, m, layers=[3]), "layer 3 is out of range"),
    (lambda p, m: perturb(perturb(p, m, layers=[0]), m, layers=[0]), "already has an input"),
    (lambda p, m: ablate(p, m, {0: [4]}), "head 4 does not exist"),
    (lambda p, m: ablate(p, m, {0: [1]}, "noise"), "unknown ablation mode"),
    (lambda p, m: ablate(p, m, {0: [1]}, "mean"), "mean ablation needs means"),
    (lambda p, m: ablate(p, m, {0: [1]}, "mean", {0: np.zeros((4, 3))}), "expected [4, 16]"),
    (lambda p, m: ablate(p, m, {0: [1]}, "mean", {1: np.zeros((4, 16))}), "needs means[0]"),
])
def test_bad_requests_say_what_is_wrong(family, call, message):
    _, _, proto, layer_map = family
    with pytest.raises(GraphPassError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(proto, layer_map)


def test_runner_feeds_extra_inputs_a_pass_added(tiny_model):
    # A perturbed graph has inputs a text batch cannot supply; Runner.run takes them through `extra`.
    import numpy as np

    from cp_onnx.models.runner import Runner
    from graph_passes import discover, graph_io
    from graph_passes.perturb import perturb, resid_input

    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    perturbed = Runner(perturb(proto, discover(proto), layers=[1]))
    plain = Runner(proto)
    ids, mask = np.array([[5, 9, 14, 3]]), np.ones((1, 4), dtype=np.int64)
    zero = {resid_input(1): np.zeros((1, 4, 64), dtype=np.float32)}
    np.testing.assert_array_equal(perturbed.run(ids, mask, ["logits"], extra=zero)["logits"], plain.run(ids, mask, ["logits"])["logits"])
    shifted = perturbed.run(ids, mask, ["logits"], extra={resid_input(1): np.ones((1, 4, 64), dtype=np.float32)})["logits"]
    assert not np.allclose(shifted, plain.run(ids, mask, ["logits"])["logits"])
