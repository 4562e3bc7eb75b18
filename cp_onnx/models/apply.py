"""apply: write a model folder whose graphs run the decoder layers along a layer path (a duplicated circuit, say)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Sequence

import onnx

from cp_onnx.errors import CpOnnxError
from cp_onnx.files import check_real_folder
from cp_onnx.models.deployed_folder import manifest_for, set_layer_count
from cp_onnx.models.generate import takes_cache, with_past_graph
from cp_onnx.models.model import ModelFolder
from exporters.folders import staging_folder
from exporters.manifest import MANIFEST_NAME, is_export, write_manifest
from graph_passes import discover, graph_io
from graph_passes.layer_path import check_path, format_path, parse_spec
from graph_passes.route import route

# manifest "onnx" slot -> where the routed graph goes in the new folder (the exporter's layout)
GRAPH_FILES = {"model": "model.onnx", "with_past": "with_past/model.onnx"}
# Identity of the source that a derived folder records.
DERIVED_FROM_KEYS = ("source", "source_kind", "weights_sha256", "num_layers", "cache_key")


def apply(model: ModelFolder, path: str | Sequence[int], out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out``: the model's graphs routed along ``path`` (``"0..14,12..14,15..29"``, ``"12:15"`` or a list), tokenizer and manifest."""
    sources = graph_sources(model, log=log)
    num_layers = model.num_layers
    layers = parse_spec(path, num_layers) if isinstance(path, str) else list(check_path(path, num_layers))
    text = format_path(layers)

    def routed(slot: str, graph: onnx.ModelProto, layer_map, source: Path) -> onnx.ModelProto:
        log(f"routing {GRAPH_FILES[slot]} along {text} ({len(layers)} layers instead of {num_layers})")
        return route(graph, layer_map, layers)

    return write_derived(model, sources, routed, out, {"num_layers": len(layers), "layer_path": text}, log=log)


def graph_sources(model: ModelFolder, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Slot ("model", "with_past") -> graph file, after checking the folder can be derived from."""
    manifest = model.manifest
    if not manifest.get("format") and not takes_cache(model.onnx_path):
        raise CpOnnxError(f"{model.path} has no {MANIFEST_NAME}; export the model with `cp-onnx export SOURCE --with-past` first")
    if manifest.get("layer_path"):
        raise CpOnnxError(f"{model.path} is already routed (layer path {manifest['layer_path']}); apply to the original model it was derived from")
    sources = {"model": model.onnx_path, "with_past": with_past_graph(model)}
    if sources["with_past"] is None:
        if not takes_cache(model.onnx_path):
            log(f"{model.path} has no with_past graph: routing model.onnx only (generation will re-run the whole sequence per token)")
        del sources["with_past"]
    return sources


def write_derived(model: ModelFolder, sources: dict[str, Path], transform: Callable, out: Path, changes: dict, *, weights: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Write ``out``: each graph of ``sources`` (from ``graph_sources``) through ``transform(slot, graph, layer_map, source)``,
    the tokenizer and config files, and the manifest with ``changes`` (``num_layers`` among them) and where it came from.

    One graph is in memory at a time. ``weights=False`` leaves external-data weights on disk (the derived
    folder then links the same data file); True loads them, so the new files hold only what the graphs read."""
    manifest = model.manifest if model.manifest.get("format") else manifest_for(model.path, model.onnx_path)  # a deployed build: one graph
    out = Path(out).expanduser()
    _check_out(out, model.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out) as stage:
        _copy_side_files(model, stage)
        files = {"model": None, "with_past": None, "model_data": None, "with_past_data": None}
        counts = {}
        for slot, source in sources.items():
            graph = graph_io.load(source, weights=weights)
            layer_map = discover(graph)
            counts[slot] = layer_map.num_layers
            if len(set(counts.values())) != 1:
                raise CpOnnxError(f"the graphs of {model.path} disagree on the layer count ({counts}); re-export the model")
            target = stage / GRAPH_FILES[slot]
            target.parent.mkdir(parents=True, exist_ok=True)
            derived = transform(slot, graph, layer_map, source)
            del graph
            graph_io.save(derived, target, weights_dir=source.parent)
            files[slot], files[f"{slot}_data"] = GRAPH_FILES[slot], _data_file(derived, GRAPH_FILES[slot], stage)
            del derived
            _check(target, source)
        set_layer_count(stage, changes["num_layers"])
        identity = "|".join(f"{key}={changes[key]}" for key in sorted(changes) if key != "num_layers")
        write_manifest(stage, {
            **{key: value for key, value in manifest.items() if key != "graph_sha256"},  # the source's files' digests
            **changes,
            "onnx": files,
            "derived_from": {key: manifest.get(key) for key in DERIVED_FROM_KEYS},
            "cache_key": hashlib.sha256(f"{manifest.get('cache_key')}|{identity}".encode()).hexdigest()[:24],
        })
    log(f"wrote {out}")
    return out


def _check(target: Path, source: Path) -> None:
    """onnx's checker on the routed graph (by path: works over 2 GB), unless the source already fails it: deployed
    builds hold onnxruntime ops in the default domain (SimplifiedLayerNormalization) that onnx does not know."""
    try:
        onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError:
        try:
            onnx.checker.check_model(str(source))
        except onnx.checker.ValidationError:
            return
        raise


def _check_out(out: Path, source: Path) -> None:
    """Refuse to write over the source, over a file, through a symbolic link, or over a folder that is not a cp-onnx model folder."""
    check_real_folder(out)
    if out.resolve() == Path(source).resolve():
        raise CpOnnxError(f"{out} is the source model folder; choose another --out folder")
    if out.exists() and not out.is_dir():
        raise CpOnnxError(f"{out} exists and is not a folder; choose another --out folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise CpOnnxError(f"{out} exists and is not a cp-onnx model folder; choose another --out folder or empty it")


def _copy_side_files(model: ModelFolder, stage: Path) -> None:
    """Copy tokenizer and config files: every top-level file but the graphs, their data and the manifest."""
    graph_files = {name for name in (model.manifest.get("onnx") or {}).values() if name}
    for item in sorted(model.path.iterdir()):
        if item.is_file() and not item.name.startswith(".") and item.name != MANIFEST_NAME and item.name not in graph_files and ".onnx" not in item.name:
            shutil.copy2(item, stage / item.name)


def _data_file(routed: onnx.ModelProto, relative: str, stage: Path) -> str | None:
    """The graph's external data file: the one its weights still point to, or the one ``graph_io.save`` wrote."""
    locations = {e.value for t in routed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    if len(locations) > 1:
        raise CpOnnxError(f"the routed {relative} keeps its weights in {len(locations)} files, expected one; re-export the model")
    written = f"{Path(relative).name}.data"
    name = locations.pop() if locations else (written if (stage / relative).with_name(written).is_file() else None)
    return None if name is None else str(Path(relative).parent / name)
