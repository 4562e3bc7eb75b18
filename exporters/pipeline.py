"""export(): a source (HF folder, GGUF file, packaged model) -> a cached cp-onnx model folder."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from . import folders
from .errors import ExportError
from .genai_build import DEFAULT_GRAPH_FORMAT, check_graph_format, check_installed
from .gguf_header import read_header
from .manifest import build_manifest, graph_format_of, is_export, precision_of, read_manifest, write_manifest
from .quantize import DEFAULT_PRECISION, check_precision
from .runtime_env import hub_offline
from .sources import Source, resolve_source

Log = Callable[[str], None]
# Bump when what an export writes changes: cache entries of older versions are then ignored.
EXPORT_VERSION = 3  # 3: a GGUF's tokenizer.ggml.add_bos_token is honoured for every family
CACHE_ENV = "CP_ONNX_CACHE"
COPIED_CONFIG_FILES = ("config.json", "generation_config.json")
SCRATCH_PREFIX = "_"  # staging sub-folders (dequantized weights, Optimum's raw output) removed before the rename


def export(source: str | Path, out: Path | None = None, *, with_past: bool = False, precision: str | None = None,
           graph_format: str | None = None, cache_dir: Path | None = None, log: Log = print) -> Path:
    """Export ``source`` to a cp-onnx model folder (reused from the cache when already exported); return it.

    With ``out``, the folder is (also) placed there; an existing ``out`` must be a cp-onnx export.
    ``precision`` is fp32 (default), int8 or int4 (weights quantized by onnxruntime); ``graph_format`` is
    optimum (default: Optimum's graph, which the analysis reads) or genai (onnxruntime-genai's builder).
    None means the default, or, for a cp-onnx folder given as source, whatever it was exported with.
    """
    out = None if out is None else Path(out).expanduser()
    settings = {"precision": precision, "graph_format": graph_format}
    for value, check in ((precision, check_precision), (graph_format, check_graph_format)):
        if value is not None:
            check(value)
    if graph_format == "genai" and with_past:
        raise ExportError("the genai graph always takes past_key_values (it is the generation graph); drop --with-past")
    if graph_format == "genai":
        check_installed()  # before anything is staged
    with hub_offline():
        root = cache_root(cache_dir)
        src = resolve_source(source, log, root)
        if src.is_gguf:
            read_header(src.path)  # cp-onnx's own bounded walk, before the gguf package or transformers reads the file
        if out is not None:
            check_out(out)
        if src.kind == "export":
            return reuse_export(src, out, with_past, settings, log)
        precision, graph_format = precision or DEFAULT_PRECISION, graph_format or DEFAULT_GRAPH_FORMAT
        weights_sha = folders.sha256_files(src.weights)
        if src.expected_sha256 and weights_sha != src.expected_sha256:
            raise ExportError(
                f"{src.path} has sha256 {weights_sha}, expected {src.expected_sha256}; reinstall its package with --force-reinstall"
            )
        key = cache_key(weights_sha, folders.sha256_files(src.extras), with_past, precision, graph_format)
        entry = root / key
        if cached(entry, key, log):
            log(f"reusing the cached export {entry} (same weights and settings)")
        else:
            folders.writable_parent(entry, "cache folder", f"set ${CACHE_ENV} or pass cache_dir")
            folders.remove_stale_staging(root)
            build(src, entry, weights_sha=weights_sha, key=key, with_past=with_past, precision=precision,
                  graph_format=graph_format, log=log)
        return entry if out is None else place(entry, out, src.label, log)


def cache_root(cache_dir: Path | None) -> Path:
    """``cache_dir``, else $CP_ONNX_CACHE, else the user cache folder (~/.cache/cp-onnx)."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cp-onnx"
    return root.expanduser().resolve()


def cache_key(weights_sha: str, extras_sha: str, with_past: bool, precision: str = DEFAULT_PRECISION,
              graph_format: str = DEFAULT_GRAPH_FORMAT) -> str:
    """Name of the cache entry for these weights (+ config/tokenizer files) and settings."""
    text = f"cp-onnx-export/{EXPORT_VERSION}|{weights_sha}|{extras_sha}|with_past={with_past}"
    # Only settings away from the defaults enter the key, so float32 Optimum exports cached before keep their entries.
    if precision != DEFAULT_PRECISION:
        text += f"|precision={precision}"
    if graph_format != DEFAULT_GRAPH_FORMAT:
        text += f"|graph_format={graph_format}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached(entry: Path, key: str, log: Log | None = None) -> bool:
    """Whether ``entry`` holds a complete export made with ``key`` whose ONNX files are still the ones it wrote."""
    if not (entry.is_dir() and is_export(entry) and read_manifest(entry)["cache_key"] == key):
        return False
    recorded = read_manifest(entry).get("graph_sha256") or {}
    changed = [rel for rel, digest in recorded.items() if graph_digests(entry, [rel]).get(rel) != digest]
    if changed and log:
        log(f"the cached export {entry} was changed after it was written ({', '.join(changed)} no longer match their sha256); exporting again")
    return not changed


def graph_digests(folder: Path, relative: list[str]) -> dict[str, str | None]:
    """sha256 of each named file of ``folder`` (None where it is missing or leads out of the folder)."""
    found = {}
    for rel in relative:
        path = (folder / rel).resolve()
        ok = path.is_relative_to(folder.resolve()) and path.is_file()
        found[rel] = folders.sha256_files([path]) if ok else None
    return found


def check_out(out: Path) -> None:
    """ExportError unless ``out`` can receive an export: absent, empty, or a previous cp-onnx export (not a symbolic link)."""
    if out.is_symlink():
        raise ExportError(f"the output folder {out} is a symbolic link (to {os.readlink(out)}); give the real folder instead")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ExportError(f"{out} exists and is not a cp-onnx export; choose another output folder or empty it")
    folders.writable_parent(out, "output folder")


def reuse_export(src: Source, out: Path | None, with_past: bool, settings: dict, log: Log) -> Path:
    """An existing cp-onnx model folder given as source: returned as is, or copied to ``out``."""
    manifest = read_manifest(src.path)
    if with_past and not manifest["onnx"]["with_past"]:
        raise ExportError(f"{src.path} was exported without with_past; export {manifest['source']} again with --with-past")
    found = {"precision": precision_of(manifest), "graph_format": graph_format_of(manifest)}
    for name, wanted in settings.items():
        if wanted is not None and wanted != found[name]:
            option = "--" + {"graph_format": "format"}.get(name, name)
            raise ExportError(f"{src.path} was exported with {option} {found[name]}; "
                              f"export {manifest['source']} again with {option} {wanted}")
    log(f"{src.path} is already a cp-onnx model folder")
    if out is None or out.resolve() == src.path:
        return src.path
    return place(src.path, out, manifest["source"], log)


def place(entry: Path, out: Path, label: str, log: Log) -> Path:
    """Copy the export ``entry`` to ``out`` (replacing a previous export there), recording ``label`` as source."""
    if is_export(out):
        previous = read_manifest(out)
        if previous["cache_key"] == read_manifest(entry)["cache_key"] and previous["source"] == label:
            log(f"{out} already holds this export")
            return out
    with folders.staging_folder(out) as stage:
        folders.copy_folder(entry, stage)
        write_manifest(stage, {**read_manifest(stage), "source": label})
    log(f"wrote {out}")
    return out


def build(src: Source, entry: Path, *, weights_sha: str, key: str, with_past: bool, precision: str, graph_format: str,
          log: Log) -> None:
    """Export ``src`` into the cache entry ``entry`` (built in a staging folder, renamed when complete)."""
    from . import optimum_export as opt
    from .runtime_env import quiet_transformers
    from .tokenizer_files import gguf_bos, load_tokenizer, save_tokenizer

    with folders.staging_folder(entry, keep_existing=lambda: cached(entry, key)) as stage, quiet_transformers():
        hf_dir, model = src.path, None
        if src.is_gguf:  # transformers reads the GGUF's config and weights in one go
            hf_dir = stage / f"{SCRATCH_PREFIX}dequantized"
            log(f"loading {src.path.name} with transformers (dequantizing to float32, about {dequantize_seconds(src.path)} s)")
            # Optimum exports the model from memory; only onnxruntime-genai's builder reads float32 weights from disk.
            model = opt.dequantize_gguf(src.path, hf_dir, save_weights=graph_format == "genai")
        config = opt.load_config(hf_dir)
        kind = opt.model_kind(config)
        if with_past and kind != "decoder":
            raise ExportError(f"with_past applies to decoders only, and this {config.model_type} model is an encoder; drop --with-past")
        tokenizer = load_tokenizer(src, config.model_type)
        bos_id = gguf_bos(src.path) if src.is_gguf else None
        if graph_format == "genai":
            onnx = build_genai_graph(src, hf_dir, stage, config, kind, tokenizer, precision, bos_id, log)
        else:
            onnx = export_graphs(hf_dir, stage, config, kind, with_past, log, model)
            quantize_graphs(stage, onnx, precision, log)
        del model  # the float32 weights of a GGUF: free before the tokenizer and manifest work
        for name in COPIED_CONFIG_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, stage / name)
        bos = save_tokenizer(tokenizer, stage, config.model_type, config.bos_token_id, log, gguf_bos_id=bos_id)
        for scratch in stage.glob(f"{SCRATCH_PREFIX}*"):
            shutil.rmtree(scratch)
        manifest = build_manifest(source=src.label, source_kind=src.kind, weights_sha256=weights_sha, config=config,
                                  kind=kind, tokenizer=bos, onnx=onnx, cache_key=key, precision=precision, graph_format=graph_format)
        write_manifest(stage, {**manifest, "graph_sha256": graph_digests(stage, [rel for rel in onnx.values() if rel])})
    log(f"exported to {entry}")


def export_graphs(hf_dir: Path, stage: Path, config, kind: str, with_past: bool, log: Log, model=None) -> dict:
    """Run Optimum for the analysis graph (and the generation graph) of ``hf_dir``, or of its ``model`` when
    already in memory; return the manifest's "onnx" entry."""
    from .graph_files import move_graph
    from .optimum_export import run_optimum

    onnx = {"model": None, "with_past": None, "model_data": None, "with_past_data": None}
    for slot, rel, past in [("model", "model.onnx", False), ("with_past", "with_past/model.onnx", True)][: 1 + with_past]:
        graph = "generation graph (with past_key_values)" if past else "graph"
        log(f"exporting {config.model_type} ({config.num_hidden_layers} layers) {graph} with Optimum "
            f"(about {optimum_seconds(hf_dir, model)} s)")
        raw_dir = stage / f"{SCRATCH_PREFIX}optimum_{slot}"
        produced = run_optimum(hf_dir, raw_dir, with_past=past, kind=kind, family=config.model_type, model=model)
        onnx[slot], onnx[f"{slot}_data"] = move_graph(produced, stage, rel)
    return onnx


def quantize_graphs(stage: Path, onnx: dict, precision: str, log: Log) -> None:
    """Quantize the graphs named in the manifest's "onnx" entry in place (nothing at fp32)."""
    from .quantize import quantize_graph

    if precision == DEFAULT_PRECISION:
        return
    for slot in ("model", "with_past"):
        if onnx[slot]:
            log(f"quantizing the weights of {onnx[slot]} to {precision} with onnxruntime (MatMulNBits)")
            onnx[slot], onnx[f"{slot}_data"] = quantize_graph(stage, onnx[slot], precision)


def build_genai_graph(src: Source, hf_dir: Path, stage: Path, config, kind: str, tokenizer, precision: str,
                      gguf_bos_id: int | None, log: Log) -> dict:
    """onnxruntime-genai's graph of a decoder; a GGUF's dequantized folder first gets the tokenizer files the builder reads."""
    from .genai_build import build_genai
    from .tokenizer_files import save_tokenizer

    if kind != "decoder":
        raise ExportError(f"--format genai builds decoders only, and this {config.model_type} model is an encoder; drop --format genai")
    if src.is_gguf:
        save_tokenizer(tokenizer, hf_dir, config.model_type, config.bos_token_id, log=lambda line: None, gguf_bos_id=gguf_bos_id)
    log(f"building the {precision} genai graph of {config.model_type} ({config.num_hidden_layers} layers) with onnxruntime-genai's builder")
    return build_genai(hf_dir, stage, precision, config.model_type)


def optimum_seconds(hf_dir: Path, model=None) -> int:
    """Rough Optimum export time: start-up plus about 27 MB of float32 weights a second (SmolLM2: 25 s)."""
    if model is not None:
        size = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    else:
        size = sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in hf_dir.glob(pattern))
    return max(5, 5 * round((5 + size / 27e6) / 5))


def dequantize_seconds(gguf_file: Path) -> int:
    """Rough time for transformers to load and dequantize a GGUF: about 8 MB of file a second (SmolLM2: 12 s)."""
    return max(5, 5 * round(gguf_file.stat().st_size / 8e6 / 5))
