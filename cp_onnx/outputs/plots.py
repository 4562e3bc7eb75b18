"""PNG plots of a report: per-layer statistics with predicted blocks shaded, head influence, the sweep heatmap.

matplotlib is optional (``pip install 'cp-onnx[plots]'``) and imported only when a plot is drawn.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cp_onnx.errors import CpOnnxError
from cp_onnx.groundtruth.sweep import regime_rows, regimes_of
from cp_onnx.files import atomic_open
from cp_onnx.groundtruth.validate import best_block, gain, split_rows
from cp_onnx.models.scoring import METRICS

PLOTS_HINT = "plots need matplotlib: pip install 'cp-onnx[plots]'"
HEAD_COLUMN = "kl_zero"  # exact effect of zeroing the head: the influence measure the circuit graph weighs heads by
ESTIMATE_COLUMN = "kl_estimate"  # its first-order estimate, which every head has (only the strongest are ablated exactly by default)
METHOD_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CpOnnxError(PLOTS_HINT) from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global state, no display needed
    return figure


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def top_blocks(report: dict) -> dict[str, tuple[int, int]]:
    """Method -> its top-1 block (start, end)."""
    return {m: (e["blocks"][0]["start"], e["blocks"][0]["end"]) for m, e in (report.get("methods") or {}).items() if e.get("blocks")}


def layer_profile(report: dict, statistics: Sequence[str] | None = None):
    """One panel per statistic against layer, each method's top-1 block shaded in its colour."""
    rows = report["layers"]
    names = list(statistics or [k for k in rows[0] if k != "layer"])
    if not names:
        raise CpOnnxError("the report has no per-layer statistics to plot; run `cp-onnx analyze` again")
    layers = [row["layer"] for row in rows]
    figure = _figure(8, 1.6 * len(names) + 0.8)
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    blocks = top_blocks(report)
    for ax, name in zip(axes, names):
        values = np.array([np.nan if row.get(name) is None else row[name] for row in rows], dtype=float)
        ax.plot(layers, values, marker="o", markersize=3, color="black", linewidth=1)
        for k, ((method, (start, end)), color) in enumerate(zip(blocks.items(), METHOD_COLORS)):
            # Block [start, end) covers layers start..end-1, each +-0.5; each method its own horizontal band, so overlaps stay readable.
            ax.axvspan(start - 0.5, end - 0.5, ymin=k / len(blocks), ymax=(k + 1) / len(blocks), color=color, alpha=0.25,
                       linewidth=0, label=f"{method} [{start}, {end})")
        ax.set_ylabel(name.replace("_", "\n"), fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="top-1 block", title_fontsize=8)
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(f"{report['model']['name']}: per-layer statistics", fontsize=10)
    return figure


def head_column(report: dict) -> str:
    """The column the head heatmap shows: the exact zero-ablation KL where every head has it, else the estimate
    (a map of the 16 heads ablated exactly out of 270 would be mostly blank)."""
    section = report.get("heads")
    rows = section.get("heads") if isinstance(section, dict) else None
    if rows and isinstance(rows[0], dict) and any(r.get(HEAD_COLUMN) is None for r in rows) and all(r.get(ESTIMATE_COLUMN) is not None for r in rows):
        return ESTIMATE_COLUMN
    return HEAD_COLUMN


def head_matrix(report: dict, column: str | None = None) -> np.ndarray | None:
    """[layers, heads] influence (``column``, default ``head_column``) from the report's "heads" section (rows of
    layer, head, ...) or a 2-D array; None without one."""
    section = report.get("heads")
    if section is None:
        return None
    column = column or head_column(report)
    rows = section.get("heads") if isinstance(section, dict) else section
    if rows and isinstance(rows[0], dict):
        shape = (max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1)
        matrix = np.full(shape, np.nan)
        for r in rows:
            matrix[r["layer"], r["head"]] = np.nan if r.get(column) is None else r[column]
        return matrix
    matrix = np.array(rows, dtype=float)
    if matrix.ndim != 2 or matrix.size == 0:
        raise CpOnnxError(f"the report's heads section is neither rows of layer/head/{column} nor a layers x heads array; re-run the analysis")
    return matrix


def head_heatmap(matrix: np.ndarray, title: str = f"head influence ({HEAD_COLUMN})"):
    """A layers x heads heatmap, layer 0 at the bottom."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2:
        raise CpOnnxError(f"head influence must be a layers x heads array, not shape {matrix.shape}")
    layers, heads = matrix.shape
    figure = _figure(min(2 + 0.45 * heads, 12), min(1.5 + 0.25 * layers, 12))
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=ax)
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.set_xticks(range(heads))
    return figure


def sweep_heatmap(sweep_rows: list[dict], report: dict, path: str | Path, regime: str, metric: str = "answer_logprob") -> Path:
    """``heatmap`` of block gains of one regime (rows from ``regime_rows``), each method's top-1 and the best block marked."""
    removals = is_removal_sweep(sweep_rows)
    return heatmap(sweep_rows, ranked_by_regime(report, regime, removals), path, metric=metric, what="Removed" if removals else "Duplicated")


def ranked_by_regime(report: dict, regime: str, removals: bool = False, top: int | None = None) -> dict[str, list[dict]]:
    """Each method's ranked blocks as a sweep of ``regime`` judges them: the pruning methods' for removals, else each
    method's ranking for that regime (the default method ranks per regime)."""
    methods = ((report.get("pruning") or {}).get("layers") or {}).get("methods") if removals else report.get("methods")
    return {m: ((e.get("by_regime") or {}).get(regime) or e.get("blocks", []))[:top] for m, e in (methods or {}).items()}


def is_removal_sweep(sweep_rows: list[dict]) -> bool:
    """Whether the rows come from ``cp-onnx sweep --skip`` (blocks removed, not duplicated)."""
    return any(row.get("operation") == "skip" for row in sweep_rows)


def sweep_heatmap_png(sweep_rows: list[dict], report: dict, regime: str, metric: str = "answer_logprob") -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return sweep_heatmap(sweep_rows, report, Path(folder) / "sweep.png", regime, metric).read_bytes()


def write_plots(report: dict, folder: str | Path, sweep_rows: list[dict] | None = None) -> list[Path]:
    """layers.png, heads.png (when the report has heads) and sweep_REGIME.png per regime (with sweep rows) in ``folder``."""
    folder = Path(folder)
    written = [save_png(layer_profile(report), folder / "layers.png")]
    matrix = head_matrix(report)
    if matrix is not None:
        written.append(save_png(head_heatmap(matrix, f"head influence ({head_column(report)})"), folder / "heads.png"))
    for regime in regimes_of(sweep_rows or []):
        written.append(sweep_heatmap(regime_rows(sweep_rows, regime), report, folder / f"sweep_{regime}.png", regime))
    return written


MAX_GAIN = 1e12  # a larger gain on any metric (nats, accuracy) can only come from a damaged sweep file


def heatmap(sweep_rows: list[dict], predictions: Mapping[str, Sequence[dict]], out_png: str | Path, metric: str = "answer_logprob",
            what: str = "Duplicated") -> Path:
    """A start x end map of each block's gain on ``metric``, each method's top-1 and the best block marked; PNG written atomically."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise CpOnnxError("heatmaps need matplotlib: pip install 'cp-onnx[plots]'") from None
    import numpy as np

    baseline, blocks = split_rows(sweep_rows)
    if baseline.get(metric) is None:
        raise CpOnnxError(f"the sweep has no {metric!r} values; choose one of {', '.join(METRICS)}")
    size = max([end for _, end in blocks] + [1])
    grid = np.full((size, size), np.nan)  # [start, end - 1]
    for (start, end), row in blocks.items():
        value = gain(row, baseline, metric)
        grid[start, end - 1] = np.nan if value is None else value
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    if not limit < MAX_GAIN:  # matplotlib's colour bar overflows on such a range: and no probe suite gives it
        raise CpOnnxError(f"the sweep's {metric} gains reach {limit:.3g}, far beyond any log-probability or accuracy; "
                          "the sweep file is damaged: run cp-onnx sweep again")
    figure = Figure(figsize=(7, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), origin="lower", cmap="RdBu", norm=TwoSlopeNorm(0.0, -limit or -1, limit or 1),
                        extent=(0.5, size + 0.5, -0.5, size - 0.5), aspect="auto")
    figure.colorbar(image, ax=axes, label=f"{metric} gain over baseline")
    best = best_block(baseline, blocks, metric)
    if best:
        axes.scatter([best[1]], [best[0]], marker="*", s=220, facecolors="gold", edgecolors="black", label=f"best {best[0]}:{best[1]}", zorder=3)
    for (method, predicted), marker in zip(predictions.items(), "osD^v<>ph"):
        if predicted:
            top1 = predicted[0]
            axes.scatter([top1["end"]], [top1["start"]], marker=marker, s=110, facecolors="none", edgecolors="black", linewidths=1.5,
                         label=f"{method} top-1 {top1['start']}:{top1['end']}", zorder=3)
    axes.set(xlabel="end (exclusive)", ylabel="start", title=f"{what} block [start, end): {metric} gain")
    axes.legend(loc="upper left", fontsize=8)
    return save_png(figure, Path(out_png))


def save_png(figure, path: Path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    with atomic_open(path, binary=True) as out:
        figure.savefig(out, format="png", dpi=120, bbox_inches="tight")
    return path
