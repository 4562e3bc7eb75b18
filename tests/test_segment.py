"""segment: preamble -> layers -> head, chained by hand with onnxruntime, against the full model and the route pass."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cp_onnx.models.runner import Runner, pad_batch
from graph_passes import GraphPassError, discover, graph_io
from graph_passes.route import route
from graph_passes.segment import POSITIONS, segment, split_unembedding

FAMILIES = ("llama", "gemma3", "gpt2")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, values: dict) -> np.ndarray:
    """The session's first output, fed by input name from ``values`` (which may hold more)."""
    return sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})[0]


def head_feeds(parts, feeds: dict, path, positions: np.ndarray) -> dict:
    """The head's inputs (and more) after running the preamble and the segments along a layer path."""
    preamble = session(parts.preamble)
    values = {**feeds, **dict(zip([o.name for o in preamble.get_outputs()], preamble.run(None, {i.name: feeds[i.name] for i in preamble.get_inputs()})))}
    stream = values[parts.embed]
    for layer in path:
        stream = run(session(parts.layers[layer]), {**values, parts.resid_in[layer]: stream})
    return {**values, parts.resid_in[-1]: stream, POSITIONS: positions}


def chained_logits(parts, feeds: dict, path, positions: np.ndarray) -> np.ndarray:
    """Logits rows at flat ``positions`` from running the segments along a layer path."""
    return run(session(parts.head), head_feeds(parts, feeds, path, positions))


def batch(vocab: int = 256):
    rng = np.random.default_rng(3)
    return pad_batch([rng.integers(3, vocab, size=n).tolist() for n in (11, 6, 8)])


@pytest.mark.parametrize("family", FAMILIES)
def test_chained_segments_equal_the_full_model(tiny_model, family):
    _, onnx_path = tiny_model(family)
    proto = graph_io.load(onnx_path)
    parts = segment(proto, discover(proto))
    assert parts.gathered_before_lm_head  # the lm_head runs on the gathered rows only
    full = Runner(proto)
    ids, mask = batch()
    feeds = full.feeds(ids, mask)
    expected = full.run(ids, mask)["logits"]
    positions = np.flatnonzero(mask.reshape(-1))[::-1].copy()  # every real token, in a scrambled order
    got = chained_logits(parts, feeds, range(len(parts.layers)), positions)
    np.testing.assert_allclose(got, expected.reshape(-1, expected.shape[-1])[positions], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tail_gives_the_full_model_logits_with_the_last_mlp_on_the_positions_only(tiny_model, family):
    _, onnx_path = tiny_model(family)
    proto = graph_io.load(onnx_path)
    parts = segment(proto, discover(proto))
    if family == "gpt2":  # its head reshapes the stream to the input's [batch, seq] (read from the context): no tail
        assert parts.tail is None
        return
    full = Runner(proto)
    ids, mask = batch()
    feeds = full.feeds(ids, mask)
    expected = full.run(ids, mask)["logits"]
    positions = np.flatnonzero(mask.reshape(-1))[::-1][:5].copy()
    values = head_feeds(parts, feeds, range(len(parts.layers) - 1), positions)
    mid = run(session(parts.tail.attention), {**values, parts.resid_in[-2]: values[parts.resid_in[-1]]})
    gathered = [n for n in parts.tail.positionwise.graph.node if n.op_type == "Gather" and POSITIONS in n.input]
    assert len(gathered) == 1 and gathered[0].input[0].endswith("flat")  # the gather comes first, on resid_mid
    got = run(session(parts.tail.positionwise), {parts.tail.resid_mid: mid, POSITIONS: positions})
    np.testing.assert_allclose(got, expected.reshape(-1, expected.shape[-1])[positions], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_segments_along_a_path_equal_the_routed_model(tiny_model, family):
    _, onnx_path = tiny_model(family)
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    path = [0, 1, 2, 1, 2, 0]
    routed = Runner(route(proto, layer_map, path))
    ids, mask = batch()
    expected = routed.run(ids, mask)["logits"]
    positions = np.arange(ids.size, dtype=np.int64)
    got = chained_logits(segment(proto, layer_map), routed.feeds(ids, mask), path, positions)
    np.testing.assert_allclose(got, expected.reshape(-1, expected.shape[-1]), atol=1e-5, rtol=0)


def test_segments_copy_each_weight_once(tiny_model):
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    parts = segment(proto, discover(proto))
    models = [parts.preamble, *parts.layers, parts.head]
    big = [t.name for m in models for t in m.graph.initializer if len(t.raw_data) >= 1024]
    assert len(big) == len(set(big))  # no weight lands in two segments
    assert set(big) == {t.name for t in proto.graph.initializer if len(t.raw_data) >= 1024}


def test_a_tensor_named_positions_is_refused(tiny_model):
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    layer_map = discover(proto)
    proto.graph.node[0].output[0] = POSITIONS
    with pytest.raises(GraphPassError, match="already has a tensor named 'positions'"):
        segment(proto, layer_map)


def test_logits_after_a_non_token_op_are_gathered_after_the_head(tiny_model):
    """A Softmax after the lm_head is not in the per-token list: the head then computes all rows and gathers them."""
    _, onnx_path = tiny_model("llama")
    proto = graph_io.load(onnx_path)
    lm_head = next(node for node in proto.graph.node if "logits" in node.output)
    lm_head.output[0] = "scores"
    proto.graph.node.append(onnx.helper.make_node("Softmax", ["scores"], ["logits"], name="/probs", axis=-1))
    layer_map = discover(proto)
    parts = segment(proto, layer_map)
    assert not parts.gathered_before_lm_head
    full = Runner(proto)
    ids, mask = batch()
    expected = full.run(ids, mask)["logits"]
    positions = np.array([5, 0, 17], dtype=np.int64)
    got = chained_logits(parts, full.feeds(ids, mask), range(3), positions)
    np.testing.assert_allclose(got, expected.reshape(-1, expected.shape[-1])[positions], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_unembedding_gives_the_hidden_state_the_logits_are_a_product_of(tiny_model, family):
    """logits = normed @ W for the tiny families; a head with anything after that product is not split."""
    _, onnx_path = tiny_model(family)
    proto = graph_io.load(onnx_path)
    parts = segment(proto, discover(proto))
    normed_model, weight = split_unembedding(parts.head)
    ids, mask = batch()
    values = head_feeds(parts, Runner(proto).feeds(ids, mask), range(len(parts.layers)), np.flatnonzero(mask.reshape(-1)))
    np.testing.assert_allclose(run(session(normed_model), values) @ onnx.numpy_helper.to_array(weight), run(session(parts.head), values), atol=1e-5, rtol=1e-5)

    capped = onnx.ModelProto()
    capped.CopyFrom(parts.head)
    logits = capped.graph.output[0].name
    capped.graph.node[-1].output[0] = "raw_logits"
    capped.graph.node.append(onnx.helper.make_node("Tanh", ["raw_logits"], [logits]))  # a soft cap: no longer a plain product
    assert split_unembedding(capped) is None
