"""report.json: a versioned, schema-checked record of one analysis, readable from C++ as plain JSON.

Every field except ``timings`` is a function of the model and calibration inputs alone, so the same
inputs give the same report. Non-finite numbers are written as null (JSON has no NaN).
"""
from __future__ import annotations

import json
import platform
from importlib import resources
from pathlib import Path

import numpy as np

from cp_onnx import __version__, shapes
from cp_onnx.errors import CpOnnxError
from cp_onnx.files import file_sha256, json_ready
from cp_onnx.analysis.stats import STAT_NAMES

REPORT_FORMAT = "cp-onnx-report"
REPORT_VERSION = 2  # 2: "predictions" per prompting regime (1: one "prediction")
METHOD = "duplication_loss"  # the default method (analysis.predict.METHOD), whose ranking is per regime


def schema() -> dict:
    """The JSON Schema shipped with the package (cp_onnx/data/report.schema.json)."""
    return json.loads(resources.files("cp_onnx").joinpath("data/report.schema.json").read_text())


def versions() -> dict[str, str]:
    import networkx
    import onnx
    import onnxruntime
    import scipy

    return {
        "cp_onnx": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "networkx": networkx.__version__,
        "python": platform.python_version(),
    }


def layers_table(stats: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(stats.values())))
    return [{"layer": i, **{name: stats[name][i] for name in STAT_NAMES if name in stats}} for i in range(n)]


def build_report(model, num_layers: int, family: str, stats: dict[str, np.ndarray], methods: dict, calibration: dict, timings: dict,
                 predictions: dict | None = None, *, onnx_sha256: str | None = None) -> dict:
    """The report dictionary of one analysis: the model, the calibration, the per-layer statistics, each method's
    ranked blocks and the default method's prediction per regime (``predictions``: regime -> predict.Prediction)."""
    manifest = model.manifest
    ranked = {name: {"blocks": [b.as_dict() for b in blocks]} for name, blocks in methods.items()}
    predictions = predictions or {}
    if predictions and METHOD in ranked:  # the default method ranks blocks per regime; "blocks" is the first regime's
        ranked[METHOD]["by_regime"] = {regime: [b.as_dict() for b in found.blocks] for regime, found in predictions.items()}
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "model": {
            "name": model.name,
            "family": manifest.get("family") or family,
            "discovered_as": family,
            "num_layers": num_layers,
            "weights_sha256": manifest.get("weights_sha256"),
            "onnx_sha256": onnx_sha256 or file_sha256(model.onnx_path),
            "manifest": manifest,
        },
        "calibration": calibration,
        "predictions": {regime: found.as_dict() for regime, found in predictions.items()},
        "layers": layers_table(stats),
        "methods": ranked,
        "versions": versions(),
        "timings": timings,
    }
    return json_ready(report)


def reading_schema(complete: bool = False) -> dict:
    """The shipped schema, or (by default) the same with only the fields every reader indexes required: reports trimmed
    by hand for other toolchains (examples/cpp reads the same) keep working, and no field present may be mistyped."""
    checked = schema()
    if not complete:
        checked["required"] = ["format", "version", "model", "layers", "methods"]
        checked["properties"]["model"]["required"] = ["name", "num_layers"]
        checked["properties"]["predictions"]["additionalProperties"]["required"] = ["decision"]
    return checked


def read_report(path: Path, *, complete: bool = False) -> dict:
    """Load a report and check it against the schema (so that no reader meets a missing or mistyped field);
    ``complete``: every field ``cp-onnx analyze`` writes must be there (a batch reusing its reports needs them)."""
    path = Path(path)
    hint = "give a report.json written by `cp-onnx analyze`"
    try:
        data = shapes.read_json(path, "report", hint)
    except FileNotFoundError as exc:
        raise CpOnnxError(f"{path} does not exist; run `cp-onnx analyze --out DIR` to make a report") from exc
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise CpOnnxError(f"{path} is not a cp-onnx report; {hint}")
    if data.get("version") != REPORT_VERSION:
        raise CpOnnxError(f"{path} is report version {shapes.shown(data.get('version'))}, this cp-onnx reads version {REPORT_VERSION}; "
                          "re-run analyze")
    shapes.check(data, reading_schema(complete), str(path), "re-run `cp-onnx analyze` to write it again")
    layers = data["model"]["num_layers"]
    named = [(f"method {method!r}", block) for method, entry in data["methods"].items()
             for block in entry["blocks"] + [b for blocks in (entry.get("by_regime") or {}).values() for b in blocks]]
    named += [(f"the {regime} prediction", block) for regime, found in (data.get("predictions") or {}).items() for block in found.get("candidates") or []]
    for where, block in named:
        if not block["start"] < block["end"] <= layers:
            raise CpOnnxError(f"{path}: {where} names block [{block['start']}, {block['end']}), not a block of the "
                              f"model's {layers} layers; re-run `cp-onnx analyze` to write it again")
    return data
