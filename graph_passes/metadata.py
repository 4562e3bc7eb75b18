"""What passes record in a model's metadata_props, so that whoever reads the model later (discovery, a second pass,
generation) knows what was done to it: the layer path it runs, its KV-cache slots, the heads it kept."""
from __future__ import annotations

import json

import onnx

from graph_passes.layer_path import parse_path

PATH_KEY = "cp_onnx.layer_path"  # the path a routed model runs, in layer-path syntax
KV_SLOTS_KEY = "cp_onnx.kv_slot_layers"  # JSON list, entry k = the layer whose cache is slot k
HEADS_KEY = "cp_onnx.heads_kept"  # JSON {layer: [original indices of the kept heads]} of head-pruned layers


def read(model: onnx.ModelProto, key: str) -> str | None:
    """The value recorded under ``key``, or None."""
    return next((p.value for p in model.metadata_props if p.key == key), None)


def write(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Record ``entries``, replacing earlier values of the same keys (in place)."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def routed_path(model: onnx.ModelProto) -> list[int] | None:
    """The layer path a routed model records, or None for a model that was never routed."""
    value = read(model, PATH_KEY)
    return None if value is None else parse_path(value)


def kept_heads(model: onnx.ModelProto) -> dict[int, list[int]]:
    """{layer: original indices of its kept heads} of a head-pruned model (empty for any other)."""
    value = read(model, HEADS_KEY)
    return {} if value is None else {int(l): hs for l, hs in json.loads(value).items()}
