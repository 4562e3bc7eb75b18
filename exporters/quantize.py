"""Weight-only quantization of exported graphs with onnxruntime's own quantizer (onnx + onnxruntime only, no torch).

int4 and int8 both become ``com.microsoft:MatMulNBits`` (symmetric, blocks of 32 along K, accuracy level 4).
For int8 the alternative was ``quantize_dynamic(weight_type=QInt8)`` (MatMulInteger); measured on random
Llamas (2 cores, logits max difference over max |logit| against fp32):

    model (hidden, layers)   MatMulNBits bits=8          quantize_dynamic QInt8
    tiny (64, 3)             1.3e-2, 1.1 ms / batch      2.4e-2, 0.9 ms / batch
    medium (512, 4)          2.4e-2, 163 ms / batch      7.5e-2, 67 ms / batch

quantize_dynamic runs faster (about 2.4x on the medium model), MatMulNBits keeps the logits about 2-3x
closer and leaves the embedding in float32 (quantize_dynamic quantizes its Gather too, so even the
``embed`` activation would differ). cp-onnx quantizes to analyse a model it cannot hold in float32, and
the analysis is only as good as its agreement with the float32 model: closeness wins, hence MatMulNBits.
Output tensor names stay as they were, so discovery finds the same layers.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import ExportError
from .graph_files import DATA_SUFFIX

DEFAULT_PRECISION = "fp32"
BITS = {"int8": 8, "int4": 4}
PRECISIONS = (DEFAULT_PRECISION, *BITS)
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # activations quantized to int8 inside MatMulNBits: the fast CPU kernels
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` if it is one of ``allowed``, else a one-line ExportError."""
    if precision not in allowed:
        raise ExportError(f"unknown precision {precision!r}; use one of {', '.join(allowed)}")
    return precision


def quantize_graph(folder: Path, rel: str, precision: str) -> tuple[str, str]:
    """Replace ``folder/rel`` (and its external data ``rel`` + DATA_SUFFIX, where it has one) by its weight-only quantized form.

    Returns the graph and data paths relative to ``folder``.
    Memory: one float weight at a time. The weights are memory-mapped and each MatMul's is handed to
    onnxruntime's quantizer alone, so a 3B model's 12.8 GB of float32 weights quantize in a few GB
    (quantizing the whole loaded model, as MatMulNBitsQuantizer.process does, holds them twice).
    """
    from graph_passes.graph_io import save
    from graph_passes.mapped import load_mapped

    path = Path(folder) / rel
    model, mapped = load_mapped(path)
    quantize_model(model, mapped, BITS[check_precision(precision)])
    # Always external data: graph_io.save starts each big tensor on a page, so the analysis maps the weights
    # as they lie (inside one protobuf file a float32 tensor sits at any offset and must be copied to be aligned).
    save(model, path, external_data=True)  # atomic; its data (rel + DATA_SUFFIX) replaces the float32 one
    return rel, rel + DATA_SUFFIX


def quantize_model(model, mapped: dict, bits: int) -> None:
    """Rewrite ``model`` in place: each MatMul by a constant weight becomes MatMulNBits, as onnxruntime's quantizer does.

    ``mapped`` holds the weights that ``model`` has as external stubs (graph_passes.mapped); the ones left
    float afterwards (embeddings, norms) are copied into the model, the rest are never read in full.
    The node rewrite is onnxruntime's own (``quantize`` of its node quantizer, the same call its
    ``process`` makes per node), so the result is what MatMulNBitsQuantizer writes for a top-level graph.
    """
    from onnx import GraphProto

    quantizer = new_quantizer(model, bits)
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    quantized: dict[str, list] = {}  # weight name -> the initializers its quantized form adds (a shared weight once)
    nodes = []
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name not in weights:
            nodes.append(node)
            continue
        scratch = GraphProto()  # the quantizer looks weights up in the graphs it is given: this one holds one weight
        scratch.initializer.append(_with_data(weights[name], mapped))
        with quiet(QUANTIZER_LOGGER):
            replaced = quantizer.node_quantizer.quantize(node, [scratch])
        nodes.extend(replaced)
        if replaced != [node]:
            quantized.setdefault(name, list(scratch.initializer)[1:])
    model.opset_import.extend([] if any(o.domain == "com.microsoft" for o in model.opset_import) else
                              [onnx.helper.make_opsetid("com.microsoft", 1)])
    nodes = _fold_lone_transposes(nodes, weights, mapped)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {value for node in nodes for value in node.input}
    kept = [_with_data(weights[name], mapped) for name in weights if name in used]
    added = [tensor for tensors in quantized.values() for tensor in tensors]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + added)


def _with_data(tensor, mapped: dict):
    """``tensor`` with its bytes: a mapped weight's stub read in full, any other tensor as it is."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(mapped[tensor.name]), tensor.name) if tensor.name in mapped else tensor


def _fold_lone_transposes(nodes: list, weights: dict, mapped: dict) -> list:
    """Nodes with each Transpose of a float weight that nothing else reads replaced by the transposed weight.

    onnxruntime-genai's builder feeds a tied embedding's Gather from Transpose(lm_head weight), sharing one
    float copy with the head's MatMul. Once that MatMul is quantized the float weight serves only the
    Transpose, which onnxruntime then runs on every call (1.6 GB on a 3B model: too big to fold itself).
    Stored transposed instead, the file holds the same bytes and a run copies nothing."""
    from onnx import helper, numpy_helper

    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    folded = []
    for node in nodes:
        source = node.input[0] if node.op_type == "Transpose" and node.input else None
        if source not in weights or readers[source] != 1 or helper.tensor_dtype_to_np_dtype(weights[source].data_type).kind != "f":
            folded.append(node)
            continue
        array = np.asarray(mapped[source]) if source in mapped else numpy_helper.to_array(weights[source])
        perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
        weights[node.output[0]] = numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), node.output[0])
    return folded


def new_quantizer(model, bits: int):
    """onnxruntime's MatMulNBitsQuantizer over ``model`` (quantizing every MatMul with a constant weight)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:  # it needs onnx-ir, which onnxruntime does not declare
        raise ExportError(f"onnxruntime's quantizer cannot be imported ({err}); pip install onnx-ir") from None
    finally:
        root.handlers[:], root.level = handlers, level  # its import calls logging.basicConfig(INFO) for everyone
    return MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """Only warnings from logger ``name`` for the duration (the quantizer logs a line per node at INFO)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
