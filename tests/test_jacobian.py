"""Jacobians by finite differences through the segmented model, against exact autograd on the transformers model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cp_onnx.analysis import jacobian
from cp_onnx.analysis.perturbation import PerturbedRuns, Probe, Row, base_activations
from cp_onnx.errors import CpOnnxError
from graph_passes import discover, graph_io
from support import module

FAMILIES = ("llama", "gpt2")
# family -> (decoder layers, final norm: the head's input is this module's input)
MODULES = {"llama": ("model.layers", "model.norm"), "gpt2": ("transformer.h", "transformer.ln_f")}
IDS = [5, 7, 9, 11, 13, 17, 19, 23]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tiny_model):
    hf, onnx_path = tiny_model(request.param)
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    text = base_activations(proto, layer_map, [IDS])[0]
    return request.param, hf, PerturbedRuns(proto, layer_map), text


def torch_outputs(hf, family: str, point: int):
    """f(delta) -> (last layer output [S, d], logits [S, V]) in float64, delta added at the input of layer ``point`` (or of the final norm)."""
    import torch

    model = _double(hf)
    layers_path, norm_path = MODULES[family]
    layers = module(model, layers_path)
    target = layers[point] if point < len(layers) else module(model, norm_path)

    def f(delta):
        def add(mod, args, kwargs):
            if args:
                return (args[0] + delta, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

        caught = {}
        handles = [
            target.register_forward_pre_hook(add, with_kwargs=True),
            module(model, norm_path).register_forward_pre_hook(lambda mod, args: caught.__setitem__("final", args[0])),
        ]
        try:
            logits = model(input_ids=torch.tensor([IDS])).logits
        finally:
            for handle in handles:
                handle.remove()
        return caught["final"][0], logits[0]

    return f


_DOUBLES = {}


def _double(hf):
    import copy

    if id(hf) not in _DOUBLES:
        _DOUBLES[id(hf)] = copy.deepcopy(hf).double()
    return _DOUBLES[id(hf)]


def test_finite_difference_jvp_matches_autograd(setup):
    import torch

    family, hf, runs, text = setup
    rng = np.random.default_rng(0)
    for point in range(runs.num_layers + 1):
        x = text.resid[point]
        v = rng.standard_normal(x.shape)
        step = jacobian.RELATIVE_STEP * jacobian.input_scale(x)
        rows = (Row(point, (step * v).astype(np.float32)), Row(point, (-step * v).astype(np.float32)))
        # The same pair through the full logits and (no logit measures asked) through the Gram matrix of the unembedding.
        _, results = runs.run(IDS, [Probe(("jacobian", point, 0), rows, step), Probe(("jacobian", point, 1), rows, step, measures=frozenset())])
        zero = torch.zeros((1, *x.shape), dtype=torch.float64)
        _, (exact_final, exact_logits) = torch.func.jvp(torch_outputs(hf, family, point), (zero,), (torch.tensor(v[None]),))
        exact_final, exact_logits = exact_final.detach().numpy(), np.linalg.norm(exact_logits.detach().numpy(), axis=-1)
        for result in results:
            final, logits_norm = jacobian.directional(result)
            assert np.linalg.norm(final - exact_final) / np.linalg.norm(exact_final) < 1e-3, point
            assert np.max(np.abs(logits_norm - exact_logits) / exact_logits) < 1e-3, point


def test_gram_path_is_taken_where_logits_are_a_plain_product(setup):
    """Both tiny families end in hidden @ W, so the Jacobian pairs skip the vocabulary-wide product."""
    family, hf, runs, text = setup
    assert runs.gram is not None and runs.gram.shape == (hf.config.hidden_size,) * 2, family


def exact_row_norms(hf, family: str, point: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Per token t, ||d out[t] / d x||_F over the whole input, for the last layer output and the logits.

    The full Jacobians by forward mode (8 x 64 inputs against 8 x (64 + 256) outputs).
    """
    import torch

    zero = torch.zeros((1, *shape), dtype=torch.float64)
    jacobians = torch.func.jacfwd(torch_outputs(hf, family, point))(zero)
    return (np.sqrt(np.sum(j.detach().numpy() ** 2, axis=tuple(range(1, j.ndim)))) for j in jacobians)


def test_frobenius_estimates_within_five_percent_of_exact(setup):
    family, hf, runs, text = setup
    stats = jacobian.JacobianStats(runs.num_layers + 1)
    probes = jacobian.probes(text, range(runs.num_layers + 1), 96, np.random.default_rng(1))
    base, results = runs.run(IDS, probes)
    stats.add(text, base.final, results)
    for point in range(runs.num_layers + 1):
        exact_final, exact_logits = exact_row_norms(hf, family, point, text.resid[point].shape)
        estimated_final = np.sqrt(stats.frob_final_sq[point][0])
        estimated_logits = np.sqrt(stats.frob_logits_sq[point][0])
        assert np.max(np.abs(estimated_final / exact_final - 1)) < 0.05, point
        assert np.max(np.abs(estimated_logits / exact_logits - 1)) < 0.05, point
        per_point = stats.per_point()
        assert per_point["frobenius_logits"][point] == pytest.approx(np.sqrt(np.mean(exact_logits**2)), rel=0.03)


def test_rank_blocks_prefers_low_flat_gain():
    # Gains: layers 2..4 are low and flat, so [2, 5) wins; computed by hand below for that block.
    gains = np.array([8.0, 6.0, 1.0, 1.0, 1.0, 4.0, 9.0, 3.0])
    blocks = jacobian.rank_blocks({"gain_logits": gains}, (3,))
    top = blocks[0]
    assert (top.start, top.end) == (2, 5)
    log_gain = np.log(gains)
    steps = np.abs(np.diff(log_gain))
    gain_z = (log_gain[2:5].mean() - log_gain.mean()) / (log_gain.std() + 1e-10)
    roughness_z = (steps[2:5].mean() - steps.mean()) / (steps.std() + 1e-10)
    assert top.score == pytest.approx(-gain_z - roughness_z)
    assert [b.score for b in blocks] == sorted((b.score for b in blocks), reverse=True)


def corrupt_layer(proto: onnx.ModelProto, layer_map, layer: int) -> onnx.ModelProto:
    """A copy whose MLP output weight in ``layer`` (the layer's last weight matmul) is Inf.

    Not an attention weight: the exports guard the softmax with IsNaN/Where, which would hide it.
    """
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    members = set(layer_map.layers[layer].nodes)
    weights = {t.name: k for k, t in enumerate(broken.graph.initializer) if len(t.dims) == 2}
    matmuls = [node for node in broken.graph.node if node.name in members and node.op_type in ("MatMul", "Gemm")]
    name = next(n for node in reversed(matmuls) for n in node.input if n in weights)
    tensor = broken.graph.initializer[weights[name]]
    tensor.CopyFrom(numpy_helper.from_array(np.full(tuple(tensor.dims), np.inf, np.float32), name))
    return broken


def test_nan_in_activations_stops_the_run_naming_the_layer(tiny_model):
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    with pytest.raises(CpOnnxError, match=r"layer 1 produced NaN/Inf activations \(blocks\.1\."):
        base_activations(corrupt_layer(proto, layer_map, 1), layer_map, [IDS])


def test_nan_in_a_perturbed_forward_names_the_layer(setup):
    _, _, runs, text = setup
    delta = np.zeros_like(text.resid[2])
    delta[3, 0] = np.nan
    with pytest.raises(CpOnnxError, match=r"layer 2 produced NaN/Inf activations \(blocks\.2\.resid_out\) on a forward perturbed at layer 2"):
        runs.run(IDS, [Probe(("x",), (Row(2, delta),))])
