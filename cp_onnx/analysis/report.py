"""report.json: a versioned, schema-checked record of one analysis, readable from C++ as plain JSON.

Every field except ``timings`` is a function of the model and calibration inputs alone, so the same
inputs give the same report. Non-finite numbers are written as null (JSON has no NaN).
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cp_onnx import __version__, inputs, shapes
from cp_onnx.errors import CpOnnxError
from cp_onnx.files import write_json  # noqa: F401  (re-exported: report.write_json)
from cp_onnx.analysis.stats import STAT_NAMES

REPORT_FORMAT = "cp-onnx-report"
REPORT_VERSION = 1


def schema() -> dict:
    """The JSON Schema shipped with the package (cp_onnx/data/report.schema.json)."""
    return json.loads(resources.files("cp_onnx").joinpath("data/report.schema.json").read_text())


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN/Inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def build_report(analysis, *, onnx_sha256: str | None = None) -> dict:
    """The report dictionary for an ``analyze.Analysis``."""
    model = analysis.model
    manifest = model.manifest
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "model": {
            "name": model.name,
            "family": manifest.get("family") or analysis.family,
            "discovered_as": analysis.family,
            "num_layers": analysis.num_layers,
            "weights_sha256": manifest.get("weights_sha256"),
            "onnx_sha256": onnx_sha256 or file_sha256(model.onnx_path),
            "manifest": manifest,
        },
        "calibration": analysis.calibration,
        "layers": layers_table(analysis.stats),
        "methods": {
            name: {"blocks": [b.as_dict() for b in blocks]} for name, blocks in analysis.methods.items()
        },
        "versions": versions(),
        "timings": analysis.timings,
    }
    if analysis.prediction is not None:
        report["prediction"] = analysis.prediction.as_dict()
    if analysis.languages is not None:
        report["languages"] = analysis.languages
    return json_ready(report)


def reading_schema(complete: bool = False) -> dict:
    """The shipped schema, or (by default) the same with only the fields every reader indexes required: reports trimmed
    by hand for other toolchains (examples/cpp reads the same) keep working, and no field present may be mistyped."""
    checked = schema()
    if not complete:
        checked["required"] = ["format", "version", "model", "layers", "methods"]
        checked["properties"]["model"]["required"] = ["name", "num_layers"]
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
    for method, entry in data["methods"].items():
        for block in entry["blocks"] + ((data.get("prediction") or {}).get("candidates") or [] if method == "duplication_loss" else []):
            if not block["start"] < block["end"] <= layers:
                raise CpOnnxError(f"{path}: method {method!r} names block [{block['start']}, {block['end']}), not a block of the "
                                  f"model's {layers} layers; re-run `cp-onnx analyze` to write it again")
    return data
