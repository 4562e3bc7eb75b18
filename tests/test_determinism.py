"""report.json is byte-identical across reruns at one thread count (timings aside); across 1 and 2 threads every
ranking is identical and every number agrees within TOLERANCE (onnxruntime splits sums differently per thread)."""
from __future__ import annotations

import json
import math
import re

import pytest

from cp_onnx.cli import main
from support import write_tiny_folder

ARGS = ["-n", "10", "--block-sizes", "1,2"]  # the default methods: duplication_loss and the paper's four
TOLERANCE = dict(rel=1e-4, abs=1e-6)
TIMINGS = re.compile(r'\n "timings": \{[^{}]*\}(,?)')


@pytest.fixture(scope="module")
def reports(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    folder = write_tiny_folder(tiny_model, "llama", root / "llama")
    texts = {}
    for name, threads in (("first", 1), ("again", 1), ("two", 2)):
        assert main(["analyze", str(folder), "--threads", str(threads), "--out", str(root / name), *ARGS]) == 0
        texts[name] = (root / name / "report.json").read_text()
    return texts


def _pairs(a, b, at=""):
    """(path, value a, value b) of every leaf of two JSON values of the same shape."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, at
    if isinstance(a, dict):
        assert a.keys() == b.keys(), at
        for key in a:
            yield from _pairs(a[key], b[key], f"{at}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), at
        for index, (x, y) in enumerate(zip(a, b)):
            yield from _pairs(x, y, f"{at}[{index}]")
    else:
        yield at, a, b


def test_reruns_are_byte_identical_but_for_timings(reports):
    first, again = (TIMINGS.sub(r"\1", reports[name]) for name in ("first", "again"))
    assert TIMINGS.search(reports["first"]) and "timings" not in first
    assert first == again


def test_thread_counts_agree_on_rankings_and_within_tolerance(reports):
    one, two = (json.loads(reports[name]) for name in ("first", "two"))
    for data in (one, two):
        data.pop("timings")
    for method in one["methods"]:
        assert [(b["start"], b["end"]) for b in one["methods"][method]["blocks"]] == \
               [(b["start"], b["end"]) for b in two["methods"][method]["blocks"]], method
    assert {r: p["decision"] for r, p in one["predictions"].items()} == {r: p["decision"] for r, p in two["predictions"].items()}
    worst = 0.0
    for at, a, b in _pairs(one, two):
        if isinstance(a, float) and isinstance(b, float):
            assert a == pytest.approx(b, **TOLERANCE), at
            worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-12))
        else:
            assert a == b, at
    assert math.isfinite(worst)
