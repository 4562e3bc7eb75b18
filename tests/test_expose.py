"""expose: every exposed activation of every tiny family against transformers' own tensors, padded both ways."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from cp_onnx.models.runner import Runner, pad_batch
from graph_passes import GraphPassError, discover, expose, graph_io
from support import MODULES, TINY, module, rel_err, token_batch

REL = 1e-4


def torch_activations(hf, family: str, ids: np.ndarray, mask: np.ndarray, feeds: dict) -> dict[str, np.ndarray]:
    """The canonical activations as transformers computes them: hidden states, attentions and hooks."""
    import torch

    layers_path, mid_hook, proj_path = MODULES[family]
    layers = module(hf, layers_path)
    found: dict[str, np.ndarray] = {}
    handles = []

    def keep(name, value):
        found[name] = (value[0] if isinstance(value, tuple) else value).detach().numpy().copy()

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: keep(f"blocks.{i}.resid_out", out)))
        if mid_hook:
            where, side = mid_hook
            target = module(layer, where)
            if side == "input":
                handles.append(target.register_forward_pre_hook(lambda m, args, i=i: keep(f"blocks.{i}.resid_mid", args[0])))
            else:
                handles.append(target.register_forward_hook(lambda m, a, out, i=i: keep(f"blocks.{i}.resid_mid", out)))

        def split_heads(m, args, i=i):
            b, s, width = args[0].shape
            heads = hf.config.num_attention_heads
            found[f"blocks.{i}.attn.head_ctx"] = args[0].reshape(b, s, heads, width // heads).transpose(1, 2).detach().numpy().copy()

        handles.append(module(layer, proj_path).register_forward_pre_hook(split_heads))
    kwargs = {name: torch.from_numpy(value) for name, value in feeds.items()}
    try:
        with torch.no_grad():
            out = hf(**kwargs, output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = [h.numpy() for h in out.hidden_states]
    found["embed"] = hidden[0]
    for i in range(len(layers)):
        found[f"blocks.{i}.resid_in"] = hidden[i]
        if i + 1 < len(layers):  # the last hidden state is after the final norm (if any): the hook has the layer's
            found[f"blocks.{i}.resid_out"] = hidden[i + 1]
        found[f"blocks.{i}.attn.pattern"] = out.attentions[i].numpy()
    found["final_norm"] = hidden[-1]
    found["logits"] = out.logits.numpy()
    return found


def valid(name: str, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rows of real (not padding) query positions, as [tokens, ...]."""
    if name.endswith(("head_ctx", "pattern")):
        value = value.transpose(0, 2, 1, 3)  # [batch, seq, heads, ...]
    return value[mask.astype(bool)]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(TINY))
def test_exposed_activations_match_transformers(tiny_model, family, side):
    hf, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    layer_map = discover(model)
    roles = ("resid_in", "resid_mid", "resid_out", "attn.head_ctx", "attn.pattern")
    names = ["embed", *layer_map.names(roles), "logits"] + (["final_norm"] if layer_map.final_norm else [])
    exposed = Runner(expose(model, layer_map, names), threads=1)
    plain = Runner(model, threads=1)
    assert exposed.output_names == plain.output_names + [n for n in names if n not in plain.output_names]

    ids, mask = token_batch(side)
    got = exposed.run(ids, mask)
    feeds = exposed.feeds(ids, mask)
    if family == "gemma3":  # its export takes no position_ids: both sides count pads as positions
        assert "position_ids" not in feeds
    expected = torch_activations(hf, family, ids, mask, feeds)

    checked = []
    for name in names:
        reference = expected[name]
        assert got[name].shape == reference.shape, name
        error = rel_err(valid(name, got[name], mask), valid(name, reference, mask))
        assert error <= REL, f"{family} {side}: {name} differs from transformers by {error:.2e}"
        checked.append(name)
    has_mid = MODULES[family][1] is not None
    assert layer_map.available("resid_mid") == has_mid
    assert len(checked) == 2 + layer_map.num_layers * (4 + has_mid) + bool(layer_map.final_norm)

    # Exposing adds outputs and nothing else: the logits are those of the untouched model.
    original = plain.run(ids, mask)["logits"]
    assert rel_err(got["logits"], original) <= 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_only_keeps_the_named_outputs_and_the_nodes_they_need(tiny_model, family):
    hf, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    layer_map = discover(model)
    names = ["embed", *layer_map.names(("resid_out", "attn.pattern"))]
    full, only = expose(model, layer_map, names), expose(model, layer_map, names, only=True)
    assert [v.name for v in only.graph.output] == names
    lm_head = next(node.name for node in model.graph.node if layer_map.logits in node.output)
    assert lm_head not in {node.name for node in only.graph.node} and len(only.graph.node) < len(full.graph.node)
    ids, mask = token_batch("right")
    expected, got = Runner(full, threads=1).run(ids, mask, names), Runner(only, threads=1).run(ids, mask)
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name])


def test_exposed_outputs_are_typed_shaped_and_the_input_model_is_untouched(tiny_model):
    _, onnx_path = tiny_model("llama")
    model = graph_io.load(onnx_path)
    layer_map = discover(model)
    before = model.SerializeToString()
    names = ["blocks.2.resid_out", "embed", "blocks.1.attn.pattern", "blocks.0.attn.head_ctx", "embed", "logits"]
    exposed = expose(model, layer_map, names)
    assert model.SerializeToString() == before
    outputs = {value.name: value.type.tensor_type for value in exposed.graph.output}
    assert list(outputs) == ["logits", "blocks.2.resid_out", "embed", "blocks.1.attn.pattern", "blocks.0.attn.head_ctx"]
    dims = lambda name: [d.dim_param or d.dim_value for d in outputs[name].shape.dim]  # noqa: E731
    batch, seq = [d.dim_param for d in next(v for v in model.graph.input if v.name == "input_ids").type.tensor_type.shape.dim]
    assert dims("blocks.2.resid_out") == dims("embed") == [batch, seq, 64]
    assert dims("blocks.0.attn.head_ctx") == [batch, 4, seq, 16]
    assert dims("blocks.1.attn.pattern") == [batch, 4, seq, seq]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outputs.values())
    identities = {node.output[0]: node.input[0] for node in exposed.graph.node if node.op_type == "Identity" and node.name.startswith("/expose/")}
    assert identities == {"blocks.2.resid_out": layer_map.layers[2].resid_out, "embed": layer_map.embed, "blocks.1.attn.pattern": layer_map.layers[1].pattern, "blocks.0.attn.head_ctx": layer_map.layers[0].head_ctx}
    onnx.checker.check_model(exposed)
    assert discover(exposed) == layer_map  # the Identity outputs belong to no layer
    again = expose(exposed, layer_map, ["embed", "blocks.0.resid_in"])  # already exposed names stay as they are
    assert [v.name for v in again.graph.output] == list(outputs) + ["blocks.0.resid_in"]


@pytest.mark.parametrize(
    "family, name, message",
    [
        ("llama", "blocks.3.resid_out", r"layer 3 is out of range, the model has 3 layers \(0..2\)"),
        ("llama", "blocks.0.mlp_out", r"not a canonical activation name"),
        ("gpt_neox", "blocks.1.resid_mid", r"not available in this gpt_neox graph"),
        ("bert", "final_norm", r"not available in this bert graph"),
    ],
)
def test_bad_names_are_refused(tiny_model, family, name, message):
    _, onnx_path = tiny_model(family)
    model = graph_io.load(onnx_path)
    with pytest.raises(GraphPassError, match=message):
        expose(model, discover(model), ["embed", name])


def test_a_layer_map_of_another_graph_is_refused(tiny_model):
    llama = graph_io.load(tiny_model("llama")[1])
    gpt2 = graph_io.load(tiny_model("gpt2")[1])
    with pytest.raises(GraphPassError, match="discovered on another graph; run discover on this one"):
        expose(gpt2, discover(llama), ["blocks.0.resid_out"])


def test_external_data_round_trip(tiny_model, tmp_path):
    """Save with external data, load without weights, expose, save beside and elsewhere, run: same numbers."""
    _, onnx_path = tiny_model("llama")
    original = graph_io.load(onnx_path)
    first = tmp_path / "a" / "model.onnx"
    first.parent.mkdir()
    graph_io.save(original, first, external_data=True)
    assert (first.parent / "model.onnx.data").stat().st_size > first.stat().st_size
    assert sorted(p.name for p in first.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp files left

    light = graph_io.load(first, weights=False)
    stubs = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stubs and not any(t.raw_data for t in stubs)
    layer_map = discover(light)
    exposed = expose(light, layer_map, ["blocks.1.resid_out", "final_norm"])
    beside = graph_io.save(exposed, first.parent / "exposed.onnx")  # shares model.onnx.data
    assert sorted(p.name for p in first.parent.iterdir()) == ["exposed.onnx", "model.onnx", "model.onnx.data"]
    elsewhere = tmp_path / "b" / "exposed.onnx"
    elsewhere.parent.mkdir()
    with pytest.raises(GraphPassError, match="pass weights_dir="):
        graph_io.save(exposed, elsewhere)
    graph_io.save(exposed, elsewhere, weights_dir=first.parent)
    with pytest.raises(GraphPassError, match="load it with weights=True"):
        graph_io.save(exposed, tmp_path / "one_file.onnx", external_data=False)

    ids, mask = token_batch("left")
    expected = Runner(expose(original, discover(original), ["blocks.1.resid_out", "final_norm"]), threads=1).run(ids, mask)
    for path in (beside, elsewhere):
        got = Runner(path, threads=1).run(ids, mask)
        assert set(got) == {"logits", "blocks.1.resid_out", "final_norm"}
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)


def test_save_writes_one_file_below_2gb_and_external_data_above(tiny_model, tmp_path, monkeypatch):
    _, onnx_path = tiny_model("gpt2")
    model = graph_io.load(onnx_path)
    path = graph_io.save(model, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert graph_io.load(path).SerializeToString() == model.SerializeToString()
    monkeypatch.setattr(graph_io, "PROTO_LIMIT", model.ByteSize() - 1)  # as if the model were over 2 GB
    (tmp_path / "big").mkdir()
    big = graph_io.save(model, tmp_path / "big" / "model.onnx")
    assert sorted(p.name for p in big.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(Runner(big, threads=1).run(*token_batch("right"))["logits"], Runner(model, threads=1).run(*token_batch("right"))["logits"])
    with pytest.raises(GraphPassError, match="does not exist; create it first"):
        graph_io.save(model, tmp_path / "missing" / "model.onnx")
    with pytest.raises(GraphPassError, match="no ONNX model at"):
        graph_io.load(tmp_path / "nothing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(GraphPassError, match="cannot read .* as an ONNX model"):
        graph_io.load(tmp_path / "junk.onnx")


@pytest.mark.slow
def test_smollm2_every_layer_output_matches_torch(smollm2_dir, smollm2_torch):
    import time

    import torch
    from tokenizers import Tokenizer

    model = graph_io.load(smollm2_dir / "model.onnx")
    started = time.perf_counter()
    layer_map = discover(model)
    names = layer_map.names(("resid_out",))
    exposed = expose(model, layer_map, names)
    assert time.perf_counter() - started < 10  # discovery + expose on 7,400 nodes
    assert len(names) == 30

    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    texts = ["The capital of France is", "If a train leaves at 3 pm and travels for two hours, it arrives at"]
    tokens = [tokenizer.encode(text).ids for text in texts]
    assert all(t[0] == 1 for t in tokens)  # BOS prepended by the tokenizer
    runner, plain = Runner(exposed, threads=1), Runner(model, threads=1)
    del model, exposed
    last = {}
    hook = smollm2_torch.model.layers[-1].register_forward_hook(lambda m, a, out: last.update(value=(out[0] if isinstance(out, tuple) else out).numpy()))
    try:
        for side in ("right", "left"):
            ids, mask = pad_batch(tokens, side=side)
            got = runner.run(ids, mask)
            feeds = {k: torch.from_numpy(v) for k, v in runner.feeds(ids, mask).items()}
            with torch.no_grad():
                out = smollm2_torch(**feeds, output_hidden_states=True)
            expected = [h.numpy() for h in out.hidden_states[1:-1]] + [last["value"]]  # the last one is after the final norm
            valid = mask.astype(bool)
            for i, name in enumerate(names):
                error = rel_err(got[name][valid], expected[i][valid])
                assert error <= 1e-4, f"{side}: {name} differs from torch by {error:.2e}"
            assert rel_err(got["logits"], plain.run(ids, mask)["logits"]) <= 1e-6
    finally:
        hook.remove()
