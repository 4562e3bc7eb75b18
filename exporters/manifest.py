"""The model-folder manifest ``cp_onnx.json``: what was exported, from what, with which tools.

Torch-free: the analysis side reads manifests with this module alone. Fields: ``source`` (what export()
accepts to redo the export), ``source_kind`` (hf | gguf | package), ``weights_sha256`` (of the GGUF file,
or of the weights files concatenated in name order), the architecture (``family`` = config.model_type,
``kind`` = decoder | encoder, sizes), the tokenizer's ``bos_token_id`` / ``add_bos`` (tokenizer.json
prepends exactly one BOS), tool versions, the ``onnx`` paths relative to the folder (``model``,
``with_past``, and their external data ``model_data`` / ``with_past_data``, null when absent),
``layer_path`` (null until a circuit is applied), the ``cache_key`` of the export, the weights'
``precision`` (fp32 | int8 | int4) and the ``graph_format`` (optimum | genai). Manifests written before
the last two existed lack them and mean fp32 and optimum: read them with precision_of / graph_format_of.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

from cp_onnx import shapes  # the bounded JSON reader and schema check every cp-onnx input goes through
from cp_onnx.errors import CpOnnxError

from .errors import ExportError

MANIFEST_NAME = "cp_onnx.json"
FORMAT = "cp-onnx-model/1"

# Every manifest has at least these keys (others read them: keep them stable).
KEYS = (
    "format", "source", "source_kind", "weights_sha256", "family", "kind",
    "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
    "bos_token_id", "add_bos", "exporter", "onnx", "layer_path", "cache_key",
)
# Written by export(); absent from older manifests: eos_token_id (before EXPORT_VERSION 2), graph_sha256
# (the sha256 of each ONNX file, by its path in the folder: a cache entry changed since is exported again).
OPTIONAL_KEYS = ("eos_token_id", "graph_sha256")
# Written by export() since quantized and genai exports exist; older manifests lack them: these are their values.
DEFAULTS = {"precision": "fp32", "graph_format": "optimum"}
# manifest "exporter" field -> distribution whose version it records
TOOL_DISTRIBUTIONS = {"cp_onnx": "cp-onnx", "optimum": "optimum", "optimum_onnx": "optimum-onnx",
                      "transformers": "transformers", "torch": "torch", "onnx": "onnx",
                      "onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai"}  # quantizer, genai builder
SOURCE_CHECKOUT_VERSION = "0.1.0+source"  # cp-onnx run from a checkout that pip never installed
_TEXT = {"type": ["string", "null"]}
# The fields exporters read from a manifest (a cache entry's, an --out folder's or a source folder's), type-checked first.
_READ_SCHEMA = {"type": "object", "properties": {
    "source": _TEXT, "cache_key": _TEXT, "precision": _TEXT, "graph_format": _TEXT,
    "onnx": {"type": "object", "additionalProperties": _TEXT}, "graph_sha256": {"type": ["object", "null"], "additionalProperties": _TEXT}}}


def build_manifest(*, source: str, source_kind: str, weights_sha256: str, config, kind: str, tokenizer: dict,
                   onnx: dict, cache_key: str, precision: str = DEFAULTS["precision"],
                   graph_format: str = DEFAULTS["graph_format"]) -> dict:
    """The manifest of an export; ``config`` is the transformers config, ``tokenizer`` gives bos_token_id/add_bos."""
    heads = config.num_attention_heads
    return {
        "format": FORMAT,
        "source": source,
        "source_kind": source_kind,
        "weights_sha256": weights_sha256,
        "family": config.model_type,
        "kind": kind,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "bos_token_id": tokenizer["bos_token_id"],
        "add_bos": tokenizer["add_bos"],
        "eos_token_id": config.eos_token_id,
        "exporter": {field: tool_version(dist) for field, dist in TOOL_DISTRIBUTIONS.items()},
        "onnx": onnx,
        "layer_path": None,
        "cache_key": cache_key,
        "precision": precision,
        "graph_format": graph_format,
    }


def precision_of(manifest: dict) -> str:
    """The weights' precision an export was written with (fp32 for manifests that predate the field)."""
    return manifest.get("precision") or DEFAULTS["precision"]


def graph_format_of(manifest: dict) -> str:
    """The graph format of an export: optimum (also for manifests that predate the field) or genai."""
    return manifest.get("graph_format") or DEFAULTS["graph_format"]


def tool_version(dist: str) -> str | None:
    """Installed version of ``dist`` (None when absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_CHECKOUT_VERSION if dist == "cp-onnx" else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Check ``manifest`` has the manifest keys and write it atomically to ``folder/cp_onnx.json``."""
    missing = [key for key in KEYS if key not in manifest]
    if missing or manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest (missing keys {missing}, format {manifest.get('format')!r})")
    path = Path(folder) / MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: Path) -> dict:
    """Read and check ``folder/cp_onnx.json``; ExportError when it is missing, corrupt or incomplete."""
    path = Path(folder) / MANIFEST_NAME
    hint = "export the model again with `cp-onnx export SOURCE --out DIR`"
    if not path.is_file():
        raise ExportError(f"{folder} is not a cp-onnx model folder (no {MANIFEST_NAME}); {hint}")
    try:  # the one bounded JSON reader (size and nesting), shared with the analysis
        manifest = shapes.read_json(path, "manifest", hint)
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
            shapes.check(manifest, _READ_SCHEMA, str(path), hint)
    except (CpOnnxError, OSError) as err:
        raise ExportError(str(err) if isinstance(err, CpOnnxError) else f"{path} is unreadable ({err.strerror}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{path} is not a {FORMAT} manifest (format {str(found)[:60]!r}); {hint}")
    missing = [key for key in KEYS if key not in manifest]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}; {hint}")
    absent = [name for name in onnx_files(manifest) if not _inside(Path(folder), name)]
    if absent:
        raise ExportError(f"{folder} lists {', '.join(absent)} in {MANIFEST_NAME} but they are missing; {hint}")
    return manifest


def _inside(folder: Path, name: str) -> bool:
    """Whether the file ``name`` exists inside ``folder`` (a path leading out of it, or no file system can hold, is not)."""
    try:
        path = (folder / name).resolve()
        return path.is_relative_to(folder.resolve()) and path.is_file()
    except (OSError, ValueError):
        return False


def onnx_files(manifest: dict) -> list[str]:
    """The ONNX files (graphs and their external data) a manifest names, relative to its folder."""
    return [name for name in manifest["onnx"].values() if name]


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a readable cp-onnx manifest."""
    try:
        read_manifest(folder)
    except ExportError:
        return False
    return True
