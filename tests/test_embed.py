"""Reports for toolchains: the schema, `cp-onnx embed` (metadata in, graph and logits untouched) and the text format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime
import pytest

from cp_onnx.analysis import report as report_mod
from cp_onnx.cli import main
from cp_onnx.files import file_sha256, write_json
from cp_onnx.outputs.decision import NO_PREDICTION, decision_lines, kinds_line
from cp_onnx.outputs.embed import format_text, read_metadata
from support import tiny_report, write_tiny_folder


@pytest.fixture(scope="module")
def analysed(tiny_model, tmp_path_factory):
    """(model folder, report.json path, report) for the tiny llama."""
    folder = write_tiny_folder(tiny_model, "llama", tmp_path_factory.mktemp("embed") / "llama")
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.helper.set_model_props(proto, {"author": "someone"})  # metadata of its own, which embed must keep
    onnx.save(proto, str(folder / "model.onnx"))
    data = tiny_report(folder)
    return folder, write_json(data, folder / "report.json"), data


def logits(path: Path) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 17, 42, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6, 7]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(ids.shape[1]), (2, 1))}
    return session.run(["logits"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def test_report_schema_accepts_reports_and_rejects_broken_ones(analysed):
    _, _, data = analysed
    jsonschema.validate(data, report_mod.schema())
    broken = json.loads(json.dumps(data))
    broken["methods"]["stability"]["blocks"][0]["start"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_mod.schema())
    del broken["calibration"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_mod.schema())


def test_embed_writes_metadata_and_keeps_graph_and_logits(analysed, tmp_path, capsys):
    folder, report_path, data = analysed
    source = tmp_path / "model.onnx"
    shutil.copy(folder / "model.onnx", source)
    original = onnx.load(str(source))
    source.chmod(0o644)
    before = logits(source)

    assert main(["embed", str(report_path), str(source), "--top", "2"]) == 0  # in place
    assert capsys.readouterr().out.strip() == str(source)
    np.testing.assert_array_equal(logits(source), before)  # bit-identical
    embedded = onnx.load(str(source))
    assert embedded.graph.SerializeToString() == original.graph.SerializeToString()
    assert (source.stat().st_mode & 0o777) == 0o644
    assert not list(tmp_path.glob(".model.onnx.*"))

    meta = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["author"] == "someone"  # other metadata kept
    expected_circuits = {m: [{k: b[k] for k in ("start", "end", "score")} for b in e["blocks"][:2]] for m, e in data["methods"].items()}
    assert json.loads(meta["cp_onnx.circuits"]) == expected_circuits
    assert meta["cp_onnx.top_blocks"] == ";".join(f"{m}={e['blocks'][0]['start']}:{e['blocks'][0]['end']}" for m, e in data["methods"].items())
    assert meta["cp_onnx.model_sha256"] == data["model"]["onnx_sha256"] == file_sha256(folder / "model.onnx")
    assert meta["cp_onnx.calibration_identity"] == data["calibration"]["identity"]
    assert (meta["cp_onnx.report_format"], meta["cp_onnx.report_version"], meta["cp_onnx.num_layers"]) == ("cp-onnx-report", "2", "3")
    lines = decision_lines(data)
    assert [meta["cp_onnx.decision.zero_shot"], meta["cp_onnx.decision.few_shot"]] == lines and not any("\n" in line for line in lines)
    assert lines[0].startswith("zero-shot decision: ") and lines[1].startswith("few-shot decision: ")
    for regime, prediction in data["predictions"].items():
        assert meta[f"cp_onnx.prediction.{regime}"] in ("abstain", *(f"help {b['start']}:{b['end']}" for b in prediction["candidates"]))
        assert meta[f"cp_onnx.kinds.{regime}"] == kinds_line(prediction, regime) and "per kind of calibration text, [" in meta[f"cp_onnx.kinds.{regime}"]
    ours = [p.key for p in onnx.load(str(source), load_external_data=False).metadata_props if p.key.startswith("cp_onnx.")]
    assert ours[:2] == ["cp_onnx.decision.zero_shot", "cp_onnx.decision.few_shot"]  # the answers are the first of its entries

    # Embedding again into the embedded file replaces the entries (the analysed sha256 still matches).
    assert main(["embed", str(report_path), str(source), "--top", "1"]) == 0
    assert [len(v) for v in json.loads(read_metadata(source)["cp_onnx.circuits"]).values()] == [1] * len(data["methods"])
    np.testing.assert_array_equal(logits(source), before)


def test_embed_to_out_and_refusals(analysed, tmp_path, capsys):
    folder, report_path, _ = analysed
    out = tmp_path / "sub" / "embedded.onnx"
    assert main(["embed", str(report_path), str(folder), "--out", str(out)]) == 0  # MODEL as a folder
    capsys.readouterr()
    assert "cp_onnx.circuits" in read_metadata(out)
    assert file_sha256(folder / "model.onnx") == json.loads(report_path.read_text())["model"]["onnx_sha256"]  # source untouched

    other = tmp_path / "other.onnx"
    proto = onnx.load(str(folder / "model.onnx"))
    proto.graph.node[0].name += "_changed"
    onnx.save(proto, str(other))
    assert main(["embed", str(report_path), str(other)]) == 2
    assert "not the model the report analysed" in capsys.readouterr().err
    assert main(["embed", str(report_path), str(other), "--force"]) == 0
    assert main(["embed", str(report_path), str(tmp_path / "missing.onnx")]) == 2
    assert "no ONNX file" in capsys.readouterr().err


def test_text_format_worked_by_hand():
    data = {
        "model": {"name": "toy", "num_layers": 8},
        "methods": {
            "stability": {"blocks": [{"start": 1, "end": 4, "score": 2.5}, {"start": 0, "end": 3, "score": None},
                                     {"start": 4, "end": 8, "score": -1e-05}]},
            "anomaly": {"blocks": [{"start": 5, "end": 8, "score": 1234567.0}]},
        },
        "layers": [{"layer": 0, "representation_change": 0.125, "norm_growth": None},
                   {"layer": 1, "representation_change": 3.0, "norm_growth": 1.0 / 3.0}],
    }
    assert format_text(data, top=2) == (
        f"{NO_PREDICTION}\nmodel toy\nlayers 8\n"
        "method stability\n  1 [1, 4) 12.5-50.0% score 2.5\n  2 [0, 3) 0.0-37.5% score n/a\n"
        "method anomaly\n  1 [5, 8) 62.5-100.0% score 1.23457e+06\n"
        "per-layer statistics\n"
        "  layer 0 representation_change=0.125 norm_growth=n/a\n"
        "  layer 1 representation_change=3 norm_growth=0.333333\n"
    )
