"""Model folders cp-onnx did not export (an onnxruntime-genai build: model.onnx, genai_config.json, tokenizer):
the manifest facts ``apply`` needs, read from the runtime's own config, and that config kept true after routing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cp_onnx import shapes
from cp_onnx.errors import CpOnnxError
from exporters.manifest import FORMAT, tool_version

# Runtime config file -> key path of its layer count (the runtime allocates one KV cache per layer from it).
LAYER_COUNT_KEYS = {"genai_config.json": ("model", "decoder", "num_hidden_layers")}
# manifest field -> key path in genai_config.json
_GENAI_FIELDS = {
    "family": ("model", "type"), "num_layers": ("model", "decoder", "num_hidden_layers"),
    "hidden_size": ("model", "decoder", "hidden_size"), "num_heads": ("model", "decoder", "num_attention_heads"),
    "num_kv_heads": ("model", "decoder", "num_key_value_heads"), "head_dim": ("model", "decoder", "head_size"),
    "vocab_size": ("model", "vocab_size"), "bos_token_id": ("model", "bos_token_id"), "eos_token_id": ("model", "eos_token_id"),
}


def manifest_for(folder: Path, onnx_path: Path) -> dict:
    """A cp-onnx manifest describing a deployed folder as it is (its genai_config.json where present)."""
    config = _read(folder / "genai_config.json")
    digest = hashlib.sha256()
    for path in sorted(p for p in onnx_path.parent.iterdir() if p.is_file() and p.name.startswith(onnx_path.name)):
        digest.update(path.read_bytes())  # the graph and its external data: the weights' identity
    data = onnx_path.with_name(onnx_path.name + ".data")
    return {
        "format": FORMAT, "source": str(folder), "source_kind": "onnx", "weights_sha256": digest.hexdigest(), "kind": "decoder",
        **{field: _get(config, keys) for field, keys in _GENAI_FIELDS.items()},
        "add_bos": None, "exporter": {"cp_onnx": tool_version("cp-onnx")},
        "onnx": {"model": onnx_path.name, "with_past": None, "model_data": data.name if data.is_file() else None, "with_past_data": None},
        "layer_path": None, "cache_key": digest.hexdigest()[:24],
    }


def set_layer_count(folder: Path, num_layers: int) -> None:
    """Rewrite the layer count in the runtime configs copied into ``folder`` (a routed model has more or fewer layers)."""
    for name, keys in LAYER_COUNT_KEYS.items():
        path = folder / name
        if not path.is_file():
            continue
        config = _read(path)
        node = config
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            raise CpOnnxError(f"{path} has no {'.'.join(keys)}; the routed model's runtime config cannot be updated, rebuild the model")
        node[keys[-1]] = num_layers
        path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = shapes.read_json(path, "runtime config", "rebuild the model")
    return data if isinstance(data, dict) else {}


def _get(config: dict, keys: tuple[str, ...]):
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config
