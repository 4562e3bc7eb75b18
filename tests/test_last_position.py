"""The last-position pass: logits for each row's last position only, equal to torch's there; graphs it cannot cut are left alone."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cp_onnx.models.runner import Runner
from graph_passes import graph_io
from graph_passes.last_position import last_position
from support import rel_err, torch_logits


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "phi3"])
def test_last_position_logits_equal_torch(tiny_model, family):
    hf, onnx_path = tiny_model(family)
    sliced = last_position(graph_io.load(onnx_path))
    assert sliced is not None
    ids = np.random.default_rng(1).integers(3, 250, size=(2, 9))
    mask = np.ones_like(ids)
    got = Runner(sliced, threads=1).run(ids, mask, ["logits"])["logits"]
    expected = torch_logits(hf, {"input_ids": ids, "attention_mask": mask})[:, -1:]
    assert got.shape == expected.shape == (2, 1, hf.config.vocab_size)
    assert rel_err(got, expected) < 1e-4


def _toy_head(after: str | None, declared: bool = True) -> onnx.ModelProto:
    """hidden [batch, seq, 4] -> MatMul by a weight -> (``after`` op) -> logits."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    nodes = [helper.make_node("MatMul", ["hidden", "W"], ["mm" if after else "logits"])]
    if after:
        nodes.append(helper.make_node(after, ["mm"], ["logits"], **({"axis": -1} if after == "Softmax" else {})))
    shape = ["batch", "seq", 3] if declared else None
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_token_ops_after_the_head_are_kept_and_others_refused():
    import onnxruntime as ort

    hidden = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    sliced = last_position(_toy_head("Tanh"))  # softcapping-like: per token, so the slice may go before the head
    session = ort.InferenceSession(sliced.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"hidden": hidden})[0], np.tanh(hidden @ np.arange(12, dtype=np.float32).reshape(4, 3))[:, -1:], rtol=1e-6)
    assert last_position(_toy_head("Softmax")) is None  # an op outside the per-token list: not cut
    assert last_position(_toy_head(None, declared=False)) is None  # logits of unknown rank: not cut
    assert last_position(_toy_head(None), logits="absent") is None
