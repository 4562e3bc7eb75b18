"""circuit_analysis on a tiny model, the circuit graph and its GraphML, node-link JSON and DOT files."""
from __future__ import annotations

import json
import math
import re

import networkx as nx
import pytest
from scipy.stats import spearmanr

from cp_onnx.analysis.circuit import build_circuit_graph, circuit_analysis, head_node, layer_node, to_dot, write_circuit
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder
from support import write_byte_tokenizer

TEXTS = ["the cat sat on it", "2 + 3 = 5, so 5 - 3 = 2"]
SIZES = (1, 2)


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    """The analysis sections merged into a report with hand-made paper statistics and a paper method."""
    _, onnx_path = tiny_model("llama")
    folder = tmp_path_factory.mktemp("circuit")
    write_byte_tokenizer(folder)
    sections = circuit_analysis(ModelFolder(folder, onnx_path), TEXTS, block_sizes=SIZES)
    paper = {
        "layers": [{"layer": l, "representation_change": 1.5 * l, "attention_entropy": None} for l in range(3)],
        "methods": {"stability": {"blocks": [{"start": 0, "end": 2, "score": 1.0, "metrics": {}}]}},
    }
    return {**sections, "layers": paper["layers"], "methods": {**paper["methods"], **sections["methods"]}}, folder, onnx_path


def test_sections_cover_every_layer_and_head(report):
    data, _, _ = report
    assert [row["layer"] for row in data["jacobian"]["layers"]] == [0, 1, 2]
    assert all(row["frobenius_logits"] > 0 and row["gain_logits"] > 0 for row in data["jacobian"]["layers"])
    assert data["jacobian"]["tokens"] == sum(len(t.encode()) for t in TEXTS)  # byte tokenizer: one id per byte
    assert [(row["layer"], row["head"]) for row in data["heads"]["heads"]] == [(l, h) for l in range(3) for h in range(4)]
    assert set(data["heads"]["spearman"]) == {"loss_estimate~loss_zero", "kl_estimate~kl_zero", "loss_estimate~loss_mean", "kl_estimate~kl_mean"}
    assert len(data["mahalanobis"]["layers"]) == 3 and len(data["mahalanobis"]["neurons"]) == 3 * 2
    for method in ("jacobian", "mahalanobis"):
        blocks = data["methods"][method]["blocks"]
        assert len(blocks) == 3 + 2  # every block of size 1 and 2 in 3 layers
        assert [b["score"] for b in blocks] == sorted((b["score"] for b in blocks), reverse=True)
    json.dumps(data, allow_nan=False)  # report-ready: plain JSON, no NaN


def test_results_are_deterministic(report):
    data, folder, onnx_path = report
    again = circuit_analysis(ModelFolder(folder, onnx_path), TEXTS, block_sizes=SIZES)
    for section in ("jacobian", "heads", "mahalanobis"):
        assert again[section] == data[section]
    assert again["methods"] == {method: data["methods"][method] for method in ("jacobian", "mahalanobis")}


def test_graph_holds_layers_heads_scores_and_circuits(report):
    data, _, _ = report
    graph = build_circuit_graph(data)
    assert graph.number_of_nodes() == 3 + 3 * 4
    node = graph.nodes[layer_node(1)]
    assert node["representation_change"] == 1.5 and math.isnan(node["attention_entropy"])
    assert node["jacobian_frobenius_logits"] == data["jacobian"]["layers"][1]["frobenius_logits"]
    assert node["mahalanobis_shift"] == data["mahalanobis"]["layers"][1]["shift"]
    head = graph.nodes[head_node(2, 3)]
    assert head["kl_zero"] == data["heads"]["heads"][-1]["kl_zero"]
    assert graph.edges[layer_node(0), layer_node(1)]["kind"] == "residual"
    assert graph.edges[head_node(2, 3), layer_node(2)]["kind"] == "head_of"
    compositions = [(u, v) for u, v, kind in graph.edges(data="kind") if kind == "composition"]
    expected = [(head_node(r["layer"], r["head"]), layer_node(i["layer"])) for r in data["heads"]["heads"] for i in r["influences"]]
    assert sorted(compositions) == sorted(expected) and expected
    assert all(graph.nodes[v]["layer"] > graph.nodes[u]["layer"] for u, v in compositions)
    assert graph.graph["circuit_stability"] == "0-2"
    assert "stability" in graph.nodes[layer_node(1)]["circuits"].split(",")
    assert "stability" in graph.nodes[head_node(0, 2)]["circuits"].split(",")
    assert "stability" not in graph.nodes[layer_node(2)]["circuits"].split(",")


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_files_load_back_with_every_node_edge_and_score(report, tmp_path):
    data, _, _ = report
    graph = build_circuit_graph(data)
    paths = write_circuit(graph, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["circuit.dot", "circuit.graphml", "circuit.json"]  # no temp files left
    loaded = nx.read_graphml(paths["graphml"])
    from_json = nx.node_link_graph(json.loads(paths["json"].read_text()), edges="edges")
    for other in (loaded, from_json):
        assert set(other.nodes) == set(graph.nodes) and set(other.edges) == set(graph.edges)
        for node, attrs in graph.nodes(data=True):
            for key, value in attrs.items():
                got = other.nodes[node].get(key)
                assert same(got, value) or (got is None and isinstance(value, float) and math.isnan(value)), (node, key)
        for u, v, attrs in graph.edges(data=True):
            assert all(same(other.edges[u, v][k], value) for k, value in attrs.items())
    assert loaded.graph["circuit_stability"] == "0-2"


def test_dot_lists_every_node_and_edge(report):
    data, _, _ = report
    graph = build_circuit_graph(data)
    text = to_dot(graph)
    assert text.startswith("digraph circuit {\n") and text.rstrip().endswith("}")
    edges = set(re.findall(r'^  "([^"]+)" -> "([^"]+)" \[', text, re.M))
    nodes = set(re.findall(r'^  "([^"]+)" \[', text, re.M))
    assert edges == set(graph.edges) and nodes == set(graph.nodes)
    assert '"circuit_stability"="0-2";' in text


def test_report_without_layers_is_an_error():
    with pytest.raises(CpOnnxError, match="no per-layer section"):
        build_circuit_graph({"methods": {}})


def test_exact_ablations_only_for_the_heads_the_estimates_rank_highest(report):
    """exact_heads=3 of 12: the estimates are those of the all-heads run; the 3 heads taken alternately from the
    kl_estimate and |loss_estimate| rankings get the all-heads run's exact effects and influences; the rest null."""
    data, folder, onnx_path = report
    partial = json_ready_round_trip(circuit_analysis(ModelFolder(folder, onnx_path), TEXTS, block_sizes=SIZES, exact_heads=3))
    everything = {(r["layer"], r["head"]): r for r in data["heads"]["heads"]}
    by_kl = sorted(everything, key=lambda lh: (-everything[lh]["kl_estimate"], lh))
    by_loss = sorted(everything, key=lambda lh: (-abs(everything[lh]["loss_estimate"]), lh))
    expected = {by_kl[0]}
    expected.add(next(lh for lh in by_loss if lh not in expected))
    expected.add(next(lh for lh in by_kl if lh not in expected))
    rows = {(r["layer"], r["head"]): r for r in partial["heads"]["heads"]}
    assert {lh for lh, r in rows.items() if r["exact"]} == expected
    assert partial["heads"]["exact_heads"] == 3 and "3 of 12" in partial["heads"]["exact_selection"]
    for lh, row in rows.items():
        assert row["loss_estimate"] == pytest.approx(everything[lh]["loss_estimate"], rel=1e-6)
        assert row["kl_estimate"] == pytest.approx(everything[lh]["kl_estimate"], rel=1e-6)
        for column in ("loss_zero", "kl_zero", "loss_mean", "kl_mean"):
            if lh in expected:  # the same rows in smaller batches: float32 rounding only
                assert row[column] == pytest.approx(everything[lh][column], rel=1e-5, abs=1e-9), (lh, column)
            else:
                assert row[column] is None, (lh, column)
        if lh in expected:
            assert [i["layer"] for i in row["influences"]] == [i["layer"] for i in everything[lh]["influences"]]
        else:
            assert row["influences"] == []
    chosen = sorted(expected)
    for estimate, exact in (("loss_estimate", "loss_zero"), ("kl_estimate", "kl_mean")):
        rho = spearmanr([rows[lh][estimate] for lh in chosen], [rows[lh][exact] for lh in chosen]).statistic
        assert partial["heads"]["spearman"][f"{estimate}~{exact}"] == pytest.approx(rho)
    graph = build_circuit_graph({**partial, "layers": data["layers"]})
    for lh in rows:
        node = head_node(*lh)
        assert graph.nodes[node]["exact"] == (lh in expected)
        assert math.isnan(graph.edges[node, layer_node(lh[0])]["weight"]) != (lh in expected)
    import jsonschema

    from cp_onnx.analysis.report import schema
    jsonschema.validate({"heads": partial["heads"]}, {**schema(), "required": []})


def test_no_exact_heads_leaves_estimates_only(report):
    data, folder, onnx_path = report
    none = json_ready_round_trip(circuit_analysis(ModelFolder(folder, onnx_path), TEXTS, block_sizes=SIZES, exact_heads=0))
    assert none["heads"]["exact_heads"] == 0 and not any(r["exact"] for r in none["heads"]["heads"])
    assert all(r["kl_zero"] is None and r["kl_estimate"] is not None for r in none["heads"]["heads"])
    assert all(rho is None for rho in none["heads"]["spearman"].values())


@pytest.mark.parametrize("bad", (-1, 2.5, "all", True))
def test_bad_exact_heads_is_a_one_line_error(report, bad):
    _, folder, onnx_path = report
    with pytest.raises(CpOnnxError, match="exact_heads must be"):
        circuit_analysis(ModelFolder(folder, onnx_path), TEXTS, block_sizes=SIZES, exact_heads=bad)


def json_ready_round_trip(sections: dict) -> dict:
    """As report.json holds it: NaN as null."""
    return json.loads(json.dumps(sections, allow_nan=False))
