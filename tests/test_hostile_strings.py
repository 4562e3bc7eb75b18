"""Strings from a model, its folder, its texts and its report that carry markup or script reach every output
as text: the HTML page (rendered by headless Chromium: no script runs), the text report, DOT, GraphML,
the C++ reader's output and the ONNX metadata, each still in its own format."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import onnx
import pytest

from cp_onnx.analysis.circuit import build_circuit_graph, write_circuit
from cp_onnx.cli import main
from cp_onnx.files import write_json
from cp_onnx.outputs.decision import NO_PREDICTION
from cp_onnx.outputs.embed import PREFIX, format_text
from support import CHROMIUM, cpp_tools_missing, rendered_dom, run_reader, write_tiny_folder

# Each payload, if it ever ran, would mark the page's body: the rendered DOM shows whether any did.
SCRIPT = "<script>document.body.setAttribute('data-pwned', 'script')</script>"
IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned', 'img')\">"
JS = "javascript:document.body.setAttribute('data-pwned','js')"
NAME = f"{SCRIPT}{IMG} & \"quotes\" 'too'"
FOLDER = "<img src=x onerror=document.body.setAttribute('data-pwned','path')>"  # no slash: it is a folder name
METHOD = f"{SCRIPT}{JS}"
STATISTIC = IMG


@pytest.fixture(scope="module")
def hostile(tiny_model, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(report path, report, model folder): a tiny model named with payloads, analysed on texts in a folder named
    with one, and a method and a statistic named with others (as a hand-edited report could have)."""
    root = tmp_path_factory.mktemp("hostile")
    folder = write_tiny_folder(tiny_model, "llama", root / "model")
    (folder / "cp_onnx.json").write_text(json.dumps({"source": NAME, "family": IMG, "onnx": {"model": "model.onnx"}}))
    texts = root / FOLDER / "texts.txt"
    texts.parent.mkdir()
    texts.write_text("\n".join([f"{SCRIPT} 12 plus 30 is 42.", f"{IMG} 7 times 6 is 42.", f"{JS} 2 and 2 make 4."]) + "\n")
    assert main(["analyze", str(folder), "--calibration", str(texts), "--method", "stability", "--block-sizes", "1,2",
                 "--out", str(root / "out")]) == 0
    data = json.loads((root / "out" / "report.json").read_text())
    data["methods"][METHOD] = data["methods"]["stability"]
    for row in data["layers"]:
        row[STATISTIC] = 0.5
    return write_json(data, root / "report.json"), data, folder


class Page(HTMLParser):
    """Every element's tag, the attributes seen, and the text of the page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _page(markup: str) -> Page:
    page = Page()
    page.feed(markup)
    return page


def test_report_keeps_the_strings_as_data(hostile):
    _, data, _ = hostile
    assert data["model"]["name"] == NAME and data["model"]["family"] == IMG
    assert data["calibration"]["source"].endswith(f"{FOLDER}/texts.txt")


def _check_page(page: Page) -> None:
    """No element or attribute a payload would have made; the payloads are there, as text."""
    assert "script" not in page.tags and "data-pwned" not in page.attributes and "onerror" not in page.attributes
    assert page.tags.count("img") == 1  # the one plot
    text = "".join(page.text)
    for payload in (NAME, IMG, METHOD, FOLDER):
        assert payload in text


def test_html_escapes_every_string(hostile, tmp_path, capsys):
    report_path, _, _ = hostile
    page = tmp_path / "report.html"
    assert main(["report", str(report_path), "--html", str(page)]) == 0
    capsys.readouterr()
    _check_page(_page(page.read_text()))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_no_script_runs_in_a_browser(hostile, tmp_path, capsys):
    report_path, _, _ = hostile
    page = tmp_path / "report.html"
    assert main(["report", str(report_path), "--html", str(page)]) == 0
    capsys.readouterr()
    _check_page(_page(rendered_dom(page, tmp_path)))  # the DOM after the page's scripts, had any run
    # The check can see a payload that runs: the same payloads written unescaped do mark the body.
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body><p>{SCRIPT}</p><p>{IMG}</p></body></html>")
    assert "data-pwned" in _page(rendered_dom(control, tmp_path)).attributes


def test_text_report_keeps_one_fact_a_line(hostile, capsys):
    report_path, data, _ = hostile
    assert main(["report", str(report_path), "--text"]) == 0
    text = capsys.readouterr().out
    assert text == format_text(data)
    lines = text.splitlines()
    assert lines[0] == NO_PREDICTION and lines[1] == f"model {NAME}" and f"method {METHOD}" in lines
    assert all(re.fullmatch(rf"  layer \d .*{re.escape(STATISTIC)}=0\.5", line) for line in lines if line.startswith("  layer "))


def test_dot_and_graphml_quote_the_strings(hostile, tmp_path):
    _, data, _ = hostile
    paths = write_circuit(build_circuit_graph(data), tmp_path)
    graph = nx.read_graphml(paths["graphml"])  # XML that parses, with the strings back as they were
    assert graph.graph[f"circuit_{METHOD}"] == graph.graph["circuit_stability"]
    assert any(METHOD in attributes["circuits"] for _, attributes in graph.nodes(data=True))  # comma-joined method names
    dot = paths["dot"].read_text()
    quoted = '"(?:[^"\\\\]|\\\\.)*"'  # a DOT ID: a double-quoted string whose quotes and backslashes are escaped
    statement = rf"  {quoted}(?: -> {quoted})?(?: \[{quoted}={quoted}(?:, {quoted}={quoted})*\])?;|  {quoted}={quoted};"
    body = dot.splitlines()
    assert body[0] == "digraph circuit {" and body[-1] == "}"
    assert all(re.fullmatch(statement, line) for line in body[1:-1]), [l for l in body[1:-1] if not re.fullmatch(statement, l)][:3]
    assert '"circuit_' + METHOD.replace('"', '\\"') + '"=' in dot


def test_onnx_metadata_holds_the_strings(hostile, tmp_path, capsys):
    report_path, data, folder = hostile
    out = tmp_path / "model.onnx"
    assert main(["embed", str(report_path), str(folder / "model.onnx"), "--out", str(out)]) == 0
    capsys.readouterr()
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    circuits = json.loads(props[PREFIX + "circuits"])
    assert circuits[METHOD] == circuits["stability"]
    assert f"{METHOD}={circuits[METHOD][0]['start']}:{circuits[METHOD][0]['end']}" in props[PREFIX + "top_blocks"].split(";")


@pytest.mark.skipif(cpp_tools_missing() is not None, reason=cpp_tools_missing() or "")
def test_cpp_reader_prints_the_same_lines(hostile, reader, capsys):
    report_path, _, _ = hostile
    done = run_reader(reader, report_path)
    assert done.returncode == 0, done.stderr
    assert main(["report", str(report_path), "--text"]) == 0
    assert done.stdout == capsys.readouterr().out
