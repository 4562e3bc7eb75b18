"""The circuit summary for C++ and edge toolchains: in an ONNX model's metadata_props, and as plain text.

Metadata keys (all values strings, as ONNX requires; documented in examples/cpp/README.md): first
``cp_onnx.decision.zero_shot`` and ``cp_onnx.decision.few_shot`` (each regime's answer in one line: the block to
duplicate with its gain and cost, or that none is predicted to help; ``cp_onnx.decision`` alone when the report
holds no prediction), then ``cp_onnx.report_format``,
``cp_onnx.report_version``, ``cp_onnx.version``, ``cp_onnx.model_sha256`` (sha256 of the analysed ONNX file,
before embedding), ``cp_onnx.weights_sha256``, ``cp_onnx.calibration_identity``, ``cp_onnx.num_layers``, ``cp_onnx.top_blocks`` ("method=start:end;..."
for parsers without JSON), ``cp_onnx.circuits`` (JSON: method -> top blocks {start, end, score}) and,
per regime with a prediction, ``cp_onnx.prediction.REGIME`` ("help start:end" or "abstain") and ``cp_onnx.kinds.REGIME``.

``format_text`` is the exact text examples/cpp prints from report.json, so the two can be compared.
"""
from __future__ import annotations

import json
from pathlib import Path

from cp_onnx import __version__
from cp_onnx.analysis.report import REPORT_FORMAT, REPORT_VERSION
from cp_onnx.files import file_sha256
from cp_onnx.errors import CpOnnxError
from cp_onnx.files import atomic_open
from cp_onnx.outputs import pruning_report
from cp_onnx.outputs.decision import decision_lines, kind_table, kinds_line, predictions

PREFIX = "cp_onnx."
DEFAULT_TOP = 5


def top_circuits(report: dict, top: int = DEFAULT_TOP) -> dict[str, list[dict]]:
    """Method -> its ``top`` highest-ranked blocks as {start, end, score}, in report order."""
    if top < 1:
        raise CpOnnxError(f"--top must be at least 1, not {top}")
    return {method: [{"start": b["start"], "end": b["end"], "score": b["score"]} for b in entry.get("blocks", [])[:top]]
            for method, entry in (report.get("methods") or {}).items()}


def metadata(report: dict, top: int = DEFAULT_TOP) -> dict[str, str]:
    """The metadata_props entries ``embed`` writes for ``report``."""
    circuits = top_circuits(report, top)
    model, calibration = report["model"], report.get("calibration") or {}
    found = predictions(report)
    # First: a reader listing the keys meets the answers before the details.
    entries = {f"decision.{regime}": line for regime, line in zip(found, decision_lines(report))} if found else {"decision": decision_lines(report)[0]}
    entries |= {
        "report_format": REPORT_FORMAT,
        "report_version": str(REPORT_VERSION),
        "version": __version__,
        "model_sha256": model.get("onnx_sha256") or "",
        "weights_sha256": model.get("weights_sha256") or "",
        "calibration_identity": calibration.get("identity") or "",
        "num_layers": str(model["num_layers"]),
        "top_blocks": ";".join(f"{m}={b[0]['start']}:{b[0]['end']}" for m, b in circuits.items() if b),
        "circuits": json.dumps(circuits, separators=(",", ":"), allow_nan=False),
    }
    for regime, prediction in found.items():
        entries[f"prediction.{regime}"] = decision_text(prediction)
        if kinds := kinds_line(prediction, regime):
            entries[f"kinds.{regime}"] = kinds  # the decision's block per kind of task, one line
    return {PREFIX + key: value for key, value in entries.items()}


def decision_text(prediction: dict) -> str:
    """The default method's decision for line-based readers: "help START:END" or "abstain"."""
    block = prediction.get("block")
    return f"help {block['start']}:{block['end']}" if prediction["decision"] == "help" and block else "abstain"


def embed(report: dict, model_path: str | Path, out: str | Path | None = None, *, top: int = DEFAULT_TOP, force: bool = False) -> Path:
    """Write ``metadata(report)`` into the ONNX file (in place, or to ``out``), graph untouched; return the file written.

    Refuses a model other than the one the report analysed unless ``force``. Earlier ``cp_onnx.*`` entries are replaced.
    """
    import onnx

    source = Path(model_path)
    target = source if out is None else Path(out)
    if not source.is_file():
        raise CpOnnxError(f"no ONNX file at {source}; give the model.onnx the report was made on")
    try:
        proto = onnx.load(str(source), load_external_data=False)  # weights in external files stay where they are
    except Exception as exc:
        raise CpOnnxError(f"{source} is not a readable ONNX model ({type(exc).__name__}); give the model.onnx the report was made on") from None
    existing = {p.key: p.value for p in proto.metadata_props}
    analysed = report["model"].get("onnx_sha256")
    if not force and analysed not in (existing.get(PREFIX + "model_sha256"), file_sha256(source)):
        raise CpOnnxError(f"{source} is not the model the report analysed (onnx sha256 {str(analysed)[:12]}...); give that model, or pass --force")
    if _has_external_data(proto) and target.parent.resolve() != source.parent.resolve():
        raise CpOnnxError(f"{source} keeps its weights in external files, which are found relative to it; write into its own folder (omit --out)")
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, dict(kept) | metadata(report, top))
    with atomic_open(target, binary=True, mode=_mode(target)) as out:
        out.write(proto.SerializeToString())
    return target


def read_metadata(model_path: str | Path) -> dict[str, str]:
    """The ``cp_onnx.*`` entries of a model, as onnxruntime returns them."""
    import onnxruntime

    meta = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return {k: v for k, v in meta.custom_metadata_map.items() if k.startswith(PREFIX)}


def _has_external_data(proto) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in proto.graph.initializer)


def _mode(target: Path) -> int | None:
    """Keep the model's own permissions when replacing it (None: the default for a new file)."""
    return target.stat().st_mode & 0o7777 if target.exists() else None


def format_text(report: dict, top: int = DEFAULT_TOP) -> str:
    """The decision, then top circuits per method and per-layer statistics, one fact a line (examples/cpp/main.cpp
    prints the same)."""
    num_layers = report["model"]["num_layers"]
    lines = [*decision_lines(report), f"model {report['model']['name']}", f"layers {num_layers}"]
    for regime, prediction in predictions(report).items():
        lines.append(f"prediction {regime} {decision_text(prediction)}")
        lines += kind_lines(prediction)
    for method, blocks in top_circuits(report, top).items():
        lines.append(f"method {method}")
        for rank, b in enumerate(blocks, 1):
            depth = f"{100 * b['start'] / num_layers:.1f}-{100 * b['end'] / num_layers:.1f}%"
            lines.append(f"  {rank} [{b['start']}, {b['end']}) {depth} score {_number(b['score'])}")
    lines += pruning_report.text_lines(report)
    lines.append("per-layer statistics")
    for row in report["layers"]:
        values = " ".join(f"{key}={_number(value)}" for key, value in row.items() if key != "layer")
        lines.append(f"  layer {row['layer']} {values}")
    return "\n".join(lines) + "\n"


def kind_lines(prediction: dict) -> list[str]:
    """The decided (or least harmful) block's gain on each kind of calibration text, one kind a line, its name last
    (a user's kind may hold spaces): ``kinds START:END`` then ``  VERDICT gain G bounds LOWER UPPER texts N numbers M kind NAME``."""
    blocks, _ = kind_table(prediction)
    if not blocks:
        return []
    first = blocks[0]
    lines = [f"kinds {first['start']}:{first['end']}"]
    for kind, g in first["by_kind"].items():
        verdict = g.get("verdict") if isinstance(g.get("verdict"), str) and g.get("verdict") else "unclear"
        lines.append(f"  {verdict} gain {_number(g.get('gain'))} bounds {_number(g.get('lower'))} {_number(g.get('upper'))} "
                     f"texts {_number(g.get('texts'))} numbers {_number(g.get('with_numbers'))} kind {kind}".replace("\r", " ").replace("\n", " "))
    return lines


def _number(value: float | None) -> str:
    """%.6g, as C's printf writes it; n/a for null."""
    return "n/a" if value is None else "%.6g" % value
