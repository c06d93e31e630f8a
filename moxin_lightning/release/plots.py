"""The curves a release shows: which panels have data, the smoothing, `loss_curves.json` and one PNG per panel.

A per-step metric is noisy (one batch per point), so it is drawn faint with its debiased exponential moving
average over it; a validation metric (a whole held-out pass per point) is drawn as it is, from step 0. The JSON
holds the raw points, the smoothed ones and the panels, so every line of a picture can be checked from the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moxin_lightning.release.contents import LossCurves, Panel, Point

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EMA_FORMULA = "m_0 = 0; m_i = beta * m_(i-1) + (1 - beta) * x_i; s_i = m_i / (1 - beta^i); i counts recorded points"


def check_smoothing(beta: float) -> None:
    """Refuse a beta outside [0, 1): 1 would never move, above 1 or below 0 is not an average."""
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"smoothing={beta!r} must be in [0, 1) (the EMA's beta; 0 draws no smoothed line)")


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Debiased exponential moving average (`EMA_FORMULA`), TensorBoard's smoothing.

    Debiased, because the plain EMA started at 0 drags the first points toward 0, and one started at x_1 lets a
    run's first (untrained, highest) loss weigh on the curve for long; dividing by 1 - beta^i removes both.
    beta = 0 returns the values. Points are taken in order whatever their steps (a skipped step is no point)."""
    check_smoothing(beta)
    smoothed, moving = [], 0.0
    for index, value in enumerate(values, start=1):
        moving = beta * moving + (1 - beta) * value
        smoothed.append(moving / (1 - beta**index))
    return smoothed


def check_panels(panels: Sequence[Panel]) -> None:
    """Refuse two panels of one name before any work: they would write the same `<name>.png`."""
    names = [panel.name for panel in panels]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two release panels are named {twice[0]!r}; each panel needs its own name (its file)")


def default_panels(curves: LossCurves) -> list[Panel]:
    """What a release draws when nobody declared panels: the training loss and the monitor, in `loss.png`."""
    return [Panel("loss", "loss", (curves.train_metric, curves.monitor))]


def drawn_panels(curves: LossCurves, panels: Sequence[Panel]) -> list[Panel]:
    """The panels that get a picture: those with at least one recorded point (no data, no empty plot)."""
    return [panel for panel in panels or default_panels(curves) if any(curves.points(m) for m in panel.metrics)]


def smoothed_points(curves: LossCurves, metric: str, beta: float) -> list[Point]:
    points = curves.points(metric)
    return list(zip((step for step, _ in points), ema([value for _, value in points], beta), strict=True))


def curves_document(curves: LossCurves, panels: Sequence[Panel], beta: float) -> dict[str, Any]:
    """loss_curves.json: the recorded points (`LossCurves.to_dict`), plus what the pictures draw from them:
    `smoothing` (method, beta, formula), `smoothed` (per-step metric -> smoothed points) and `panels`."""
    shown = drawn_panels(curves, panels)
    per_step = [m for m in _metrics(shown) if curves.is_per_step(m) and curves.points(m)]
    document = curves.to_dict()
    document["smoothing"] = {"method": "debiased exponential moving average", "beta": beta, "formula": EMA_FORMULA}
    document["smoothed"] = {m: [[s, v] for s, v in smoothed_points(curves, m, beta)] for m in per_step} if beta else {}
    document["panels"] = [panel.to_dict() for panel in shown]
    return document


def final_values(curves: LossCurves, panel: Panel, beta: float) -> list[dict[str, Any]]:
    """Each drawn metric's last point: {metric, step, value, smoothed (per-step metrics, when beta > 0)}."""
    rows = []
    for metric in panel.metrics:
        points = curves.points(metric)
        if not points:
            continue
        step, value = points[-1]
        smoothed = smoothed_points(curves, metric, beta)[-1][1] if beta and curves.is_per_step(metric) else None
        rows.append({"metric": metric, "step": step, "value": value, "smoothed": smoothed})
    return rows


def panel_figure(curves: LossCurves, panel: Panel, beta: float, title: str = "") -> Figure:
    """One panel on a bare `Figure` (Agg canvas): no pyplot, so no global backend or figure state is touched.

    Per-step metrics: raw points faint, their EMA over them (the legend says which); validation metrics: markers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    for metric in panel.metrics:
        points = curves.points(metric)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        if not curves.is_per_step(metric):
            axes.plot(steps, values, marker="o", markersize=4, label=metric)
        elif beta:
            (raw,) = axes.plot(steps, values, linewidth=0.8, alpha=0.3, label=f"{metric} (raw)")
            label = f"{metric} (EMA, beta={beta:g}, debiased)"
            axes.plot(steps, ema(values, beta), linewidth=1.5, color=raw.get_color(), label=label)
        else:
            axes.plot(steps, values, linewidth=1, alpha=0.8, label=metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(panel.label)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def plot_curves(curves: LossCurves, panels: Sequence[Panel], beta: float, folder: Path, title: str = "") -> list[Path]:
    """`<panel name>.png` in `folder` for every panel with data; returns the files, in panel order."""
    files = []
    for panel in drawn_panels(curves, panels):
        file = Path(folder) / f"{panel.name}.png"
        panel_figure(curves, panel, beta, title).savefig(file, format="png")
        files.append(file)
    return files


def _metrics(panels: Sequence[Panel]) -> list[str]:
    """The panels' metrics, each once, in order of appearance."""
    return list(dict.fromkeys(m for panel in panels for m in panel.metrics))
