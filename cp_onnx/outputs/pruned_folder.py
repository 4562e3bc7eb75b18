"""`cp-onnx prune`: write a model folder whose removed layers are gone from its graphs (route pass) and whose
removed heads are gone from its weights (prune-heads pass), both graphs, tokenizer and manifest; and the
choice of what to remove, when asked for a count, by a pruning method on the calibration texts."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import onnx

from cp_onnx import calibration
from cp_onnx.analysis import head_pruning, prune
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.apply import GRAPH_FILES, graph_sources, write_derived
from cp_onnx.models.model import ModelFolder
from graph_passes import discover
from graph_passes.layer_path import format_path
from graph_passes.prune_heads import prune_heads
from graph_passes.route import route


def prune_folder(model: ModelFolder, out: Path, *, layers: Sequence[int] = (), heads: Mapping[int, Sequence[int]] | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``out``: the model without ``layers`` and without ``heads`` ({layer: [head, ...]}, original layer numbers)."""
    heads = {int(l): sorted({int(h) for h in hs}) for l, hs in (heads or {}).items() if len(hs)}
    sources = graph_sources(model, log=log)
    num_layers = model.num_layers
    removed = sorted({int(l) for l in layers})
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

    changes = {"num_layers": len(path), "layer_path": format_path(path) if removed else None,
               "pruned": {"layers": removed, "heads": {str(l): hs for l, hs in sorted(heads.items())}}}
    return write_derived(model, sources, pruned, out, changes, weights=True, log=log)  # the new files hold only what is kept


def choose(model: ModelFolder, *, layers: int = 0, heads: int = 0, layer_method: str = prune.DEFAULT, head_method: str = head_pruning.DEFAULT,
           removed: Sequence[int] = (), calibration_source: str | None = None, n: int = 10, max_length: int = 128, threads: int | None = None,
           progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> tuple[list[int], dict[int, list[int]]]:
    """The ``layers`` layers and ``heads`` heads the named methods would remove, from the calibration texts (heads
    of layers already ``removed`` are not chosen)."""
    if layer_method not in prune.METHODS or head_method not in head_pruning.METHODS:
        raise CpOnnxError(f"unknown pruning method; layers: {', '.join(prune.METHODS)}; heads: {', '.join(head_pruning.METHODS)}")
    reasoning = calibration.load_calibration(calibration_source, n=n)
    general = calibration.load_calibration("general", n=n)
    removed = list(removed)
    if layers:
        found = prune.predict_layers(model, reasoning, general, max_layers=layers, max_length=max_length, threads=threads,
                                     methods=(layer_method,), progress=progress)
        removed = list(found.choices[layer_method][layers].layers)
        log(f"{layer_method} removes layers {removed}")
    chosen: dict[int, list[int]] = {}
    if heads:
        scores = head_pruning.head_scores(model, reasoning, max_length=max_length, threads=threads, progress=progress)  # as removal_loss: the reasoning texts
        chosen = head_pruning.choose_heads(scores[head_method], heads, skip_layers=removed)
        log(f"{head_method} removes {heads} heads: " + ", ".join(f"layer {l}: {hs}" for l, hs in chosen.items()))
    return removed, chosen
