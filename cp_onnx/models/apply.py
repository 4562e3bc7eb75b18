"""apply and prune: write a model folder whose graphs run the decoder layers along a layer path (a duplicated circuit,
say), or without some layers and heads (gone from the graphs and the weights, smaller and faster)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import onnx

from cp_onnx.errors import CpOnnxError
from cp_onnx.files import check_real_folder
from cp_onnx.models.deployed_folder import manifest_for, set_layer_count
from cp_onnx.models.generate import takes_cache, with_past_graph
from cp_onnx.models.model import ModelFolder
from exporters.folders import staging_folder
from exporters.manifest import MANIFEST_NAME, is_export, write_manifest
from graph_passes import discover, graph_io
from graph_passes.edit import Edit
from graph_passes.errors import GraphPassError
from graph_passes.layer_path import format_path
from graph_passes.prune_heads import prune_heads
from graph_passes.route import route

# manifest "onnx" slot -> where the routed graph goes in the new folder (the exporter's layout)
GRAPH_FILES = {"model": "model.onnx", "with_past": "with_past/model.onnx"}
# Identity of the source that a derived folder records.
DERIVED_FROM_KEYS = ("source", "source_kind", "weights_sha256", "num_layers", "cache_key")


def apply(model: ModelFolder, edit: Edit, out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out``: the model's graphs with ``edit`` made to their layers (a block duplicated, or any layer path), tokenizer
    and manifest. Heads are removed by ``prune``, which writes only the weights kept."""
    sources = graph_sources(model, log=log)
    num_layers = model.num_layers
    if edit.removed_heads:
        raise CpOnnxError(f"apply changes layers; {edit} also removes heads: use `cp-onnx prune` for them")
    try:
        layers = edit.path(num_layers)
    except GraphPassError as exc:
        raise CpOnnxError(str(exc)) from None
    text = format_path(layers)

    def routed(slot: str, graph: onnx.ModelProto, layer_map, source: Path) -> onnx.ModelProto:
        log(f"routing {GRAPH_FILES[slot]} along {text} ({len(layers)} layers instead of {num_layers})")
        return route(graph, layer_map, layers)

    return write_derived(model, sources, routed, out, {"num_layers": len(layers), "layer_path": text, "edit": edit.format()}, log=log)


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


def prune_folder(model: ModelFolder, edit: Edit, out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out``: the model without the layers ``edit`` leaves out (a block skipped, or a path of kept layers in order)
    and without its removed heads (numbered as in the original model); only the weights kept are written."""
    if edit.kind not in ("baseline", "skip", "path"):
        raise CpOnnxError(f"prune removes layers and heads; {edit} duplicates a block: use `cp-onnx apply` for it")
    heads = edit.heads_by_layer
    sources = graph_sources(model, log=log)
    num_layers = model.num_layers
    try:
        kept = edit.path(num_layers)
    except GraphPassError as exc:
        raise CpOnnxError(str(exc)) from None
    if kept != sorted(set(kept)):
        raise CpOnnxError(f"prune keeps layers in order, once each; {edit} runs some twice or out of order: use `cp-onnx apply` for it")
    removed = [l for l in range(num_layers) if l not in kept]
    if any(not 0 <= l < num_layers for l in removed) or len(removed) >= num_layers:
        raise CpOnnxError(f"cannot remove layers {removed} of this {num_layers}-layer model: give layers 0..{num_layers - 1}, fewer than all")
    if not removed and not heads:
        raise CpOnnxError("nothing to prune: give layers (--layers N or --skip I:J) or heads (--heads N) to remove")
    dropped = sorted(set(heads) & set(removed))
    if dropped:
        raise CpOnnxError(f"heads of layers {dropped} are to be removed with their layers; give heads of kept layers only")
    path = [l for l in range(num_layers) if l not in removed]
    head_count = sum(map(len, heads.values()))

    def pruned(slot: str, graph: onnx.ModelProto, layer_map, source: Path) -> onnx.ModelProto:
        if heads:
            log(f"removing {head_count} heads from {GRAPH_FILES[slot]} ({len(heads)} layers)")
            graph = prune_heads(graph, layer_map, heads, weights_dir=str(source.parent))
            layer_map = discover(graph) if removed else layer_map
        if removed:
            log(f"removing layers {format_path(removed)} from {GRAPH_FILES[slot]} ({len(path)} layers left of {num_layers})")
            graph = route(graph, layer_map, path)
        return graph

    changes = {"num_layers": len(path), "layer_path": format_path(path) if removed else None, "edit": edit.format(),
               "pruned": {"layers": removed, "heads": {str(l): hs for l, hs in sorted(heads.items())}}}
    return write_derived(model, sources, pruned, out, changes, weights=True, log=log)  # the new files hold only what is kept
