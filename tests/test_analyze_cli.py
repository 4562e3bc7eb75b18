"""`cp-onnx analyze` end to end on a tiny model: the report, its schema, determinism, and bad input."""
import json
import shutil

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cp_onnx.analysis import report as report_mod
from cp_onnx.cli import main
from cp_onnx.outputs.decision import NO_PREDICTION
from support import TINY_ARGS, run, write_byte_tokenizer


def test_report_validates_and_is_deterministic(tiny_folder, tmp_path, capsys):
    reports = []
    for name in ("a", "b"):
        code, out, _ = run(["analyze", tiny_folder, "--out", tmp_path / name, *TINY_ARGS], capsys)
        assert code == 0
        assert "stability circuits" in out and "magnitude circuits" in out
        data = json.loads((tmp_path / name / "report.json").read_text())
        jsonschema.validate(data, report_mod.schema())
        data.pop("timings")
        reports.append(data)
    assert reports[0] == reports[1]
    assert len(reports[0]["layers"]) == 3
    # 3 layers, sizes 1 and 2: 3 + 2 candidates, all ranked, each [start, end) inside the model.
    blocks = reports[0]["methods"]["anomaly"]["blocks"]
    assert sorted((b["start"], b["end"]) for b in blocks) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    scores = [b["score"] for b in blocks]
    assert scores == sorted(scores, reverse=True)


def test_batch_size_does_not_change_statistics(tiny_folder, tmp_path, capsys):
    for size in ("1", "5"):
        assert run(["analyze", tiny_folder, "--out", tmp_path / size, "--batch-size", size, *TINY_ARGS], capsys)[0] == 0
    one, five = (json.loads((tmp_path / s / "report.json").read_text())["layers"] for s in ("1", "5"))
    for a, b in zip(one, five):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _assert_fails(args, capsys, *fragments, out=None):
    code, _, err = run(args, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("cp-onnx: error: ") and "\n" not in line
    for fragment in fragments:
        assert fragment in line, line
    if out is not None:
        assert not (out / "report.json").exists()
        assert not any(p.name.startswith(".report.json") for p in out.glob("*")) if out.exists() else True


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf")
    write_byte_tokenizer(tmp_path)
    _assert_fails(["analyze", bad, "--out", tmp_path / "out"], capsys, "not", out=tmp_path / "out")


def test_graph_without_layers(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="lone")], "lone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())],
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    write_byte_tokenizer(tmp_path)
    _assert_fails(["analyze", tmp_path, "--out", tmp_path / "out"], capsys, "no transformer layers", out=tmp_path / "out")


def test_missing_tokenizer(tiny_folder, tmp_path, capsys):
    shutil.copy(tiny_folder / "model.onnx", tmp_path / "model.onnx")
    _assert_fails(["analyze", tmp_path, "--out", tmp_path / "out"], capsys, "tokenizer.json", out=tmp_path / "out")


def test_empty_calibration_file(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "texts.txt"
    empty.write_text("\n   \n")
    _assert_fails(["analyze", tiny_folder, "--calibration", empty, "--out", tmp_path / "out", *TINY_ARGS], capsys, "no calibration texts", out=tmp_path / "out")


def test_too_few_layers_for_blocks(tiny_folder, tmp_path, capsys):
    _assert_fails(["analyze", tiny_folder, "--out", tmp_path / "out", "--block-sizes", "4,5"], capsys, "3 layers", "block size 4", out=tmp_path / "out")


def test_long_texts_are_truncated_and_said(tiny_folder, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"word {i} " + "word " * 40}) for i in range(3)))  # a number the default method scores
    code, _, err = run(["analyze", tiny_folder, "--calibration", texts, "--max-length", "16", "--out", tmp_path / "out", *TINY_ARGS], capsys)
    assert code == 0, err
    assert "3 of 3 calibration texts were longer than 16 tokens" in err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]["tokens"] == 48


def test_manifest_pointing_outside_the_folder(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "cp_onnx.json").write_text(json.dumps({"onnx": {"model": "../../model.onnx"}}))
    _assert_fails(["analyze", folder, "--out", tmp_path / "out"], capsys, "outside the model folder", out=tmp_path / "out")


def test_unwritable_output(tiny_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_fails(["analyze", tiny_folder, "--out", blocker / "sub", *TINY_ARGS], capsys, "cannot write")


def test_output_folders_that_are_symbolic_links_are_refused(tiny_folder, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    _assert_fails(["analyze", tiny_folder, "--out", link, *TINY_ARGS], capsys, "is a symbolic link")
    assert not any(elsewhere.iterdir())  # nothing written where the link points
    from cp_onnx.errors import CpOnnxError
    from cp_onnx.models.apply import _check_out as check_apply_out  # apply and prune write through it
    from exporters.errors import ExportError
    from exporters.pipeline import check_out

    with pytest.raises(CpOnnxError, match="is a symbolic link"):
        check_apply_out(link, tiny_folder)
    with pytest.raises(ExportError, match="is a symbolic link"):
        check_out(link)


def _report(folder, out, capsys, *args):
    code, _, err = run(["analyze", folder, "--out", out, *TINY_ARGS[2:], *args], capsys)
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


def _stats(report):
    return {key: np.array([layer[key] if layer[key] is not None else np.nan for layer in report["layers"]]) for key in report["layers"][0] if key != "layer"}


def test_language_check_reports_each_languages_own_top_block(tiny_folder, tmp_path, capsys):
    data = _report(tiny_folder, tmp_path / "all", capsys, "-n", "5", "--languages", "en,fr,zh")
    check = data["languages"]
    assert check["languages"] == ["en", "fr", "zh"]
    for language in check["languages"]:
        # Independently: a plain analyze of that language's reasoning texts ranks the same top blocks.
        alone = _report(tiny_folder, tmp_path / language, capsys, "-n", "5", "--calibration", "reasoning", "--block-sizes", "1,2")
        if language != "en":
            texts = tmp_path / f"{language}.txt"
            from cp_onnx.calibration import load_calibration

            texts.write_text("\n".join(load_calibration("reasoning", n=5, language=language)))
            alone = _report(tiny_folder, tmp_path / language, capsys, "-n", "5", "--calibration", texts, "--block-sizes", "1,2")
        for method, blocks in check["top"][language].items():  # the default method's per language is few-shot (texts as written)
            ranked = (alone["methods"][method].get("by_regime") or {}).get("few_shot") or alone["methods"][method]["blocks"]
            assert [(b["start"], b["end"]) for b in blocks] == [(b["start"], b["end"]) for b in ranked[:3]]
    for method, spread in check["spread"].items():
        starts = [s for s, _ in spread["top1"].values()]
        assert spread["start_range"] == max(starts) - min(starts)


def test_contrastive_equals_anomaly_of_both_sets_against_their_difference(tiny_folder, tmp_path, capsys):
    from cp_onnx.analysis.scores import rank_blocks
    from cp_onnx.calibration import load_calibration

    data = _report(tiny_folder, tmp_path / "c", capsys, "-n", "4", "--method", "contrastive")
    both = tmp_path / "both.txt"
    both.write_text("\n".join(load_calibration("reasoning", n=4) + load_calibration("general", n=4)))
    parts = {name: _stats(_report(tiny_folder, tmp_path / name, capsys, "-n", n, "--calibration", source))
             for name, source, n in (("reasoning", "reasoning", "4"), ("general", "general", "4"), ("mixed", both, "8"))}
    expected = rank_blocks(parts["mixed"], "contrastive", (1, 2), contrast_stats=(parts["reasoning"], parts["general"]))
    got = data["methods"]["contrastive"]["blocks"]
    assert [(b["start"], b["end"]) for b in got] == [(b.start, b.end) for b in expected]
    np.testing.assert_allclose([b["score"] for b in got], [b.score for b in expected], rtol=1e-6, atol=1e-9)


def test_jacobian_and_heads_add_sections_and_a_circuit_graph(tiny_folder, tmp_path, capsys):
    import networkx as nx

    data = _report(tiny_folder, tmp_path, capsys, "-n", "2", "--jacobian", "--heads", "--exact-heads", "5")
    jsonschema.validate(data, report_mod.schema())
    assert {"jacobian", "heads", "mahalanobis"} <= set(data)
    exact = [r for r in data["heads"]["heads"] if r["exact"]]
    assert data["heads"]["exact_heads"] == len(exact) == 5 and all(r["kl_zero"] is not None for r in exact)
    assert sum(r["kl_zero"] is None for r in data["heads"]["heads"]) == 12 - 5
    assert {"stability", "jacobian", "mahalanobis"} <= set(data["methods"])
    graph = nx.read_graphml(tmp_path / "circuit.graphml")
    # 3 layers and 4 heads each: every one a node of the graph written beside the report.
    assert sum(1 for n in graph.nodes if n.startswith("blocks.") and ".attn.h" not in n) == 3
    assert sum(1 for n in graph.nodes if ".attn.h" in n) == 12
    assert (tmp_path / "circuit.json").is_file() and (tmp_path / "circuit.dot").is_file()


def test_default_method_decides_and_is_skipped_on_texts_without_numbers(tiny_folder, tmp_path, capsys):
    code, out, _ = run(["analyze", tiny_folder, "--out", tmp_path / "default", *TINY_ARGS], capsys)
    assert code == 0
    data = json.loads((tmp_path / "default" / "report.json").read_text())
    assert list(data["predictions"]) == ["zero_shot", "few_shot"]  # both regimes by default, each decided
    few, zero = data["predictions"]["few_shot"], data["predictions"]["zero_shot"]
    assert list(data["methods"])[0] == few["method"] == zero["method"] == "duplication_loss"
    assert out.startswith("zero-shot decision: ") and "\nfew-shot decision: " in out.split("\n\n")[0]
    assert "few-shot (calibration texts as written" in out and "zero-shot (each calibration question asked alone" in out
    assert (few["metric"], few["regime"], few["gain_per"]) == ("answer log-probability (digit tokens)", "few_shot", "digit token")
    assert (zero["regime"], zero["gain_per"], zero["texts"]["questions"]) == ("zero_shot", "question", 83)  # the shipped questions
    for regime, prediction in data["predictions"].items():
        assert prediction["decision"] in ("help", "abstain")
        ranked = data["methods"]["duplication_loss"]["by_regime"][regime]
        assert [(c["start"], c["end"]) for c in prediction["candidates"]][1:] == [(b["start"], b["end"]) for b in ranked if
                                                                                   (b["start"], b["end"]) != (prediction["candidates"][0]["start"], prediction["candidates"][0]["end"])][:2]
    # General texts hold no numbers and state no answers: beside the paper's methods, each regime is skipped with a note ...
    code, out, err = run(["analyze", tiny_folder, "--calibration", "general", "--out", tmp_path / "general", *TINY_ARGS], capsys)
    assert code == 0 and "note: the zero-shot prediction is skipped" in err
    assert "note: duplication_loss skipped: the reasoning calibration texts hold no numbers" in err
    assert " ".join(out.split("\n\n")[0].split()) == NO_PREDICTION  # the summary says first (wrapped) that nothing is recommended
    data = json.loads((tmp_path / "general" / "report.json").read_text())
    assert data["predictions"] == {} and list(data["methods"]) == ["stability", "anomaly", "composite", "boundary"]
    # ... and asked for alone, it is an error.
    _assert_fails(["analyze", tiny_folder, "--calibration", "general", "--method", "duplication_loss", "--out", tmp_path / "alone", *TINY_ARGS],
                  capsys, "hold no numbers", out=tmp_path / "alone")


@pytest.mark.parametrize("args, fragment", [
    (["--heads", "--exact-heads", "some"], "--exact-heads takes a number of heads (0 or more) or 'all', not 'some'"),
    (["--heads", "--exact-heads", "-2"], "not '-2'"),
    (["--exact-heads", "4"], "--exact-heads applies to head influence: add --heads"),
])
def test_bad_exact_heads(tiny_folder, tmp_path, capsys, args, fragment):
    _assert_fails(["analyze", tiny_folder, "--out", tmp_path, *TINY_ARGS, *args], capsys, fragment, out=tmp_path)


def test_exact_heads_default_and_all():
    from cp_onnx.analysis.heads import EXACT_HEADS
    from cp_onnx.analyze import AUTO, Settings, exact_heads_option

    assert Settings(heads=True, exact_heads=exact_heads_option(None)).exact_head_count == EXACT_HEADS
    assert Settings(heads=True, prune=True, exact_heads=exact_heads_option(None)).exact_head_count is None  # pruning: all exact
    assert exact_heads_option(None) == AUTO and exact_heads_option("ALL") is None and exact_heads_option(" 7") == 7


def test_zero_shot_regime_scores_the_stated_answers_and_says_so(tiny_folder, tmp_path, capsys):
    texts = tmp_path / "qa.jsonl"
    texts.write_text("".join(json.dumps(line) + "\n" for line in [
        {"text": "If 3x + 5 = 20, then x = 5.", "question": "If 3x + 5 = 20, what is x?", "answer": "5"},
        {"text": "What is 12 plus 30?", "answer": "42", "kind": "arithmetic"}, {"text": "Cats purr, and 2 + 2 = 4."}]))
    code, out, _ = run(["analyze", tiny_folder, "--regime", "zero", "--calibration", texts, "--method", "duplication_loss",
                        "--out", tmp_path / "zero", *TINY_ARGS], capsys)
    assert code == 0
    data = json.loads((tmp_path / "zero" / "report.json").read_text())
    jsonschema.validate(data, report_mod.schema())
    assert list(data["predictions"]) == ["zero_shot"]  # --regime zero: that one only
    prediction = data["predictions"]["zero_shot"]
    assert (prediction["regime"], prediction["gain_per"], prediction["texts"]["questions"]) == ("zero_shot", "question", 2)
    assert out.startswith("zero-shot decision: ") and "nats per question" in out.split("\n\n")[0]
    assert set(prediction["kinds"]["blocks"][0]["by_kind"]) == {"your texts", "arithmetic"}
    assert "zero-shot (each calibration question asked alone" in out and "decided on 2 of 2 questions" in out
    # Texts that state no answer, and an unknown regime, are refused with one line and no report.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "Cats purr, and 2 + 2 = 4."}) + "\n")
    _assert_fails(["analyze", tiny_folder, "--regime", "zero", "--calibration", plain, "--out", tmp_path / "none", *TINY_ARGS],
                  capsys, 'states an "answer"', out=tmp_path / "none")


def test_default_block_sizes_on_a_model_of_fewer_layers(tiny_folder, tmp_path, capsys):
    """Sizes 3, 4 and 5 on a 3-layer model: only [0, 3) fits. The default method's screen took the middle requested size
    (4), which has no block, and scored none (an AxisError traceback); it now screens among the sizes that fit."""
    assert main(["analyze", str(tiny_folder), "--out", str(tmp_path / "o"), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(b["start"], b["end"]) for b in report["methods"]["duplication_loss"]["blocks"]] == [(0, 3)]
