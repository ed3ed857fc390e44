"""The report's figures: win rates, reward against temperature, strength of the preference difference v
per layer, training curves, robustness to label noise.

Each function draws one PNG and returns its path. Figures are built on matplotlib's Agg canvas without
pyplot, so no display or global backend is involved, and inside matplotlib's default style, so a local
matplotlibrc cannot change them: the same input gives the same bytes. Empty input raises ValueError.
Series keep the order of the input mappings, so the caller controls legend order and colours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.style
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120
_EPS = 1e-9  # slack for intervals averaged over seeds
_COLORS = [f"C{i}" for i in range(10)]
_METADATA = {"Software": None}  # no matplotlib version in the file: same bytes across versions of the metadata


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed when complete: never a half-written plot
    try:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=_METADATA)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _require(mapping: Mapping | Sequence, what: str) -> None:
    if not mapping:
        raise ValueError(f"nothing to plot: {what} is empty")


def _series(data: Mapping, what: str) -> None:
    _require(data, what)
    for name, points in data.items():
        _require(points, f"{what}[{name!r}]")


def win_rate_bars(
    rows: Sequence[Mapping], path: str | Path, title: str = "Win rate against the chosen responses"
) -> Path:
    """Bars of win rate per method with their 95% interval; a dashed line marks 0.5 (as good as chosen).

    `rows`: [{"method", "win_rate", "ci95": [lo, hi]}], already averaged over seeds, drawn in order.
    """
    _require(rows, "rows")
    for row in rows:
        lo, hi = row["ci95"]
        if not (0.0 <= row["win_rate"] <= 1.0 and lo - _EPS <= row["win_rate"] <= hi + _EPS):
            raise ValueError(f"{row['method']}: need 0 <= win_rate <= 1 inside ci95; got {row}")
    names = [str(r["method"]) for r in rows]
    rates = [r["win_rate"] for r in rows]
    errors = [
        [max(0.0, r["win_rate"] - r["ci95"][0]) for r in rows],
        [max(0.0, r["ci95"][1] - r["win_rate"]) for r in rows],
    ]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(max(5.0, 0.9 * len(rows) + 2), 4.2), layout="constrained")
        ax = fig.add_subplot()
        x = range(len(rows))
        ax.bar(x, rates, yerr=errors, capsize=4, color=[_color(i) for i in x], edgecolor="black", linewidth=0.6)
        for i, rate in enumerate(rates):
            ax.text(i, rate / 2, f"{rate:.2f}", ha="center", va="center", fontsize=9, color="white", weight="bold")
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="tie with chosen (0.5)")
        ax.set_xticks(list(x), names, rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate (ties count half)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)


def reward_vs_temperature(
    curves: Mapping[str, Mapping[float, float]], path: str | Path, title: str = "Reward against sampling temperature"
) -> Path:
    """One line per method of mean reward-model score against sampling temperature (0 = greedy).

    `curves`: {method: {temperature: mean reward}}.
    """
    _series(curves, "curves")
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for i, (method, points) in enumerate(curves.items()):
            ts = sorted(points, key=float)
            ax.plot([float(t) for t in ts], [points[t] for t in ts], marker="o", color=_color(i), label=str(method))
        ax.set_xlabel("sampling temperature (0 = greedy)")
        ax.set_ylabel("mean reward-model score")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return _save(fig, path)


def layer_strength(
    stats: Mapping[str, Mapping[int, float]],
    path: str | Path,
    ylabel: str = "mean ‖v‖ (L2 norm per token)",
    title: str = "Strength of the preference difference v per layer",
) -> Path:
    """One line per method of a per-layer statistic (mean L2 norm of v per token, or ‖v‖ / ‖o‖) against layer index.

    `stats`: {method: {layer: value}}.
    """
    _series(stats, "stats")
    layers = sorted({int(layer) for points in stats.values() for layer in points})
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for i, (method, points) in enumerate(stats.items()):
            ls = sorted(points, key=int)
            ax.plot([int(x) for x in ls], [points[x] for x in ls], marker="o", color=_color(i), label=str(method))
        ax.set_xticks(layers)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("layer (hidden_states index)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return _save(fig, path)


def training_curves(
    histories: Mapping[str, Sequence[Mapping]], path: str | Path, key: str = "loss", title: str | None = None
) -> Path:
    """One panel per run of `key` against optimiser step, from trainer log dicts (`state.log_history`), with
    `eval_<key>` (the held-out pairs of `data.eval_size`) as a dashed line where a run logged it.

    `histories`: {name: [{"step": int, key: float, ...}, ...]}. Entries without `key` (summary logs) are
    skipped, and so are runs left with none (a stage that logs another key); when no run has any, ValueError.
    """
    _require(histories, "histories")
    series, held_out = {}, {}
    for name, logs in histories.items():
        points = sorted((log["step"], log[key]) for log in logs if key in log and "step" in log)
        if points:
            series[name] = points
            held_out[name] = sorted((log["step"], log[f"eval_{key}"]) for log in logs if f"eval_{key}" in log)
    if not series:
        raise ValueError(f"nothing to plot: no entry of histories has both 'step' and {key!r}")
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for i, (name, points) in enumerate(series.items()):
            ax = axes[i]
            ax.plot(
                [s for s, _ in points],
                [v for _, v in points],
                color=_color(i),
                marker="." if len(points) < 30 else None,
                label="training",
            )
            if held := held_out[name]:
                ax.plot([s for s, _ in held], [v for _, v in held], color=_color(i), linestyle="--", label="held out")
                ax.legend(fontsize=8)
            ax.set_title(str(name), fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        for ax in axes[len(series) :]:
            ax.set_visible(False)
        fig.suptitle(title or f"Training {key}")
        return _save(fig, path)


def noise_sweep(
    rows: Mapping[str, Mapping[float, tuple[float, float, float]]],
    path: str | Path,
    title: str = "Win rate against label noise",
) -> Path:
    """One line per method of win rate against the fraction of flipped training labels, with its band.

    `rows`: {method: {noise: (mean, lo, hi)}}; a dashed line marks 0.5.
    """
    _series(rows, "rows")
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for i, (method, points) in enumerate(rows.items()):
            xs = sorted(points, key=float)
            mean, lo, hi = ([points[x][k] for x in xs] for k in range(3))
            xs = [float(x) for x in xs]
            ax.plot(xs, mean, marker="o", color=_color(i), label=str(method))
            ax.fill_between(xs, lo, hi, color=_color(i), alpha=0.2, linewidth=0)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("label noise (fraction of training pairs flipped)")
        ax.set_ylabel("win rate against chosen")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return _save(fig, path)
