"""Circuit analysis: Jacobians, head influence and Mahalanobis anomaly in one batched pass, and the circuit graph.

``circuit_analysis`` returns report sections ("jacobian", "heads", "mahalanobis") and ranked blocks
(methods "jacobian", "mahalanobis"); ``build_circuit_graph`` turns a report holding them (and, if
present, the paper's per-layer statistics and methods) into a networkx graph; ``write_circuit``
exports it as GraphML, node-link JSON and DOT.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import networkx as nx
import numpy as np

from cp_onnx.analysis import heads as head_influence
from cp_onnx.analysis import jacobian, mahalanobis
from cp_onnx.analysis.perturbation import PerturbedRuns, base_activations
from cp_onnx.files import json_ready
from cp_onnx.models.evaluators import candidate_blocks
from cp_onnx.calibration import load_calibration
from cp_onnx.errors import CpOnnxError
from cp_onnx.files import write_json, write_text
from cp_onnx.models.model import ModelFolder, open_model
from cp_onnx.models.runner import open_graph
from graph_passes import discover
from graph_passes.passes import require_heads

TOP_INFLUENCES = 3  # composition edges kept per head: its strongest later layers
MIN_INFLUENCE = 1e-3  # relative update change below which a composition edge is left out


def circuit_analysis(
    model: ModelFolder | str | Path,
    texts: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    num_probes: int = jacobian.NUM_PROBES,
    neurons_per_layer: int = mahalanobis.NEURONS_PER_LAYER,
    with_heads: bool = True,
    exact_heads: int | None = head_influence.EXACT_HEADS,
    block_sizes: Sequence[int] = (3, 4, 5),
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Jacobian, head-influence and Mahalanobis sections for report.json, plus ranked blocks under "methods".

    ``texts`` default to the 10 shipped reasoning calibration texts; each is run alone (no padding),
    truncated to ``max_length`` tokens. Every head gets its first-order estimates; the ``exact_heads``
    the estimates rank highest (heads.choose_exact; None: every head, 0: none) then get exact zero and mean
    ablations in a second pass over the texts. Results depend only on the inputs and ``seed`` (the probes).
    """
    if num_probes < 1 or neurons_per_layer < 0:
        raise CpOnnxError(f"num_probes must be >= 1 and neurons_per_layer >= 0, got {num_probes} and {neurons_per_layer}")
    if exact_heads is not None and (isinstance(exact_heads, bool) or not isinstance(exact_heads, int) or exact_heads < 0):
        raise CpOnnxError(f"exact_heads must be a number of heads >= 0 or None (every head), got {exact_heads!r}")
    folder = model if isinstance(model, ModelFolder) else open_model(model)
    texts = load_calibration(None, n=10) if texts is None else list(texts)
    token_lists, _ = folder.encode(texts, max_length=max_length)
    timings, t0 = {}, time.perf_counter()
    proto, weights = open_graph(folder.onnx_path)
    layer_map = discover(proto)
    if with_heads and layer_map.attention_op:
        require_heads(layer_map)  # fused attention: say so rather than leave the heads out
    L = layer_map.num_layers
    candidate_blocks(L, block_sizes)  # fails early on too few layers
    bases = base_activations(proto, layer_map, token_lists, threads=threads, weights=weights)
    runs = PerturbedRuns(proto, layer_map, threads=threads, weights=weights)
    del proto
    timings["circuit_setup_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    with_heads = with_heads and runs.with_heads
    means = head_influence.head_means(bases) if with_heads else None
    neurons = mahalanobis.candidates(bases, neurons_per_layer)
    rng = np.random.default_rng(seed)
    jac = jacobian.JacobianStats(L + 1)
    head_stats = head_influence.HeadStats(L, layer_map.num_heads or 0)
    anomaly = mahalanobis.AnomalyStats(bases, neurons)
    total_heads = L * (layer_map.num_heads or 0) if with_heads else 0
    # Every head's exact ablations fit the first pass; fewer wait for the estimates to choose them (a second pass).
    every = exact_heads is None or exact_heads >= total_heads
    passes = 1 + bool(with_heads and not every and exact_heads)
    for k, (ids, base) in enumerate(zip(token_lists, bases)):
        probes = jacobian.probes(base, range(L + 1), num_probes, rng) + mahalanobis.probes(base, neurons)
        if with_heads:
            probes += head_influence.probes(base, means, range(L), exact=True) if every else head_influence.estimate_probes(means, range(L))
        base_row, results = runs.run(ids, probes)
        by_kind: dict[str, list] = {}
        for result in results:
            by_kind.setdefault(result.probe.key[0], []).append(result)
        jac.add(base, base_row.final, by_kind.get(jacobian.METHOD, []))
        anomaly.add(base, by_kind.get(mahalanobis.METHOD, []))
        if with_heads:
            head_stats.add(base, base_row, by_kind[head_influence.KIND])
        if progress:
            progress(k + 1, passes * len(token_lists))
    chosen = head_influence.choose_exact(head_stats.result(), exact_heads) if with_heads else []
    if passes == 2:
        for k, (ids, base) in enumerate(zip(token_lists, bases)):
            base_row, results = runs.run(ids, head_influence.ablation_probes(means, chosen))
            head_stats.add(base, base_row, results)
            if progress:
                progress(len(token_lists) + k + 1, passes * len(token_lists))
    timings["circuit_forwards_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    points = jac.per_point()
    layers = {name: values[:L] for name, values in points.items()}
    anomalies = anomaly.result(points["frobenius_logits"])
    sections = {
        "jacobian": {
            "relative_step": jacobian.RELATIVE_STEP,
            "num_probes": num_probes,
            "tokens": int(sum(len(t) for t in token_lists)),
            "output": "last layer output and logits",
            "layers": _rows(layers, L),
            "head_input": {name: values[L] for name, values in points.items()},
        },
        "mahalanobis": {"layers": _rows(anomalies["layers"], L), "neurons": anomalies["neurons"], "outlier_z": mahalanobis.OUTLIER_Z},
        "methods": {
            jacobian.METHOD: {"blocks": [b.as_dict() for b in jacobian.rank_blocks(layers, block_sizes)]},
            mahalanobis.METHOD: {"blocks": [b.as_dict() for b in mahalanobis.rank_blocks(anomalies["layers"], block_sizes)]},
        },
    }
    if with_heads:
        sections["heads"] = _heads_section(head_stats.result(), head_influence.selection(len(chosen), total_heads))
    now = time.perf_counter()
    sections["timings"] = {**timings, "circuit_statistics_s": now - t2, "circuit_total_s": now - t0}
    return json_ready(sections)


def check_heads(model: ModelFolder) -> None:
    """Fail at once (GraphPassError, one line) if the model's graph has no per-head tensors for head influence."""
    layer_map = discover(open_graph(model.onnx_path)[0])
    if layer_map.attention_op:
        require_heads(layer_map)


def _rows(columns: dict[str, np.ndarray], count: int) -> list[dict]:
    return [{"layer": l, **{name: values[l] for name, values in columns.items()}} for l in range(count)]


def _heads_section(result: dict, selection: str) -> dict:
    """One row per head: estimates, exact effects (null where not ablated exactly: ``exact`` false) and its strongest
    influences on later layers (measured for the zero-ablated heads only)."""
    composition, exact = result["composition"], result["exact"]
    rows = []
    for l, h in np.ndindex(composition.shape[:2]):
        weights = np.nan_to_num(composition[l, h], nan=0.0)
        strongest = [int(m) for m in np.argsort(-weights, kind="stable")[:TOP_INFLUENCES] if weights[m] >= MIN_INFLUENCE]
        rows.append({
            "layer": l, "head": h, **{c: result[c][l, h] for c in head_influence.COLUMNS}, "exact": bool(exact[l, h]),
            "influences": [{"layer": m, "weight": weights[m]} for m in strongest],
        })
    return {"alpha": head_influence.ALPHA, "heads": rows, "exact_heads": int(exact.sum()), "exact_selection": selection,
            "spearman": result["spearman"], "spearman_over": "the heads ablated exactly"}


def build_circuit_graph(report: dict) -> nx.DiGraph:
    """Layers ``blocks.{l}`` and heads ``blocks.{l}.attn.h{h}`` with every score as a scalar attribute.

    Edges: residual order (layer -> next layer), head -> its layer (weight: exact zero-ablation KL; NaN for
    a head not ablated exactly, whose node attribute ``exact`` is false), head -> later layer (kind
    "composition", weight: relative change of that layer's update when the head is zeroed). Each method's top block is a predicted circuit: graph attribute
    ``circuit_{method}`` = "start-end" (end exclusive), node attribute ``circuits`` = comma-joined methods.
    """
    num_layers = _num_layers(report)
    graph = nx.DiGraph()
    for l in range(num_layers):
        graph.add_node(layer_node(l), kind="layer", layer=l, circuits="")
        if l:
            graph.add_edge(layer_node(l - 1), layer_node(l), kind="residual", weight=1.0)
    for prefix, rows in (("", report.get("layers")), ("jacobian_", _get(report, "jacobian", "layers")), ("mahalanobis_", _get(report, "mahalanobis", "layers"))):
        for row in rows or []:
            graph.nodes[layer_node(row["layer"])].update({prefix + k: _scalar(v) for k, v in row.items() if k != "layer"})
    for row in _get(report, "heads", "heads") or []:
        node = head_node(row["layer"], row["head"])
        exact = row.get("exact", row.get("kl_zero") is not None)  # reports from before --exact-heads ablated every head
        graph.add_node(node, kind="head", layer=row["layer"], head=row["head"], circuits="", exact=bool(exact),
                       **{k: _scalar(row.get(k)) for k in head_influence.COLUMNS})
        graph.add_edge(node, layer_node(row["layer"]), kind="head_of", weight=_scalar(row.get("kl_zero")))
        for influence in row["influences"]:
            graph.add_edge(node, layer_node(influence["layer"]), kind="composition", weight=_scalar(influence["weight"]))
    for method, entry in sorted((report.get("methods") or {}).items()):
        if not entry.get("blocks"):
            continue
        top = entry["blocks"][0]
        graph.graph[f"circuit_{method}"] = f"{top['start']}-{top['end']}"
        for node, data in graph.nodes(data=True):
            if top["start"] <= data["layer"] < top["end"]:
                data["circuits"] = ",".join(filter(None, [data["circuits"], method]))
    return graph


def layer_node(layer: int) -> str:
    return f"blocks.{layer}"


def head_node(layer: int, head: int) -> str:
    return f"blocks.{layer}.attn.h{head}"


def write_circuit(graph: nx.DiGraph, folder: str | Path) -> dict[str, Path]:
    """Write circuit.graphml, circuit.json (node-link) and circuit.dot into ``folder``, each atomically."""
    folder = Path(folder)
    paths = {"graphml": folder / "circuit.graphml", "json": folder / "circuit.json", "dot": folder / "circuit.dot"}
    write_text(paths["graphml"], "\n".join(nx.generate_graphml(graph)) + "\n")
    write_json(json_ready(nx.node_link_data(graph, edges="edges")), paths["json"])
    write_text(paths["dot"], to_dot(graph))
    return paths


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of a directed graph with scalar attributes (every ID and value quoted)."""
    lines = ["digraph circuit {"]
    lines += [f"  {_quote(k)}={_quote(v)};" for k, v in sorted(graph.graph.items())]
    lines += [f"  {_quote(n)}{_attributes(data)};" for n, data in graph.nodes(data=True)]
    lines += [f"  {_quote(u)} -> {_quote(v)}{_attributes(data)};" for u, v, data in graph.edges(data=True)]
    return "\n".join(lines + ["}"]) + "\n"


def _attributes(data: dict) -> str:
    return " [" + ", ".join(f"{_quote(k)}={_quote(v)}" for k, v in data.items()) + "]" if data else ""


def _quote(value) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _scalar(value):
    """GraphML-safe value: numbers as float or int, missing (None, from JSON null) as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, str)):
        return value
    return float(value)


def _get(report: dict, section: str, key: str):
    return (report.get(section) or {}).get(key)


def _num_layers(report: dict) -> int:
    for rows in (report.get("layers"), _get(report, "jacobian", "layers"), _get(report, "mahalanobis", "layers")):
        if rows:
            return len(rows)
    raise CpOnnxError("the report has no per-layer section (layers, jacobian or mahalanobis); run the analysis first")
