"""Reading and writing ONNX models of any size: weights optional on load, atomic writes, external data over 2 GB."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import numpy_helper

from graph_passes.errors import GraphPassError

# protobuf refuses to serialise a message of 2 GB or more; stay clear of it.
PROTO_LIMIT = 2**31 - 2**26
# Initializers at least this big go to the external data file; smaller ones (shape constants) stay inline.
EXTERNAL_MIN_BYTES = 1024
# Big tensors start on a page boundary so onnxruntime can memory-map them.
PAGE = 4096


def load(path: str | Path, weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX model; ``weights=False`` leaves external-data weights on disk (references kept)."""
    path = Path(path)
    if not path.is_file():
        raise GraphPassError(f"no ONNX model at {path}; give the path of a model.onnx file")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as exc:  # protobuf DecodeError, missing external data file, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        failure = GraphPassError(f"cannot read {path} as an ONNX model ({detail}); re-export it")
    if weights and "hard link" in str(failure):
        # onnx refuses data files with several hard links (a guard for untrusted models), and `save` hard-links
        # the weights a routed model shares with its source: read them here, from files inside the model's folder.
        model = load(path, weights=False)
        _read_external(model, path.parent)
        return model
    raise failure


def _read_external(model: onnx.ModelProto, folder: Path) -> None:
    """Fill the external-data initializers of ``model`` from their files under ``folder``, in place."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        source = (folder / info.get("location", "")).resolve()
        if not source.is_relative_to(folder.resolve()) or not source.is_file():
            raise GraphPassError(f"tensor {tensor.name!r} points to {info.get('location')!r}, not a file in {folder}; re-export the model")
        with open(source, "rb") as handle:
            handle.seek(int(info.get("offset", 0)))
            data = handle.read(int(info["length"])) if "length" in info else handle.read()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


def save(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None, weights_dir: str | Path | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; weights go to ``<name>.data`` beside it when over 2 GB.

    ``external_data`` forces (True) or forbids (False) the data file; None decides by size.
    ``weights_dir`` is where weights left on disk by ``load(..., weights=False)`` live (default:
    the destination folder); files found there are hard-linked (or copied) beside ``path``.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise GraphPassError(f"cannot write {path}: folder {folder} does not exist; create it first")
    referenced = _external_locations(model)
    if referenced and external_data is False:
        raise GraphPassError(f"cannot write {path} as one file: its weights were not loaded; load it with weights=True")
    if external_data is None:
        external_data = over_proto_limit(model)
    data_name = _free_name(f"{path.name}.data", referenced)
    light, chunks = _split_weights(model, data_name if external_data else None)
    written: list[tuple[Path, Path]] = []
    try:
        for location in referenced:
            placed = _place_beside(Path(weights_dir or folder) / location, folder / location)
            written.extend([placed] if placed else [])
        if chunks:
            written.append((_write_temp(folder, data_name, chunks), folder / data_name))
        try:
            payload = light.SerializeToString()
        except ValueError as exc:  # over 2 GB even without the initializers: huge Constant nodes
            raise GraphPassError(f"cannot write {path}: the graph is too big for one protobuf ({exc}); move its constants to initializers") from None
        written.append((_write_temp(folder, path.name, [(0, payload)]), path))
    except BaseException as exc:
        for temp, _ in written:
            temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk or a file-size limit: the previous file, if any, is untouched
            raise GraphPassError(f"cannot write {path} ({exc.strerror or exc}); free space on that disk or choose another folder") from None
        raise
    for temp, final in written:  # data first, the model last: a reader never sees a model without its data
        os.replace(temp, final)
    return path


def over_proto_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big for one protobuf file (protobuf cannot even size a message past 2 GB)."""
    try:
        return model.ByteSize() > PROTO_LIMIT
    except EncodeError:
        return True


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose big initializers are stubs (shape and type only), for shape inference."""
    stubs = []
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) >= EXTERNAL_MIN_BYTES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            stubs.append(external_stub(tensor, "weightless", 0, tensor_nbytes(tensor)))
        else:
            stubs.append(tensor)
    return with_initializers(model, stubs)


def _split_weights(model: onnx.ModelProto, data_name: str | None) -> tuple[onnx.ModelProto, list[tuple[int, bytes]]]:
    """The model with big in-memory initializers turned into references to ``data_name``, and their bytes."""
    if data_name is None:
        return model, []
    initializers, chunks, offset = [], [], 0
    for tensor in model.graph.initializer:
        size = tensor_nbytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or size < EXTERNAL_MIN_BYTES:
            initializers.append(tensor)
            continue
        data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        offset = -(-offset // PAGE) * PAGE if len(data) >= PAGE else offset
        chunks.append((offset, data))
        initializers.append(external_stub(tensor, data_name, offset, len(data)))
        offset += len(data)
    return with_initializers(model, initializers), chunks


def with_initializers(model: onnx.ModelProto, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A copy of ``model`` with another initializer list, without copying the original's weights."""
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    graph.initializer.extend(initializers)
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(copy, field, value)
    copy.graph.CopyFrom(graph)
    return copy


def _copy_field(target, field, value) -> None:
    # protobuf 6+ drops FieldDescriptor.label in favour of is_repeated
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def external_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in tensor.external_data if e.key == "length"), 0)
    if tensor.HasField("raw_data"):  # from the shape: reading raw_data would copy the bytes (a second on a 500 MB model)
        itemsize = _ITEMSIZE.get(tensor.data_type)
        return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize if itemsize else len(tensor.raw_data)
    return tensor.ByteSize()


# Bytes per element of the fixed-size element types (sub-byte, string and unknown types read raw_data's length).
_ITEMSIZE = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """Data files that initializers still point to (weights not loaded into memory)."""
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(locations)


def _free_name(name: str, taken: list[str]) -> str:
    """``name``, or ``name`` with a counter, so new weights never overwrite a file the model still reads."""
    stem, k = name, 0
    while name in taken:
        k += 1
        name = f"{stem}.{k}"
    return name


def _write_temp(folder: Path, final_name: str, chunks: list[tuple[int, bytes]]) -> Path:
    handle, temp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            for offset, data in chunks:
                out.seek(offset)
                out.write(data)
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp)


def _place_beside(source: Path, target: Path) -> tuple[Path, Path] | None:
    """A temp file in ``target``'s folder with ``source``'s content (hard link when possible); None if already there."""
    if not source.is_file():
        raise GraphPassError(f"the model's weights file {source} does not exist; pass weights_dir= the folder it was loaded from")
    if target.exists() and os.path.samefile(source, target):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    os.unlink(temp)
    try:
        os.link(source, temp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, temp)
    return Path(temp), target
