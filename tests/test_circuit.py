"""circuit_analysis on a tiny model, the circuit graph and its GraphML, node-link JSON and DOT files."""
from __future__ import annotations

import json
import math
import re

import networkx as nx
import pytest

from cp_onnx.analysis.circuit import build_circuit_graph, circuit_analysis, head_node, layer_node, to_dot, write_circuit
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.model import ModelFolder
from tiny import write_byte_tokenizer

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
