"""The pruning candidates of report.json (``pruning``, made by cp_onnx.analysis.prune.pruning_section) as the summary,
the plain text and the HTML show them beside the circuits: which layers each method would remove, and (with head
influence) the cheapest heads."""
from __future__ import annotations





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
