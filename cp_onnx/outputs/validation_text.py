"""What `cp-onnx validate` prints: per regime, each method's top-1 against the sweep's best block, and the decision's
realised gain; for removal sweeps, each pruning method's choice against the least harmful removal."""
from __future__ import annotations

from cp_onnx.outputs.decision import span


def format_validation(result: dict) -> str:
    """The regime's decision and what its block realises, then one line per method and metric: the top-1 block, its gain
    beside the best block's, hits, rank."""
    lines = []
    decision = result.get("decision")
    if decision:
        realised = ", ".join(f"{metric} {_signed(value)}" for metric, value in decision["realised"].items())
        block = span({"start": decision["block"][0], "end": decision["block"][1]}) if decision.get("block") else "none"
        role = "named block" if decision["decision"] == "help" else "least harmful block"
        lines.append(f"decision {decision['decision']}: {role} {block} realises {realised}" + ("" if decision.get("in_sweep") else " (not in the sweep)"))
    for metric, best in result["best"].items():
        where = f"[{best['start']}, {best['end']})" if best else "none"
        lines.append(f"{metric}: best block {where}, gain {_signed(best['gain'])}" if best else f"{metric}: no block")
        for method, judged in result["methods"].items():
            j, top = judged[metric], judged[metric]["top1"]
            ratio = "n/a" if j["gain_ratio"] is None else f"{j['gain_ratio']:+.2f}"
            lines.append(
                f"  {method:>12}: top-1 [{top['start']}, {top['end']}) gain {_signed(top['gain'])} (x{ratio} of best), "
                f"best in top-{result['top_k']}: {'yes' if j['best_in_top_k'] else 'no'}, within +-{result['tolerance']}: "
                f"{'yes' if j['near_best_in_top_k'] else 'no'}, rank of best {j['best_rank']}"
            )
    return "\n".join(lines)


def _signed(value) -> str:
    """A gain, or n/a where the sweep lacks the metric for that block."""
    return "n/a" if value is None else f"{value:+.4f}"


def format_removal_validation(result: dict) -> str:
    """Per removal size and metric: the least harmful block, then each method's choice and top-ranked block beside it."""
    lines = []
    for n, entry in result["sizes"].items():
        for metric, best in entry["best"].items():
            lines.append(f"{n} layer{'s' * (n != '1')}, {metric}: least harmful removal [{best['start']}, {best['end']}), change {best['gain']:+.4f}")
            for method, judged in entry["methods"].items():
                j, choice, top = judged[metric], judged[metric]["choice"], judged[metric]["top1"]
                cost = "not in the sweep" if choice["gain"] is None else f"change {choice['gain']:+.4f}"
                ratio = "" if j["cost_ratio"] is None else f", x{j['cost_ratio']:.2f} the best's cost"
                ranked = "" if top is None else f"; top block [{top['start']}, {top['end']}), rank of best {j['best_rank']}"
                lines.append(f"  {method:>16}: removes {choice['layers']} {cost}{ratio}{ranked}")
    return "\n".join(lines)
