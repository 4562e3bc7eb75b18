"""An exported model as the analysis sees it: the ONNX graph, its tokenizer and its manifest."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cp_onnx import inputs, shapes
from cp_onnx.errors import CpOnnxError

MANIFEST = "cp_onnx.json"
DEFAULT_SOURCE = "smollm2"
ONNX_MAGIC_HINT = "re-export it with `cp-onnx export SOURCE`"


@dataclass
class ModelFolder:
    """A folder written by ``cp-onnx export`` (or any folder holding an .onnx file and tokenizer.json)."""

    path: Path
    onnx_path: Path
    manifest: dict = field(default_factory=dict)
    _tokenizer: object = None

    @property
    def name(self) -> str:
        return self.manifest.get("source") or self.path.name

    @property
    def with_past_path(self) -> Path | None:
        """The graph with a KV cache the manifest names (``cp-onnx export --with-past``), or None."""
        relative = (self.manifest.get("onnx") or {}).get("with_past")
        path = _inside(self.path, relative) if relative else None
        return path if path is not None and path.is_file() else None

    @property
    def num_layers(self) -> int:
        """Layer count from the manifest, else by discovery on the graph (without its external weights)."""
        if isinstance(self.manifest.get("num_layers"), int):
            return self.manifest["num_layers"]
        import graph_passes  # discovery reads the graph; a manifest alone needs neither onnx nor the passes

        return graph_passes.discover(graph_passes.graph_io.load(self.onnx_path, weights=False)).num_layers

    @property
    def tokenizer(self):
        """The `tokenizers` tokenizer saved beside the model (no transformers, no torch)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> tuple[list[list[int]], int]:
        """Token ids per text (BOS as the exported tokenizer adds it), and how many texts were truncated."""
        token_lists, truncated = [], 0
        for text in texts:
            ids = _tokenizer_call(self.tokenizer.encode, text, where=self.path / "tokenizer.json").ids
            if max_length is not None and len(ids) > max_length:
                ids, truncated = ids[:max_length], truncated + 1
            token_lists.append(ids)
        return token_lists, truncated


def load_tokenizer(folder: Path):
    """Load ``tokenizer.json`` from a model folder, or say how to get one."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CpOnnxError(f"no tokenizer.json in {folder}; export the model with `cp-onnx export` or pass --tokenizer DIR")
    text = inputs.read_text(path, "tokenizer")  # within the file limit: a huge one would be parsed whole into memory
    # Its added tokens are checked before the tokenizers library builds its matcher for them, in time that grows with the
    # square of a token's length (100,000 characters took 21 s). json's own recursion bound (and the library's, at 128
    # levels) stop deep nesting; a scan first would double the time on a 33 MB vocabulary (Gemma).
    shapes.check(shapes.parse_json(text, path, "re-export the model", scan=False), TOKENIZER_SCHEMA, str(path), "re-export the model")
    tokenizer = _tokenizer_call(Tokenizer.from_str, text, where=path)
    tokenizer.no_truncation()  # cp-onnx cuts and pads texts itself (--max-length, batches): a file's own settings would cut
    tokenizer.no_padding()     # texts silently or pad each to any length it names
    _tokenizer_call(tokenizer.encode, TOKENIZER_PROBE, where=path)  # a normalizer or pre-tokenizer that cannot work fails here, once
    return tokenizer


def _tokenizer_call(call, *args, where: Path):
    """``call(*args)`` of the tokenizers library, whose Rust panics (PanicException, a BaseException) and errors on a damaged
    tokenizer.json become one line."""
    try:
        return call(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CpOnnxError(f"{where} is not a valid tokenizers file ({type(exc).__name__}: {reason}); re-export the model") from None


def _inside(folder: Path, relative: str) -> Path:
    """Resolve a manifest path, refusing anything that leaves the model folder (or that no file system can hold)."""
    try:
        target = (folder / relative).resolve()
        target.is_file()
    except (OSError, ValueError) as exc:  # a name too long, or with a NUL byte
        raise CpOnnxError(f"the manifest in {folder} names an impossible path ({type(exc).__name__}); re-export the model") from None
    if not target.is_relative_to(folder.resolve()):
        raise CpOnnxError(f"the manifest in {folder} points outside the model folder ({relative!r}); re-export the model")
    return target


TOKENIZER_PROBE = "The 3 cats, 12 dogs: done.\n"
# What cp-onnx checks of tokenizer.json before the tokenizers library reads it: its added tokens.
TOKENIZER_SCHEMA = {"type": "object", "properties": {"added_tokens": {"type": ["array", "null"], "items": {
    "type": "object", "required": ["id", "content"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        "content": {"type": "string", "minLength": 1, "maxLength": inputs.MAX_ADDED_TOKEN_CHARS}}}}}}
_NAME = {"type": ["string", "null"]}
_COUNT = {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31}
# The manifest fields the analysis reads (exporters.manifest checks the whole manifest of a cache entry).
MANIFEST_SCHEMA = {"type": "object", "properties": {
    "format": _NAME, "source": _NAME, "family": _NAME, "weights_sha256": _NAME, "cache_key": _NAME, "layer_path": _NAME,
    "onnx": {"type": ["object", "null"], "additionalProperties": _NAME},
    "num_layers": _COUNT, "hidden_size": _COUNT, "num_heads": _COUNT, "num_kv_heads": _COUNT, "head_dim": _COUNT, "vocab_size": _COUNT,
    "eos_token_id": {"type": ["integer", "array", "null"], "items": {"type": "integer"}}, "bos_token_id": {"type": ["integer", "null"]},
    "add_bos": {"type": ["boolean", "null"]}}}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    manifest = shapes.read_json(path, "manifest", "re-export the model")
    if not isinstance(manifest, dict):
        raise CpOnnxError(f"{path} is not a cp-onnx manifest; re-export the model")
    shapes.check(manifest, MANIFEST_SCHEMA, str(path), "re-export the model")
    return manifest


def open_folder(folder: Path, *, tokenizer_dir: Path | None = None) -> ModelFolder:
    """Open an exported folder: model.onnx (or the manifest's model path) plus tokenizer."""
    manifest = read_manifest(folder)
    relative = (manifest.get("onnx") or {}).get("model") or "model.onnx"
    onnx_path = _inside(folder, relative)
    if not onnx_path.is_file():
        raise CpOnnxError(f"no {relative} in {folder}; export a model there with `cp-onnx export SOURCE --out {folder}`")
    model = ModelFolder(folder, onnx_path, manifest)
    if tokenizer_dir is not None:
        model._tokenizer = load_tokenizer(tokenizer_dir)
    return model


def open_model(source: str | Path | None = None, *, tokenizer_dir: str | Path | None = None, with_past: bool = False,
               log: Callable[[str], None] = print) -> ModelFolder:
    """Anything a user may name: an exported folder, an .onnx file (tokenizer beside it or in
    ``tokenizer_dir``), or a source ``cp-onnx export`` accepts (exported on first use, then cached;
    ``with_past`` exports the graph with a KV cache too)."""
    source = DEFAULT_SOURCE if source is None else source
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    path = Path(source)
    if path.is_file() and path.suffix == ".onnx":
        model = ModelFolder(path.parent, path, read_manifest(path.parent))
        if tok_dir is not None:
            model._tokenizer = load_tokenizer(tok_dir)
        return model
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / "model.onnx").is_file()):
        return open_folder(path, tokenizer_dir=tok_dir)
    if path.suffix == ".onnx":
        raise CpOnnxError(f"{source} does not exist; give the path of an exported model.onnx")
    from exporters import export  # torch is imported only inside the Optimum call
    from exporters.errors import ExportError

    try:
        folder = export(str(source), with_past=with_past, log=log)
    except ExportError as exc:
        raise CpOnnxError(str(exc)) from exc
    return open_folder(Path(folder), tokenizer_dir=tok_dir)
