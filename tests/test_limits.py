"""Resource bombs refused before anything is allocated: tensors declaring terabytes, oversized files and
lines, texts too long for memory. Each refusal is one line naming the limit and how to raise it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cp_onnx.models import budget
from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.runner import Runner
from graph_passes.errors import GraphPassError
from graph_passes.mapped import load_mapped
from support import write_tiny_folder

TERA = [1 << 20, 1 << 20]  # 2**40 float32 elements: 4.4 TB


def _model(nodes, initializers=(), outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _declaring(dims, data=b"\0" * 16) -> TensorProto:
    """A float tensor whose dims say one size while it holds 16 bytes (the bomb: the shape is what gets allocated)."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims)
    tensor.raw_data = data
    return tensor


def _one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cp-onnx: error: ") and "\n" not in err
    return err


@pytest.fixture
def constant_of_shape_bomb() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20, 1 << 10], dtype=np.int64), "shape")
    return _model([helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])], [shape])


def test_initializer_declaring_terabytes_is_refused_naming_the_limit(tmp_path):
    onnx.save_model(_model([helper.make_node("Add", ["x", "w"], ["y"])], [_declaring(TERA)]), tmp_path / "model.onnx")
    with pytest.raises(GraphPassError, match=r"initializer|weight 'w' declares shape \[1048576, 1048576\] \(4\.4 TB\).*CP_ONNX_MAX_TENSOR_GB=N"):
        load_mapped(tmp_path / "model.onnx")


def test_constant_and_constant_of_shape_bombs_are_refused_on_disk_and_in_memory(tmp_path, constant_of_shape_bomb):
    constant = _model([helper.make_node("Constant", [], ["c"], value=_declaring(TERA)), helper.make_node("Add", ["x", "c"], ["y"])])
    for model, node in ((constant, "Constant node 'c'"), (constant_of_shape_bomb, "ConstantOfShape node 'big'")):
        onnx.save_model(model, tmp_path / "model.onnx")
        with pytest.raises(GraphPassError, match=re.escape(node) + r" declares shape .* [TP]B\)"):
            load_mapped(tmp_path / "model.onnx")
        with pytest.raises(CpOnnxError, match=re.escape(node)):  # a graph built in memory, before onnxruntime sees it
            Runner(model, threads=1)


def test_the_limit_is_an_option_and_bytes_must_still_match_the_shape(tmp_path, monkeypatch):
    onnx.save_model(_model([helper.make_node("Add", ["x", "w"], ["y"])], [_declaring([2, 2], b"\0" * 8)]), tmp_path / "model.onnx")
    monkeypatch.setenv("CP_ONNX_MAX_TENSOR_GB", "1e-8")  # 10 bytes: the 16-byte tensor is over it
    with pytest.raises(GraphPassError, match=r"\(1\.6e-08 GB\), more than the 1e-08 GB limit"):
        load_mapped(tmp_path / "model.onnx")
    monkeypatch.setenv("CP_ONNX_MAX_TENSOR_GB", "1")  # within the limit, but 8 bytes cannot fill a 16-byte shape
    with pytest.raises(GraphPassError, match=r"holds 8 bytes but its shape \[2, 2\] needs 16"):
        load_mapped(tmp_path / "model.onnx")


def test_refused_before_allocation_under_a_small_address_space(tmp_path, constant_of_shape_bomb):
    """A child limited to 3 GB of address space gets the one-line refusal (allocating first would end in MemoryError or a kill)."""
    onnx.save_model(constant_of_shape_bomb, tmp_path / "model.onnx")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from cp_onnx.models.runner import Runner; from cp_onnx.errors import CpOnnxError\n"
            f"try: Runner({str(tmp_path / 'model.onnx')!r}, threads=1)\nexcept CpOnnxError as e: print(e); sys.exit(2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ConstantOfShape node 'big' declares shape [1048576, 1048576, 1024]" in done.stdout


def test_external_data_longer_than_declared_is_refused(tmp_path):
    weight = np.arange(512, dtype=np.float32)
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], [numpy_helper.from_array(weight, "w")])
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    with open(tmp_path / "w.bin", "ab") as handle:  # appended bytes; the reference gives no length, so the file's size counts
        handle.write(b"\0" * 64)
    stub = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    for entry in stub.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(weight.nbytes + 64)
    onnx.save_model(stub, tmp_path / "model.onnx")
    with pytest.raises(GraphPassError, match=r"weight 'w' holds 2112 bytes but its shape \[512\] needs 2048"):
        load_mapped(tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory) -> Path:
    return write_tiny_folder(tiny_model, "llama", tmp_path_factory.mktemp("limits") / "llama")


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk (and whose reading would take ``size`` of memory)."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def test_oversized_tokenizer_calibration_and_probe_files_are_refused_unread(folder, tmp_path, capsys):
    huge = tmp_path / "huge"
    huge.mkdir()
    shutil.copy(folder / "model.onnx", huge / "model.onnx")
    _sparse(huge / "tokenizer.json", 5 << 30, b'{"version": "1.0", "model": {"vocab": {"')
    err = _one_line_error(capsys, ["analyze", huge, "--out", tmp_path / "o"])
    assert err == f"cp-onnx: error: the tokenizer {huge / 'tokenizer.json'} is larger than 256 MB; if it is genuine, raise the limit with CP_ONNX_MAX_FILE_MB=N"

    texts = _sparse(tmp_path / "texts.txt", 1 << 30, b"A gigabyte-long line ")  # one line: no newline anywhere
    err = _one_line_error(capsys, ["analyze", folder, "--calibration", texts, "--out", tmp_path / "o"])
    assert "calibration file" in err and "larger than 256 MB" in err

    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"kind": "arithmetic", "prompt": "2+2=" + "7" * 2_000_000, "answer": "4"}) + "\n")
    err = _one_line_error(capsys, ["sweep", folder, "--suite", suite, "--out", tmp_path / "s.jsonl"])
    assert err == f"cp-onnx: error: line 1 of the probe suite {suite} is longer than 1 MB; split it, or raise the limit with CP_ONNX_MAX_LINE_MB=N"
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.jsonl").exists()


def test_file_limits_are_options(folder, tmp_path, monkeypatch):
    from cp_onnx.calibration import read_texts

    texts = tmp_path / "texts.txt"
    texts.write_text("x" * 1500 + "\nshort\n")
    monkeypatch.setenv("CP_ONNX_MAX_LINE_MB", "0.001")
    with pytest.raises(CpOnnxError, match=r"line 1 of the calibration file .* longer than 0\.001 MB"):
        read_texts(texts)
    monkeypatch.setenv("CP_ONNX_MAX_LINE_MB", "0.002")
    assert read_texts(texts) == ["x" * 1500, "short"]
    monkeypatch.setenv("CP_ONNX_MAX_FILE_MB", "0.001")
    with pytest.raises(CpOnnxError, match=r"larger than 0\.001 MB"):
        read_texts(texts)


def test_a_fifo_is_refused_instead_of_blocking(tmp_path, capsys):
    os.mkfifo(tmp_path / "report.json")  # opening it would wait for a writer forever
    err = _one_line_error(capsys, ["report", tmp_path / "report.json"])
    assert err == f"cp-onnx: error: the report {tmp_path / 'report.json'} is not a regular file; give the path of a file"


def test_texts_too_long_for_memory_are_refused_with_what_fits(folder, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "long.txt"
    texts.write_text("a" * 3000 + "\n")  # byte-level tokenizer: 3000 tokens
    monkeypatch.setenv("CP_ONNX_MEMORY_GB", "0.05")
    err = _one_line_error(capsys, ["analyze", folder, "--calibration", texts, "--max-length", "100000", "--regime", "few", "--out", tmp_path / "o"])
    found = re.fullmatch(r"cp-onnx: error: texts of 3000 tokens in batches of 1 need about ([\d.]+) GB of memory \(3 layers, hidden 64, "
                         r"4 heads, vocabulary (\d+)\), and 0\.05 GB is available; --max-length (\d+) fits \(or lower --batch-size; "
                         r"\$CP_ONNX_MEMORY_GB sets the memory to plan for\)", err)
    assert found, err
    # The attention patterns alone (3 layers x 4 heads x 3000^2 floats) are a floor on the need.
    assert float(found[1]) * 1e9 >= 3 * 4 * 3000**2 * 4
    fits = int(found[3])
    shape = budget.Shape(3, 64, 4, int(found[2]))
    assert budget.batch_bytes(shape, 1, fits) <= 0.05e9 < budget.batch_bytes(shape, 1, fits + 1)
    assert main(["analyze", str(folder), "--calibration", str(texts), "--max-length", str(fits), "--method", "stability",
                 "--block-sizes", "1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.json").is_file()


@pytest.mark.parametrize("option", ["--max-length", "--batch-size", "--threads"])
def test_counts_must_be_positive(folder, tmp_path, capsys, option):
    err = _one_line_error(capsys, ["analyze", folder, option, "0", "--out", tmp_path / "o"])
    assert err == f"cp-onnx: error: {option} must be a positive integer, not 0"


# Issue 26: the lengths a calibration file or probe suite sets, bounded before any batch is built from them.

def _questions(path: Path, question: str, count: int = 12) -> Path:
    """A calibration file whose texts are short (the statistics' batches fit) and whose questions are ``question``."""
    path.write_text("".join(json.dumps({"text": f"Tom has {k} apples and buys 3 more.", "question": question, "answer": "4"}) + "\n"
                            for k in range(count)))
    return path


def test_zero_shot_questions_are_never_cut_and_longer_ones_are_refused(folder, tmp_path, capsys, monkeypatch):
    """The issue's case: 12 questions of 60,000 characters, --regime zero (killed at 19 GB before). Each is asked with
    its prompt and answer, and the byte-level tokenizer makes a token of each byte: past a probe item's 2,048 tokens, refused."""
    questions = _questions(tmp_path / "q.jsonl", "x" * 60_000)
    err = _one_line_error(capsys, ["analyze", folder, "--calibration", questions, "--regime", "zero", "--out", tmp_path / "o"])
    tokens = len("Question: ") + 60_000 + len("\nAnswer:") + len(" 4")
    assert err == (f"cp-onnx: error: calibration question 1 ('{'x' * 40}'...) is {tokens} tokens with its prompt and answer, more than "
                   "the 2048 a question asked alone may take; shorten it (questions are never cut)")
    # Within that limit, the questions' batches are what the memory check sees (not only the statistics' texts).
    questions = _questions(tmp_path / "q2.jsonl", "x" * 2000)
    tokens = len("Question: ") + 2000 + len("\nAnswer:") + len(" 4")
    monkeypatch.setenv("CP_ONNX_MEMORY_GB", "0.5")
    err = _one_line_error(capsys, ["analyze", folder, "--calibration", questions, "--regime", "zero", "--out", tmp_path / "o"])
    found = re.fullmatch(rf"cp-onnx: error: the default prediction's batches \(3 batches, the largest 12 rows of {tokens} tokens; 3 layers, "
                         r"hidden 64, 4 heads\) need about ([\d.]+) GB of memory, and 0.5 GB is available; use fewer or shorter texts "
                         r"or questions, or a lower --max-length \(\$CP_ONNX_MEMORY_GB sets the memory to plan for\)", err)
    assert found, err
    assert float(found[1]) * 1e9 >= 3 * 12 * 4 * tokens**2 * 4  # a floor: one layer's attention scores for the 12 rows
    assert not (tmp_path / "o").exists()


def test_the_prediction_memory_check_counts_every_batch_it_builds(folder, tmp_path, monkeypatch, capsys):
    """Questions of 510 tokens pass the statistics' check (the texts are short) but not a budget just under what the
    prediction's batches need, counted by hand from the files' bytes (one token each); just over it, the analysis runs."""
    from cp_onnx.models.budget import Shape, evaluator_bytes, planned_batches
    from cp_onnx.calibration import load_calibration

    shape = Shape(3, 64, 4, 256)
    memory, disk = evaluator_bytes(shape, [(16, 510), (4, 510)])
    # kept layer outputs, contexts (3 hidden floats and a mask row per token), every layer's keys and values of the 16 rows,
    # one layer's work for them (x 1.5; 8,160 tokens, more than a stacked call's 2,048), the head (logits and a copy of
    # 128 MB), the stacked paths' streams (128 MB)
    kept = 3 * 20 * 510 * 64 * 4
    contexts = 20 * 510 * (3 * 64 + 510) * 4
    keys_values = 3 * 16 * 510 * 2 * 64 * 4
    working = 16 * 510 * (20 * 64 + 3 * 4 * 510) * 4 * 1.5
    assert (memory, disk) == (kept + contexts + keys_values + int(working) + 3 * 128 * 2**20 + 128 * 2**20, 0)
    short = evaluator_bytes(shape, [(1, 20)])[0]  # a short batch's layer calls are stacked paths of 2,048 tokens
    assert short == 3 * 20 * 64 * 4 + 20 * (3 * 64 + 20) * 4 + 3 * 20 * 2 * 64 * 4 + int(2048 * (20 * 64 + 3 * 4 * 20) * 4 * 1.5) + 4 * 128 * 2**20

    questions = _questions(tmp_path / "q.jsonl", "y" * 490, count=20)
    assert len("Question: ") + 490 + len("\nAnswer:") + len(" 4") == 510 and planned_batches([510] * 20) == [(16, 510), (4, 510)]
    texts = [len(f"Tom has {k} apples and buys 3 more.") for k in range(10)]  # -n 10 of them; the shipped general texts, cut at 600
    general = [min(len(text.encode()), 600) for text in load_calibration("general", n=10)]
    need = evaluator_bytes(shape, [(16, 510), (4, 510)] + planned_batches(texts + general))[0] + 4 * 2000 * 20 * 8  # and the bootstrap's draws
    args = ["analyze", folder, "--calibration", questions, "--regime", "zero", "--max-length", "600", "--block-sizes", "1", "--out", tmp_path / "o"]
    monkeypatch.setenv("CP_ONNX_MEMORY_GB", str(need / 1e9 * 0.999))
    err = _one_line_error(capsys, args)
    assert "the default prediction's batches (4 batches, the largest 16 rows of 510 tokens" in err
    monkeypatch.setenv("CP_ONNX_MEMORY_GB", str(need / 1e9 * 1.001))
    assert main([str(a) for a in args]) == 0 and (tmp_path / "o" / "report.json").is_file()


def test_probe_items_longer_than_their_limit_are_refused_and_their_batches_checked(folder, tmp_path, capsys, monkeypatch):
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"kind": "arithmetic", "shots": "Question: 1+1?\nAnswer: 2\n\n" * 70}) + "\n"
                     + json.dumps({"kind": "arithmetic", "prompt": "Question: 2+2?\nAnswer:", "answer": " 4"}) + "\n")
    out = tmp_path / "s.jsonl"
    tokens = len("Question: 1+1?\nAnswer: 2\n\n") * 70 + len("Question: 2+2?\nAnswer:") + len(" 4")
    err = _one_line_error(capsys, ["sweep", folder, "--suite", suite, "--blocks", "1", "--max-item-length", "1000", "--out", out])
    assert err == (f"cp-onnx: error: probe item 'arithmetic-000' is {tokens} tokens with its shots, prompt and answer, more than 1000 "
                   "(--max-item-length); shorten it, or raise the limit")
    monkeypatch.setenv("CP_ONNX_MEMORY_GB", "0.01")
    err = _one_line_error(capsys, ["sweep", folder, "--suite", suite, "--blocks", "1", "--out", out])  # the default limit: 2048
    # the batch runs all but the answer's last token (its logits predict nothing scored)
    assert err.startswith("cp-onnx: error: the sweep's batches (") and f"1 rows of {tokens - 1} tokens" in err
    assert not out.exists()  # refused before the sweep file was created


def test_files_of_too_many_lines_are_refused_before_they_are_split(folder, tmp_path, monkeypatch):
    from cp_onnx.calibration import read_texts
    from cp_onnx.groundtruth.sweep import read_sweep

    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n" * 50 + "\r" * 60)  # str.splitlines splits at a carriage return too
    monkeypatch.setenv("CP_ONNX_MAX_LINES", "100")
    with pytest.raises(CpOnnxError, match=r"the calibration file .*texts.txt has more than 100 lines; split it, or if it is genuine raise "
                                          r"the limit with CP_ONNX_MAX_LINES=N"):
        read_texts(texts)
    monkeypatch.setenv("CP_ONNX_MAX_LINES", "110")
    assert read_texts(texts) == ["a text"] * 50
    texts.write_text("a text\r\n" * 110)  # one line each: a CRLF is one break
    assert read_texts(texts) == ["a text"] * 110
    (tmp_path / "sweep.jsonl").write_text("{}\n" * 111)
    with pytest.raises(CpOnnxError, match="the sweep file .* has more than 110 lines"):
        read_sweep(tmp_path / "sweep.jsonl")


@pytest.mark.parametrize("name, text, message", [
    ("texts.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "line 1 of {path} nests JSON too deeply (more than 64 levels)"),  # the case
    ("texts.jsonl", '{"text": "ok", "extra": ' + "[" * 65 + "]" * 65 + "}\n", "line 1 of {path} nests JSON too deeply"),
    ("batch.toml", "a" + ".a" * 100_000 + " = 1\n", "{path} nests tables, arrays or dotted keys more than 64 deep"),  # 19 GB in tomllib
    ("batch.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "{path} nests tables, arrays or dotted keys more than 64 deep"),
    ("batch.toml", "a = " + "{b=" * 100_000 + "1" + "}" * 100_000 + "\n", "{path} nests tables, arrays or dotted keys more than 64 deep"),
    ("report.json", '{"a": "' + "[" * 100_000 + '"}', "is not a cp-onnx report"),  # brackets inside a string are text
])
def test_nesting_is_bounded_before_any_parser_recurses(folder, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    command = {"texts.jsonl": ["analyze", folder, "--calibration", path, "--out", tmp_path / "o"], "batch.toml": ["batch", path],
               "report.json": ["report", path, "--text"]}[name]
    err = _one_line_error(capsys, command)
    assert message.format(path=path) in err


def test_json_documents_are_refused_past_their_size_limit(tmp_path):
    from cp_onnx import inputs
    from cp_onnx.analysis.report import read_report

    report = tmp_path / "report.json"
    report.write_text("[" + "{}," * (inputs.MAX_JSON_MB * 1_000_000 // 3) + "{}]")  # parsed: a dict per 3 bytes, 20 times the file
    with pytest.raises(CpOnnxError, match=rf"the report .* is larger than {inputs.MAX_JSON_MB} MB"):
        read_report(report)


def test_tokenizer_json_nesting_is_bounded_by_its_parser(folder, tmp_path, capsys):
    """tokenizer.json is read by json (its added tokens checked), then by the tokenizers library (serde_json, which stops at
    128 levels): without a scan of its 33 MB (Gemma), json's own recursion limit stops deep nesting, in one line."""
    deep = tmp_path / "deep"
    deep.mkdir()
    shutil.copy(folder / "model.onnx", deep / "model.onnx")
    (deep / "tokenizer.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    err = _one_line_error(capsys, ["analyze", deep, "--out", tmp_path / "o"])
    assert err == f"cp-onnx: error: {deep / 'tokenizer.json'} nests JSON too deeply to be read; re-export the model"
    (deep / "tokenizer.json").write_text('{"model": ' + "[" * 200 + "]" * 200 + "}")  # within json's limit, past the library's
    err = _one_line_error(capsys, ["analyze", deep, "--out", tmp_path / "o"])
    assert err.startswith(f"cp-onnx: error: {deep / 'tokenizer.json'} is not a valid tokenizers file (Exception: recursion limit exceeded")


def test_probe_items_of_too_many_options_are_refused(tmp_path):
    """Each option is tokenized and matched against the item's other sequences: 90,000 options fit on one 1 MB line."""
    from cp_onnx import inputs
    from cp_onnx.groundtruth.probes import load_suite

    options = [f" a{k}" for k in range(inputs.MAX_PROBE_OPTIONS + 1)]
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"kind": "comparison", "prompt": "Question: pick one\nAnswer:", "answer": options[0], "options": options}) + "\n")
    with pytest.raises(CpOnnxError, match=rf"line 1 of .* has {inputs.MAX_PROBE_OPTIONS + 1} options, more than {inputs.MAX_PROBE_OPTIONS}"):
        load_suite(suite)
    suite.write_text(json.dumps({"kind": "comparison", "prompt": "Question: pick one\nAnswer:", "answer": options[0], "options": options[:-1]}) + "\n")
    assert len(load_suite(suite)[0].options) == inputs.MAX_PROBE_OPTIONS
