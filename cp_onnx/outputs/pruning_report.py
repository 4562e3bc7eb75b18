"""The pruning candidates in report.json (``pruning``), and as the summary, the plain text and the HTML show them
beside the circuits: which layers each method would remove, and (with head influence) the cheapest heads."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cp_onnx.models.model import ModelFolder


def pruning_section(model: ModelFolder, reasoning: Sequence[str], general: Sequence[str], report: dict, *, max_length: int = 128,
                    threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """report.json's ``pruning``: every layer method's choices and block rankings and, when the report holds head
    influence (``analyze --heads``), the heads ranked by it."""
    from cp_onnx.analysis import head_pruning, prune  # the analysis; formatting a report needs neither

    layers = prune.predict_layers(model, reasoning, general, max_length=max_length, threads=threads, progress=progress)
    section = {"layers": layers.as_dict(top=None)}
    scores = head_scores(report)
    if scores:
        section["heads"] = head_pruning.heads_section(scores)
    return section


def head_scores(report: dict) -> dict[str, np.ndarray]:
    """Per head pruning method, [layers, heads] of the report's head influence column it ranks by; a method whose
    column some head lacks (ablated exactly only for the strongest heads: --exact-heads N) is left out, since its
    unmeasured heads would rank as the most expensive to remove, not where they belong."""
    from cp_onnx.analysis import head_pruning

    rows = (report.get("heads") or {}).get("heads")
    if not rows:
        return {}
    shape = (max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1)
    scores = {}
    for method, column in head_pruning.METHODS.items():
        if any(row.get(column) is None for row in rows):
            continue
        table = np.full(shape, np.nan)
        for row in rows:
            table[row["layer"], row["head"]] = row[column]
        scores[method] = table
    return scores


def summary_lines(report: dict, top: int = 3) -> list[str]:
    """The summary's pruning block: per method its choice of 1, 2, ... layers, and the cheapest heads."""
    pruning = report.get("pruning") or {}
    layers = pruning.get("layers")
    lines = []
    if layers:
        lines.append(f"\npruning candidates (layers each method would remove; default {layers['default']})")
        for method, data in layers["methods"].items():
            picks = "; ".join(f"{c['n']}: {_layers(c['layers'])}" + ("" if not c.get("nll") else f" ({_added(c, layers, 'reasoning')}/{_added(c, layers, 'general')})")
                              for c in data["choices"][:4])
            lines.append(f"  {method:>16}: {picks}")
        lines.append("  (in brackets: the loss added on the reasoning / general calibration texts, nats/token)")
    for method, data in ((pruning.get("heads") or {}).get("methods") or {}).items():
        cheapest = ", ".join(f"L{h['layer']}.H{h['head']} {h['score']:+.4f}" for h in data["cheapest"][:top])
        lines.append(f"  cheapest heads ({method}): {cheapest}")
    return lines


def text_lines(report: dict) -> list[str]:
    """Plain-text lines (examples/cpp prints the same): ``prune METHOD N LAYERS`` per choice, ``prune_head METHOD L H`` per cheap head."""
    pruning = report.get("pruning") or {}
    lines = [f"prune {method} {c['n']} {','.join(map(str, c['layers']))}"
             for method, data in ((pruning.get("layers") or {}).get("methods") or {}).items() for c in data["choices"]]
    lines += [f"prune_head {method} {h['layer']} {h['head']}"
              for method, data in ((pruning.get("heads") or {}).get("methods") or {}).items() for h in data["cheapest"][:5]]
    return lines


def html_rows(report: dict) -> list[list[str]]:
    """Table rows (method, layers removed for n = 1, 2, ...) for the HTML page."""
    layers = (report.get("pruning") or {}).get("layers") or {}
    return [[method, *(_layers(c["layers"]) for c in data["choices"])] for method, data in (layers.get("methods") or {}).items()]


def _added(choice: dict, layers: dict, group: str) -> str:
    return f"{choice['nll'][group] - layers['base_nll'][group]:+.3f}"


def _layers(layers: list[int]) -> str:
    return f"[{layers[0]}, {layers[-1] + 1})" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
