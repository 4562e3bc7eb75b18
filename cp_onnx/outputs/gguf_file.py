"""A GGUF file whose decoder layers run along a layer path (a duplicated circuit, removed layers), for llama.cpp and
every other GGUF runtime: tensors ``blk.N.*`` renumbered along the path, ``{arch}.block_count`` set to the path's
length, per-layer metadata arrays reordered with it, every other key copied as it is, each tensor's bytes copied
unchanged (quantized types stay quantized).

GGUF cannot share a tensor between two layers: llama.cpp's reader requires each tensor's data to start where the
previous one's ends (``gguf.cpp``: "tensor ... has offset ..., expected ..."), so two tensor entries cannot point at
the same bytes. A repeated layer's tensors are therefore stored once per occurrence and the file grows by the
repeated layers' share of the weights. The file is read through a memory map and written tensor by tensor, so
nothing near the model's size is held in memory.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from cp_onnx.errors import CpOnnxError
from exporters.folders import sha256_files
from graph_passes.layer_path import check_path, format_path

INSTALL_HINT = "pip install gguf (it comes with cp-onnx's export extra)"
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
PATH_KEY = "cp_onnx.layer_path"  # the layer path a written file runs, in layer-path syntax (runtimes ignore unknown keys)
HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # GGUFReader's view of the header, rewritten by the writer
# Architectures whose runtimes choose a layer's kind (sliding-window or global attention, ...) from its position in
# the stack: after renumbering, a moved layer would run as another kind, so its GGUF would not be the routed model.
POSITIONAL_LAYERS = ("gemma2", "gemma3", "gemma3n", "cohere2", "llama4", "gpt-oss", "exaone4")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CpOnnxError(f"writing a GGUF file needs the gguf package; {INSTALL_HINT}") from None
    return gguf


def open_gguf(path: Path):
    """A GGUFReader over ``path`` (memory-mapped), or a one-line error for a file that is not a readable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise CpOnnxError(f"{path} does not exist; give a .gguf file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CpOnnxError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CpOnnxError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-download or re-convert it") from None


def _value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def architecture(reader) -> str:
    arch = _value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise CpOnnxError("the GGUF file names no general.architecture; re-convert it with llama.cpp's convert_hf_to_gguf.py")
    return arch


def block_count(reader) -> int:
    """The number of decoder layers the file declares (``{arch}.block_count``)."""
    count = _value(reader, f"{architecture(reader)}.block_count")
    if not isinstance(count, int) or count < 1:
        raise CpOnnxError(f"the GGUF file has no {architecture(reader)}.block_count; re-convert it with llama.cpp's convert_hf_to_gguf.py")
    return count


def write_gguf_path(source: Path, layers: Sequence[int], out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out``: the GGUF ``source`` with its layers run along ``layers`` (repeats and omissions allowed)."""
    gguf = _gguf()
    source, out = Path(source), Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise CpOnnxError(f"{out} does not end in .gguf; name the GGUF file to write OUT.gguf")
    if out.exists() and (out.is_dir() or out.resolve() == source.resolve()):
        raise CpOnnxError(f"{out} is {'a folder' if out.is_dir() else 'the source file'}; choose another .gguf file to write")
    reader = open_gguf(source)
    arch, count = architecture(reader), block_count(reader)
    layers = list(check_path(layers, count))
    _check_routable(reader, arch, source)
    writer_stage = _stage(out)
    try:
        writer = gguf.GGUFWriter(str(writer_stage), arch)
        _copy_metadata(gguf, reader, writer, arch, count, layers, log)
        tensors = _routed_tensors(reader, layers, count, source)
        for name, tensor in tensors:
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in tensors:  # in the order of the tensor infos: the writer pops them first to last
            writer.write_tensor_data(tensor.data)
        writer.close()
        os.replace(writer_stage, out)
    except BaseException as exc:
        writer_stage.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CpOnnxError(f"cannot write {out} ({exc.strerror or exc}); free space on that disk or choose another path") from None
        raise
    repeated = len(layers) - len(set(layers))
    why = f"; GGUF cannot share tensors, so {repeated} repeated layers are stored again" if repeated else ""
    log(f"wrote {out}: {len(layers)} layers ({format_path(layers)}) instead of {count}, {out.stat().st_size / 1e6:.1f} MB "
        f"(source {source.stat().st_size / 1e6:.1f} MB{why})")
    return out


def _stage(out: Path) -> Path:
    """An empty temporary file beside ``out``, renamed to it when complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise CpOnnxError(f"cannot write to {out.parent} ({exc.strerror}); choose another output path") from None
    os.close(handle)
    return Path(name)


def _check_routable(reader, arch: str, source: Path) -> None:
    routed = _value(reader, PATH_KEY)
    if routed is not None:
        raise CpOnnxError(f"{source} is already routed (layer path {routed}); apply to the original GGUF it was written from")
    if (_value(reader, "split.count") or 1) > 1:
        raise CpOnnxError(f"{source} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    if arch in POSITIONAL_LAYERS:
        raise CpOnnxError(f"{arch} runtimes give each layer its attention kind by its position in the stack, so renumbered layers would not "
                          f"run as they did; apply the path as ONNX (cp-onnx apply MODEL --out FOLDER) instead")


def _copy_metadata(gguf, reader, writer, arch: str, count: int, layers: list[int], log: Callable[[str], None]) -> None:
    """Every key of ``reader`` into ``writer``: block_count set, arrays with one entry per layer reordered along the path."""
    for key, field in reader.fields.items():
        if key in HEADER_FIELDS or key == "general.architecture":  # the writer writes these itself
            continue
        kind = field.types[0]
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        if key == f"{arch}.block_count":
            writer.add_key_value(key, len(layers), kind)
            continue
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) > 2:
                raise CpOnnxError(f"the GGUF key {key} holds nested arrays, which cp-onnx cannot copy; re-convert the model with llama.cpp")
            sub = field.types[1]
            values = [bytes(field.parts[i]) if sub == gguf.GGUFValueType.STRING else field.parts[i].tolist()[0] for i in field.data]
            if not values:
                log(f"leaving out the empty GGUF array {key} (the gguf package cannot write empty arrays)")
                continue
            if key.startswith(f"{arch}.") and len(values) == count:  # one value per layer (per-layer head counts, say)
                values = [values[layer] for layer in layers]
            writer.add_key_value(key, values, kind, sub_type=sub)
        else:
            value = bytes(field.parts[-1]) if kind == gguf.GGUFValueType.STRING else field.parts[-1].tolist()[0]
            writer.add_key_value(key, value, kind)
    writer.add_string(PATH_KEY, format_path(layers))


def _routed_tensors(reader, layers: list[int], count: int, source: Path) -> list[tuple[str, object]]:
    """(new name, source tensor) in file order: the tensors before the first layer's, each path position's layer
    renumbered to its position, then the tensors after the layers (output norm, output)."""
    per_layer: dict[int, list[tuple[str, object]]] = {layer: [] for layer in range(count)}
    before, after = [], []
    for tensor in reader.tensors:
        match = BLOCK.match(tensor.name)
        if match is None:
            (after if any(per_layer.values()) else before).append((tensor.name, tensor))
            continue
        layer = int(match[1])
        if layer >= count:
            raise CpOnnxError(f"{source} has the tensor {tensor.name} beyond its block_count {count}; re-convert the model")
        per_layer[layer].append((match[2], tensor))
    empty = [layer for layer in set(layers) if not per_layer[layer]]
    if empty:
        raise CpOnnxError(f"{source} has no blk.{empty[0]}.* tensors; re-convert the model")
    routed = [(f"blk.{position}.{rest}", tensor) for position, layer in enumerate(layers) for rest, tensor in per_layer[layer]]
    return before + routed + after


def source_gguf(manifest: dict, folder: Path, *, log: Callable[[str], None] = print) -> Path:
    """The GGUF file a cp-onnx folder was exported from (its manifest's source), checked to hold the same weights."""
    kind = manifest.get("source_kind")
    if kind not in ("gguf", "package"):
        raise CpOnnxError(f"{folder} was exported from a {kind or 'non-GGUF'} source, not a GGUF file; give the GGUF itself "
                          "(cp-onnx apply MODEL.gguf --out OUT.gguf) or write an ONNX folder (--out FOLDER)")
    if manifest.get("layer_path"):
        raise CpOnnxError(f"{folder} is already routed (layer path {manifest['layer_path']}); apply to the original model it was derived from")
    from exporters.pipeline import cache_root  # torch-free: the cache folder where packaged GGUFs are assembled
    from exporters.sources import resolve_source

    try:
        path = resolve_source(manifest["source"], log, cache_root(None)).path
    except Exception as exc:  # ExportError: the GGUF moved or its package is gone
        raise CpOnnxError(f"cannot find the GGUF {folder} was exported from ({exc})") from None
    if manifest.get("weights_sha256") and sha256_files([path]) != manifest["weights_sha256"]:
        raise CpOnnxError(f"{path} is not the GGUF {folder} was exported from (its sha256 differs); give the GGUF itself")
    return path
