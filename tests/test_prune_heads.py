"""The prune-heads pass: heads gone from the weights, logits equal to torch with those heads' o_proj columns
zeroed and to the ablate pass, KV-cache sizes following the kept key/value heads."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cp_onnx.models.runner import Runner
from graph_passes import GraphPassError, ablate, discover, graph_io
from graph_passes.metadata import kept_heads
from graph_passes.prune_heads import prune_heads
from support import MODULES, module, rel_err

# 4 query heads over 2 key/value heads (groups {0, 1}, {2, 3}): split groups, whole groups, one head left.
REMOVALS = {"mixed": {0: [1], 2: [0, 3]}, "group": {1: [0, 1]}, "one_left": {0: [0, 1, 2], 1: [3]}}
IDS = np.array([[5, 7, 9, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53, 59, 0, 0]])
MASK = np.array([[1] * 9, [1] * 7 + [0, 0]])
REL = 1e-4


def torch_logits_without(hf, family: str, heads: dict) -> np.ndarray:
    """transformers' logits with the removed heads' columns of o_proj zeroed: those heads then add nothing."""
    import torch

    layers_path, _, proj_path = MODULES[family]
    layers, dim = module(hf, layers_path), hf.config.head_dim if getattr(hf.config, "head_dim", None) else hf.config.hidden_size // hf.config.num_attention_heads
    saved = {}
    with torch.no_grad():
        for l, hs in heads.items():
            weight = module(layers[l], proj_path).weight
            saved[l] = weight.clone()
            for h in hs:
                weight[:, h * dim : (h + 1) * dim] = 0
        try:
            out = hf(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK), use_cache=False).logits.numpy()
        finally:
            for l, weight in saved.items():
                module(layers[l], proj_path).weight.copy_(weight)
    return out


def onnx_logits(proto) -> np.ndarray:
    return Runner(proto).run(IDS, MASK, ["logits"])["logits"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_pruned_logits_equal_torch_and_the_ablate_pass(tiny_model, family):
    hf, onnx_path = tiny_model(family)
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    for removed in REMOVALS.values():
        pruned = prune_heads(proto, layer_map, removed)
        got = onnx_logits(pruned)
        real = MASK.astype(bool)
        assert rel_err(got[real], torch_logits_without(hf, family, removed)[real]) < REL
        assert rel_err(got[real], onnx_logits(ablate(proto, layer_map, removed))[real]) < REL
        assert rel_err(got[real], onnx_logits(proto)[real]) > 1e-3  # the removal changed something
        assert pruned.ByteSize() < proto.ByteSize()
        assert kept_heads(pruned) == {l: [h for h in range(4) if h not in hs] for l, hs in removed.items()}


def test_weights_shrink_and_cache_sizes_follow_the_kept_key_value_heads(tmp_path, tiny_model):
    from exporters.optimum_export import export_hf_folder

    _, onnx_path = tiny_model("llama")
    past = graph_io.load(export_hf_folder(onnx_path.parent.parent / "hf", tmp_path / "past", with_past=True))
    pruned = prune_heads(past, discover(past), REMOVALS["one_left"])
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in (*pruned.graph.input, *pruned.graph.output)}
    assert dims["past_key_values.0.key"][1] == dims["present.0.value"][1] == 1  # layer 0 keeps head 3: key/value head 1 only
    assert dims["past_key_values.1.value"][1] == dims["present.1.key"][1] == 2  # layer 1 keeps heads 0-2: both
    assert dims["past_key_values.2.key"][1] == 2
    sizes = {t.name: list(t.dims) for t in pruned.graph.initializer if t.name.startswith("/prune_heads/blocks.0.")}
    assert sizes == {"/prune_heads/blocks.0.q_proj.weight": [64, 16], "/prune_heads/blocks.0.k_proj.weight": [64, 16],
                     "/prune_heads/blocks.0.v_proj.weight": [64, 16], "/prune_heads/blocks.0.o_proj.weight": [16, 64]}
    ids = IDS[:1]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    runner = Runner(pruned)
    cache = {i.name: np.zeros((1, dims[i.name][1], 0, 16), np.float32) for i in runner.session.get_inputs() if i.name.startswith("past")}
    logits = runner.session.run(["logits"], {**feeds, **cache})[0]
    no_past = graph_io.load(onnx_path)
    assert rel_err(logits, Runner(prune_heads(no_past, discover(no_past), REMOVALS["one_left"])).run(ids, np.ones_like(ids), ["logits"])["logits"]) < REL


def test_constant_reshape_targets_naming_the_head_count_are_rewritten(tiny_model):
    """Optimum builds reshape targets with -1; a graph that spells the head count out is rewritten."""
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    for node in proto.graph.node:
        if node.name in ("/model/layers.1/self_attn/Reshape", "/model/layers.1/self_attn/Reshape_7"):
            target = f"{node.name}/fixed_shape"
            value = [0, 0, 4, 16] if node.name.endswith("Reshape") else [0, 0, 64]  # [batch, seq, heads, head_dim]; [batch, seq, width]
            proto.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), target))
            node.input[1] = target
    layer_map = discover(proto)
    removed = {1: [2]}
    pruned = prune_heads(proto, layer_map, removed)
    real = MASK.astype(bool)
    assert rel_err(onnx_logits(pruned)[real], onnx_logits(ablate(proto, layer_map, removed))[real]) < REL
    targets = {t.name: numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer if t.name.endswith("_shape")}
    assert sorted(targets.values()) == [[0, 0, 3, 16], [0, 0, 48]]


def test_refusals_are_one_line(tiny_model):
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    with pytest.raises(GraphPassError, match="removing all 4 heads of layer 1 leaves it no attention"):
        prune_heads(proto, layer_map, {1: [0, 1, 2, 3]})
    with pytest.raises(GraphPassError, match="layer 1 has heads 0..3; head 4 does not exist"):
        prune_heads(proto, layer_map, {1: [4]})
    with pytest.raises(GraphPassError, match="layer 5 is out of range"):
        prune_heads(proto, layer_map, {5: [0]})
    pruned = prune_heads(proto, layer_map, {0: [1]})
    with pytest.raises(GraphPassError, match="already pruned"):
        prune_heads(pruned, discover(pruned), {1: [1]})
    _, phi3 = tiny_model("phi3")
    phi3 = graph_io.load(phi3)
    with pytest.raises(GraphPassError, match="one fused projection"):
        prune_heads(phi3, discover(phi3), {0: [1]})
    assert onnx.checker.check_model(pruned) is None
