"""Size limits checked on a graph before anything is allocated for it.

A model file is small but may declare a tensor of terabytes: an initializer whose dims multiply to
2**60, a Constant node likewise, or a ConstantOfShape fed a constant shape. onnxruntime allocates
what the graph declares (and the kernel's overcommit lets it "succeed" until the out-of-memory
killer ends the process), so every graph is checked here first, with Python integers (numpy's int64
products wrap around silently).

One limit, in bytes per tensor: $CP_ONNX_MAX_TENSOR_GB, by default this machine's physical memory.
"""
from __future__ import annotations

import math
import os

import onnx

from graph_passes.errors import GraphPassError

TENSOR_LIMIT_ENV = "CP_ONNX_MAX_TENSOR_GB"
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def physical_memory() -> int:
    """Bytes of RAM in this machine (16 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def tensor_limit() -> int:
    """The largest tensor a graph may declare, in bytes."""
    text = os.environ.get(TENSOR_LIMIT_ENV)
    if not text:
        return physical_memory()
    try:
        value = float(text)
    except ValueError:
        raise GraphPassError(f"${TENSOR_LIMIT_ENV} must be a number of gigabytes, not {text!r}") from None
    if not value > 0:
        raise GraphPassError(f"${TENSOR_LIMIT_ENV} must be a positive number of gigabytes, not {text!r}")
    return int(value * 1e9)


def gigabytes(size: int) -> str:
    """``size`` bytes for a reader: GB up to a terabyte, then the largest unit that keeps the number short."""
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size / 1e9:.3g} GB"


def element_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX element type (None for strings and unknown types)."""
    if data_type in _PACKED_4BIT:
        return 4
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return None


def declared_bytes(dims, data_type: int, what: str) -> int:
    """Bytes a tensor of ``dims`` and ``data_type`` occupies, refused past the limit or with a negative dim."""
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise GraphPassError(f"{what} declares a negative dimension {dims}; the model file is damaged: re-export it")
    size = math.prod(dims) * (element_bits(data_type) or 8) // 8
    limit = tensor_limit()
    if size > limit:
        raise GraphPassError(f"{what} declares shape {dims} ({gigabytes(size)}), more than the {gigabytes(limit)} limit per tensor; "
                             f"if the model is genuine, raise it with {TENSOR_LIMIT_ENV}=N")
    return size


def check_tensor(tensor: onnx.TensorProto, what: str) -> None:
    """A known element type, the declared size within the limit, and inline data as long as the shape says
    (onnxruntime would read past short data; numpy fails on it with a traceback)."""
    if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in onnx.TensorProto.DataType.values():
        raise GraphPassError(f"{what} has no known element type ({tensor.data_type}); the model file is damaged: re-export it")
    size = declared_bytes(tensor.dims, tensor.data_type, what)
    bits = element_bits(tensor.data_type)
    if tensor.data_type == onnx.TensorProto.STRING and tensor.HasField("raw_data"):
        raise GraphPassError(f"{what} holds strings as raw bytes, which ONNX does not allow; the model file is damaged: re-export it")
    if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
        _check_typed_values(tensor, bits, what)
    # Every inline tensor's bytes are checked, however large it declares itself: ONNX shape inference's data propagation
    # (discovery runs it) materialises an integer Constant at its declared size, 8.6 GB for a [2**30] int64 Constant
    # holding 8 bytes in a 700 kB file (the fuzzer's kill). Reading raw_data copies it, once: after load_mapped, the big
    # initializers are mapped stubs and the tensors left inline are small.
    if tensor.data_location == onnx.TensorProto.EXTERNAL or bits is None or not tensor.HasField("raw_data"):
        return
    expected = (math.prod(int(d) for d in tensor.dims) * bits + 7) // 8 if bits == 4 else size
    if len(tensor.raw_data) != expected:
        raise GraphPassError(f"{what} holds {len(tensor.raw_data)} bytes but its shape {list(tensor.dims)} needs {expected}; "
                             "the model file is damaged: re-export it")


def _check_typed_values(tensor: onnx.TensorProto, bits: int | None, what: str) -> None:
    """Values held in the typed field (float_data, int32_data, ...) as many as the shape says."""
    count = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count *= 2
    elif bits == 4:
        count = (count + 1) // 2
    try:
        held = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))
    except (KeyError, ValueError, AttributeError):
        return
    if held != count:  # len() of a repeated field is free, whatever its size
        raise GraphPassError(f"{what} holds {held} values but its shape {list(tensor.dims)} needs {count}; the model file is damaged: re-export it")


def check_graph(graph: onnx.GraphProto) -> None:
    """Refuse a graph (subgraphs included) declaring a tensor past the limit, before anything runs it; every
    name must be text (a damaged file gives protobuf bytes for a name that is not UTF-8, which no pass expects)."""
    _check_names(graph)
    constants = {t.name: t for t in graph.initializer}
    for tensor in graph.initializer:
        check_tensor(tensor, f"initializer {tensor.name!r}")
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                check_tensor(attribute.t, f"{node.op_type} node {_label(node)!r}")
            for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                check_graph(sub)
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in constants:
            _check_constant_of_shape(node, constants[node.input[0]])


def _check_constant_of_shape(node: onnx.NodeProto, shape: onnx.TensorProto) -> None:
    """A ConstantOfShape fed a constant shape makes a tensor of that shape: the shape is its declaration."""
    if shape.data_type != onnx.TensorProto.INT64 or shape.data_location == onnx.TensorProto.EXTERNAL:
        return
    dims = onnx.numpy_helper.to_array(shape).reshape(-1).tolist() if math.prod(shape.dims) <= 64 else []
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    data_type = value.data_type if value is not None else onnx.TensorProto.FLOAT
    declared_bytes(dims, data_type, f"ConstantOfShape node {_label(node)!r}")


def _check_names(graph: onnx.GraphProto) -> None:
    names = [graph.name, *(v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer))]
    for node in graph.node:
        names += [node.name, node.op_type, node.domain, *node.input, *node.output]
    if not all(isinstance(name, str) for name in names):
        bad = next(name for name in names if not isinstance(name, str))
        raise GraphPassError(f"the graph names a tensor or node {bad[:40]!r}, which is not UTF-8 text; the model file is damaged: re-export it")


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)
