"""Open an ONNX model without reading its weights: the graph with stubs, the weights memory-mapped.

``onnx.load`` copies every weight into protobuf memory, and handing that to onnxruntime copies it
again: a 6 GB model then needs 12-18 GB. Here the graph is parsed with its initializers' data left
out (the file's protobuf fields are walked to find where each tensor's bytes lie), and each big
weight becomes a read-only ``numpy.memmap`` of those bytes, in the model file itself or in its
external data file. Every session and pass of a process can then share one copy of the weights,
which the kernel pages in as they are read and may drop again under memory pressure.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from graph_passes import limits
from graph_passes.errors import GraphPassError
from graph_passes.graph_io import EXTERNAL_MIN_BYTES, external_stub

# Protobuf field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def load_mapped(path: str | Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model at ``path`` with its big initializers as stubs, and those weights by name, memory-mapped read-only.

    Each stub is a true external-data reference (file relative to the model's folder, offset, length),
    so a reader that does not take the mapped arrays can still find the bytes.

    Small tensors, and tensors numpy cannot hold as they are (bfloat16, 4-bit), stay inline in the graph.
    External data must lie inside the model's folder and be as long as the tensor's shape says; no
    tensor may declare more than ``limits.tensor_limit()`` bytes (checked before anything is read).
    """
    path = Path(path)
    if not path.is_file():
        raise GraphPassError(f"no ONNX model at {path}; give the path of a model.onnx file")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise GraphPassError(f"{path} is empty; re-export the model")
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _split(buffer, path)
    except GraphPassError:
        raise
    except (IndexError, ValueError, DecodeError) as exc:
        raise GraphPassError(f"cannot read {path} as an ONNX model ({type(exc).__name__}: {exc}); re-export it") from None
    finally:
        buffer.close()


def _split(buffer: mmap.mmap, path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    fields = _fields(buffer, 0, len(buffer))
    graphs = [f for f in fields if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != _BYTES:
        raise GraphPassError(f"{path} is not an ONNX model (no graph); re-export it")
    _, _, _, graph_start, graph_end = graphs[0]
    graph_fields = _fields(buffer, graph_start, graph_end)
    weights: dict[str, np.ndarray] = {}
    graph = bytearray()
    for number, wire, tag_start, start, end in graph_fields:
        if number != _GRAPH_INITIALIZER:
            graph += buffer[tag_start:end]
            continue
        tensor = _tensor(buffer, start, end, path, weights)
        graph += _encode_field(_GRAPH_INITIALIZER, tensor.SerializeToString())
    model = bytearray()
    for number, wire, tag_start, start, end in fields:
        model += _encode_field(_MODEL_GRAPH, bytes(graph)) if number == _MODEL_GRAPH else buffer[tag_start:end]
    proto = onnx.ModelProto.FromString(bytes(model))
    limits.check_graph(proto.graph)  # Constant / ConstantOfShape declarations, inline bytes against their shapes
    return proto, weights


def _tensor(buffer: mmap.mmap, start: int, end: int, path: Path, weights: dict[str, np.ndarray]) -> onnx.TensorProto:
    """One initializer as a stub whose weight went into ``weights``, or as it is (small or not mappable)."""
    header, raw = bytearray(), None
    for number, wire, tag_start, value_start, value_end in _fields(buffer, start, end):
        if number == _TENSOR_RAW_DATA:
            raw = (value_start, value_end)
        else:
            header += buffer[tag_start:value_end]
    tensor = onnx.TensorProto.FromString(bytes(header))
    limits.declared_bytes(tensor.dims, tensor.data_type, f"weight {tensor.name!r}")  # before any byte of it is read
    dtype = _numpy_dtype(tensor.data_type)
    if raw is not None:
        offset, length = raw[0], raw[1] - raw[0]
        if dtype is None or length < EXTERNAL_MIN_BYTES:
            tensor.raw_data = bytes(buffer[raw[0] : raw[1]])
            return tensor
        weights[tensor.name] = _map(path, offset, length, tensor, dtype)
        return external_stub(tensor, path.name, offset, length)
    if tensor.data_location == onnx.TensorProto.EXTERNAL and dtype is not None:
        entries = {e.key: e.value for e in tensor.external_data}
        data = _inside(path.parent, entries.get("location", ""), tensor.name)
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else data.stat().st_size - offset
        weights[tensor.name] = _map(data, offset, length, tensor, dtype)
        return external_stub(tensor, str(data.relative_to(path.parent.resolve())), offset, length)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # a type numpy cannot map: read it into the graph
        _inside(path.parent, next((e.value for e in tensor.external_data if e.key == "location"), ""), tensor.name)
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return tensor


def _map(path: Path, offset: int, length: int, tensor: onnx.TensorProto, dtype: np.dtype) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.dims)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if length != expected:
        raise GraphPassError(f"weight {tensor.name!r} holds {length} bytes but its shape {list(shape)} needs {expected}; the model file is damaged: re-export it")
    if offset < 0 or offset + length > path.stat().st_size:
        raise GraphPassError(f"weight {tensor.name!r} lies past the end of {path.name} (offset {offset}, {length} bytes); the file is truncated: re-export the model")
    array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    # onnxruntime's kernels expect element-aligned data; a weight at an odd offset inside a protobuf is copied.
    return array if array.ctypes.data % dtype.itemsize == 0 else np.array(array)


def _inside(folder: Path, location: str, name: str) -> Path:
    """The external data file ``location``, refused if it leads out of the model's folder."""
    target = (folder / location).resolve()
    if not location or not target.is_relative_to(folder.resolve()) or not target.is_file():
        raise GraphPassError(f"weight {name!r} names external data {location!r}, which is not a file inside {folder}; "
                             "re-export the model or keep its data file beside model.onnx")
    return target


def _numpy_dtype(data_type: int) -> np.dtype | None:
    """The numpy type of an ONNX element type, where onnxruntime can take it from numpy as it is."""
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16, onnx.TensorProto.UNDEFINED):
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.type.__module__ == "numpy" and dtype.kind in "biuf" else None


def _fields(buffer, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """The protobuf fields in ``buffer[start:end]``: (number, wire type, tag start, value start, value end)."""
    found, at = [], start
    while at < end:
        tag_start = at
        key, at = _varint(buffer, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, value_end = _varint(buffer, at)
        elif wire == _BYTES:
            length, at = _varint(buffer, at)
            value_end = at + length
        elif wire == _FIXED64:
            value_end = at + 8
        elif wire == _FIXED32:
            value_end = at + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {tag_start}")
        if value_end > end:
            raise ValueError(f"field {number} at byte {tag_start} runs past its message")
        found.append((number, wire, tag_start, at, value_end))
        at = value_end
    return found


def _varint(buffer, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError(f"malformed varint before byte {at}")


def _encode_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _BYTES) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
