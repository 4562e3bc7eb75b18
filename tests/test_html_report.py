"""Plots and `cp-onnx report --html`: one self-contained page, rendered by headless Chromium."""
from __future__ import annotations

import base64
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cp_onnx.files import write_json
from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from cp_onnx.outputs import plots
from support import CHROMIUM, rendered_dom, tiny_report, write_tiny_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two layers x three heads of hand-made influence rows, as the circuit analysis writes them.
HEAD_ROWS = [{"layer": l, "head": h, "kl_zero": 10 * l + h, "loss_zero": 0.0, "influences": []} for l in range(3) for h in range(4)]


class Tables(HTMLParser):
    """Cell texts of every <table id=...>, and the src of every <img>."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif self._cell is not None:
            self._cell.append(" ")  # <br>, <small>: words apart

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    tables = Tables()
    tables.feed(page)
    return tables


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    """(report path, report) of the tiny llama, with a hand-made heads section."""
    root = tmp_path_factory.mktemp("html")
    data = tiny_report(write_tiny_folder(tiny_model, "llama", root / "llama"))
    data["heads"] = {"alpha": 0.05, "heads": HEAD_ROWS, "spearman": {}}
    return write_json(data, root / "report.json"), data


def sweep_rows() -> list[dict]:
    """A sweep of the 3-layer model by hand: block [1, 3) helps most."""
    gains = {(0, 1): -0.5, (1, 2): 0.2, (2, 3): -0.1, (0, 2): 0.1, (1, 3): 0.4}
    base = {"answer_logprob": -6.0, "greedy_accuracy": 0.25, "choice_accuracy": None, "general_nll": 3.0, "by_kind": {}}
    return [{"start": None, "end": None, **base}] + [
        {"start": s, "end": e, **base, "answer_logprob": -6.0 + g, "general_nll": 3.0 + abs(g)} for (s, e), g in gains.items()]


def expected_top_rows(data: dict, top: int) -> list[tuple[str, str, str]]:
    """(method, block, depth) of each method's first ``top`` blocks, worked out from the report."""
    n = data["model"]["num_layers"]
    return [(m, f"[{b['start']}, {b['end']})", f"{100 * b['start'] / n:.0f}–{100 * b['end'] / n:.0f}%")
            for m, e in data["methods"].items() for b in e["blocks"][:top]]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_html_page_renders_with_tables_and_plots(tiny, tmp_path, capsys):
    report_path, data = tiny
    sweep_path = tmp_path / "sweep.jsonl"
    header = {"format": "cp-onnx-sweep", "version": 1, "model": {"onnx_sha256": data["model"]["onnx_sha256"]}, "suite": {}}
    sweep_path.write_text("".join(json.dumps(r) + "\n" for r in [header, *sweep_rows()]))
    page = tmp_path / "out" / "report.html"
    assert main(["report", str(report_path), "--html", str(page), "--sweep", str(sweep_path), "--top", "3"]) == 0
    capsys.readouterr()

    dom = parse(rendered_dom(page, tmp_path))
    rows = dom.tables["top-circuits"][1:]
    methods = list(data["methods"])
    got, method = [], None
    for cells in rows:  # the method cell spans its rows: it leads only the first of them
        if len(cells) == 6:
            method = cells[0].split(" ")[0]
            cells = cells[1:]
        got.append((method, cells[1], cells[3]))
    assert got == expected_top_rows(data, 3)
    assert [r[0] for r in got] == [m for m in methods for _ in range(3)]

    layer_rows = dom.tables["layer-statistics"][1:]
    assert [r[0] for r in layer_rows] == ["0", "1", "2"]
    assert float(layer_rows[1][1]) == pytest.approx(data["layers"][1]["representation_change"], rel=1e-3)

    validation = dom.tables["validation-few_shot"][1:]  # a version 1 sweep file: the shipped 2-shot suite, read as few-shot
    best = {(r[0], r[1]): r[5] for r in validation}
    assert best[("stability", "answer_logprob")] == "[1, 3)"  # the hand-made sweep's best block

    # Three plots (layers, heads, sweep), all inline PNGs: nothing is fetched from elsewhere.
    assert len(dom.images) == 3
    for src in dom.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"(src|href)=['\"](?!data:)", page.read_text())


def test_page_without_heads_or_sweep_has_one_plot(tiny, tmp_path):
    from cp_onnx.outputs.html_report import render

    _, data = tiny
    plain = {k: v for k, v in data.items() if k != "heads"}
    dom = parse(render(plain))
    assert len(dom.images) == 1 and not any(name.startswith("validation") for name in dom.tables) and "top-circuits" in dom.tables


def test_plots_cli_and_head_matrix(tiny, tmp_path):
    report_path, data = tiny
    assert main(["report", str(report_path), "--plots", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["heads.png", "layers.png"]
    assert (tmp_path / "plots" / "layers.png").read_bytes()[:8] == PNG_MAGIC

    expected = np.array([[10 * l + h for h in range(4)] for l in range(3)], dtype=float)
    np.testing.assert_array_equal(plots.head_matrix(data), expected)
    np.testing.assert_array_equal(plots.head_matrix({"heads": expected.tolist()}), expected)  # a plain layers x heads array
    assert plots.head_matrix({k: v for k, v in data.items() if k != "heads"}) is None
    assert plots.top_blocks(data) == {m: (e["blocks"][0]["start"], e["blocks"][0]["end"]) for m, e in data["methods"].items()}


def test_plots_without_matplotlib_say_what_to_install(tiny, monkeypatch):
    _, data = tiny
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    with pytest.raises(CpOnnxError, match=r"pip install 'cp-onnx\[plots\]'"):
        plots.layer_profile(data)


def test_head_map_shows_the_estimate_when_only_some_heads_were_ablated():
    rows = [{"layer": l, "head": h, "kl_estimate": float(l + h), "kl_zero": 1.0 if (l, h) == (0, 0) else None} for l in range(2) for h in range(2)]
    assert plots.head_column({"heads": {"heads": rows}}) == "kl_estimate"
    np.testing.assert_array_equal(plots.head_matrix({"heads": {"heads": rows}}), [[0, 1], [1, 2]])
    for row in rows:
        row["kl_zero"] = 2.0
    assert plots.head_column({"heads": {"heads": rows}}) == "kl_zero"
    np.testing.assert_array_equal(plots.head_matrix({"heads": {"heads": rows}}), [[2, 2], [2, 2]])
