"""`cp-onnx apply` and `prune` for every runtime: a layer path written as an ONNX model folder (onnxruntime, and
onnxruntime-genai for genai builds), as a GGUF file (llama.cpp), or as a mergekit passthrough config (PyTorch).

A GGUF output is written from a GGUF: the file given as MODEL, a packaged model's, or the one a cp-onnx folder was
exported from (its manifest). Neither a GGUF nor a mergekit output needs the ONNX export, so with a GGUF in hand
none is made.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder, open_model
from cp_onnx.outputs import gguf_file, mergekit

Log = Callable[[str], None]


@dataclass
class Model:
    """What the user named as MODEL: a GGUF (file or packaged), or a model folder opened (exported) on demand."""

    name: str
    gguf: Path | None = None
    checkpoint: str | None = None  # the Hugging Face checkpoint, for mergekit
    _folder: ModelFolder | None = None

    def folder(self, log: Log) -> ModelFolder:
        if self._folder is None:
            self._folder = open_model(self.name, log=log)
        return self._folder

    def num_layers(self, log: Log) -> int:
        return gguf_file.block_count(gguf_file.open_gguf(self.gguf)) if self.gguf is not None else self.folder(log).num_layers

    def source_gguf(self, log: Log) -> Path:
        if self.gguf is None:
            folder = self.folder(log)
            self.gguf = gguf_file.source_gguf(folder.manifest, folder.path, log=log)
        return self.gguf


def is_gguf(path) -> bool:
    return path is not None and Path(str(path)).suffix.lower() == ".gguf"


def resolve_model(name: str | Path, log: Log = print) -> Model:
    """MODEL as apply and prune take it: a .gguf file or a packaged model's name (no export), else a model folder."""
    from exporters.sources import PACKAGED

    text = str(name)
    if text in PACKAGED:
        from exporters.pipeline import cache_root
        from exporters.sources import packaged_source

        try:
            path = packaged_source(text, log, cache_root(None)).path
        except Exception as exc:  # ExportError: the package could not be installed
            raise CpOnnxError(str(exc)) from None
        return Model(text, gguf=path, checkpoint=PACKAGED[text].checkpoint)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Model(text, gguf=path)
    folder = open_model(text, log=log)
    return Model(text, checkpoint=_checkpoint(folder.manifest), _folder=folder)


def _checkpoint(manifest: dict) -> str | None:
    """The Hugging Face checkpoint a folder was exported from: its source folder, or a packaged GGUF's origin."""
    from exporters.sources import PACKAGED

    kind, source = manifest.get("source_kind"), manifest.get("source")
    if kind == "hf":
        return source
    return PACKAGED[source].checkpoint if kind == "package" and source in PACKAGED else None


def apply_outputs(model: str | Path, spec, *, out: Path | None = None, mergekit_out: Path | None = None, checkpoint: str | None = None,
                  dtype: str | None = None, log: Log = print) -> list[Path]:
    """Write the model with the edit ``spec`` made (an ``Edit``, its text such as ``I:J`` or a layer path, or a mergekit YAML
    file): to ``out`` (a folder, or a .gguf file) and/or to ``mergekit_out`` (a passthrough config naming ``checkpoint``)."""
    from cp_onnx.models.apply import apply

    if out is None and mergekit_out is None:
        raise CpOnnxError("give --out (a folder, or OUT.gguf) and/or --mergekit OUT.yml")
    target = resolve_model(model, log)
    count = target.num_layers(log)
    edit = mergekit.read_edit(spec, count)
    if edit.removed_heads and (is_gguf(out) or mergekit_out is not None):
        raise CpOnnxError("GGUF and mergekit outputs change whole layers; remove heads into a model folder (--out FOLDER)")
    layers = edit.path(count)
    written = []
    if out is not None:
        out = Path(out)
        written.append(gguf_file.write_gguf_path(target.source_gguf(log), layers, out, log=log) if is_gguf(out)
                       else apply(target.folder(log), edit, out, log=log))
    if mergekit_out is not None:
        written.append(write_mergekit(target, layers, Path(mergekit_out), checkpoint, dtype, log))
    return written


def prune_gguf(model: str | Path, removed: Sequence[int], out: Path, *, log: Log = print) -> Path:
    """Write ``out``, a GGUF without the layers ``removed`` (the rest in order)."""
    target = resolve_model(model, log)
    count = target.num_layers(log)
    removed = sorted({int(layer) for layer in removed})
    if not removed or any(not 0 <= layer < count for layer in removed) or len(removed) >= count:
        raise CpOnnxError(f"cannot remove layers {removed} of this {count}-layer model: give layers 0..{count - 1}, fewer than all")
    return gguf_file.write_gguf_path(target.source_gguf(log), [l for l in range(count) if l not in removed], out, log=log)


def write_mergekit(target: Model, layers: list[int], out: Path, checkpoint: str | None, dtype: str | None, log: Log) -> Path:
    checkpoint = checkpoint or target.checkpoint
    if not checkpoint:
        raise CpOnnxError(f"cp-onnx does not know the Hugging Face checkpoint {target.name} came from; name it with --mergekit-model ORG/NAME")
    dtype = dtype or checkpoint_dtype(Path(checkpoint))
    path = mergekit.write_config(layers, checkpoint, out, dtype=dtype)
    log(f"wrote {path}: mergekit passthrough config of {checkpoint}, {len(mergekit.slices(layers))} slices")
    return path


def checkpoint_dtype(folder: Path) -> str:
    """The dtype a local checkpoint's config.json records (the merged model keeps it), else bfloat16 (a hub name)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "bfloat16"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return dtype if dtype in mergekit.DTYPES else "bfloat16"
