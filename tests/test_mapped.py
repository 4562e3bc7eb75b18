"""Weights memory-mapped from the model file and shared by every session: values, references, refusals, memory."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from cp_onnx.errors import CpOnnxError
from cp_onnx.models.runner import Runner, open_graph
from graph_passes.errors import GraphPassError
from graph_passes.mapped import load_mapped


def _matmul_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = x @ W + b, W big enough to be mapped, b small enough to stay inline."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", weight.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal(48).astype(np.float32)


@pytest.mark.parametrize("external", [False, True])
def test_mapped_weights_equal_onnx_load_and_stubs_point_at_their_bytes(tmp_path, weights, external):
    path = tmp_path / "model.onnx"
    onnx.save_model(_matmul_model(*weights), path, save_as_external_data=external, location="model.onnx.data", size_threshold=1024)
    light, arrays = load_mapped(path)
    reference = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    assert set(arrays) == {"W"}  # the 192-byte bias stays inline
    np.testing.assert_array_equal(arrays["W"], reference["W"])
    inline = {t.name: t for t in light.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inline["b"]), reference["b"])
    assert len(light.graph.node) == 2 and light.ByteSize() < 1024
    stub = inline["W"]
    assert stub.data_location == onnx.TensorProto.EXTERNAL and not stub.HasField("raw_data")
    onnx.external_data_helper.load_external_data_for_tensor(stub, str(tmp_path))  # onnx's own reader follows the reference
    np.testing.assert_array_equal(numpy_helper.to_array(stub), reference["W"])


def test_runner_over_a_path_matches_numpy_and_shares_one_mapping(tmp_path, weights):
    path = tmp_path / "model.onnx"
    onnx.save_model(_matmul_model(*weights), path)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    first, second = Runner(path, threads=1), Runner(path, threads=1)
    expected = x @ weights[0] + weights[1]
    for runner in (first, second):
        np.testing.assert_allclose(runner.session.run(["y"], {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert first.session.cp_onnx_weights[0] is second.session.cp_onnx_weights[0]
    assert open_graph(path)[1] is first.session.cp_onnx_weights[0]


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc for resident memory")
def test_sessions_do_not_copy_the_weights(tmp_path):
    """Three sessions over a 256 MB weight: anonymous memory grows by far less than one copy."""
    weight = np.random.default_rng(2).standard_normal((8192, 8192)).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx.save_model(_matmul_model(weight, np.zeros(8192, np.float32)), path, save_as_external_data=True, location="model.onnx.data")
    del weight
    before = _rss_anon_mb()
    runners = [Runner(path, threads=1) for _ in range(3)]
    x = np.ones((2, 8192), np.float32)
    for runner in runners:
        runner.session.run(["y"], {"x": x})
    assert _rss_anon_mb() - before < 64, "a session copied the mapped weights"


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, weights, location):
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(weights[0].tobytes())
    (folder / "link.bin").symlink_to(outside)
    model = _matmul_model(*weights)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights[0].nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, folder / "model.onnx")
    with pytest.raises(GraphPassError, match="not a file inside"):
        load_mapped(folder / "model.onnx")
    with pytest.raises(CpOnnxError, match="not a file inside"):
        Runner(folder / "model.onnx")


def test_external_data_shorter_than_its_shape_is_refused(tmp_path, weights):
    path = tmp_path / "model.onnx"
    onnx.save_model(_matmul_model(*weights), path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-400])
    with pytest.raises(GraphPassError, match="truncated"):
        load_mapped(path)


def test_a_damaged_file_is_one_clear_error(tmp_path, weights):
    path = tmp_path / "model.onnx"
    onnx.save_model(_matmul_model(*weights), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GraphPassError, match="re-export"):
        load_mapped(path)
