"""Plots for the run and sweep folders, drawn on an Agg canvas: no display, no pyplot state."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dpfl_app.run.outputs import write_atomic


def plot_partitions(counts: list[list[int]], path, title: str = "Labels per client") -> Path:
    """One stacked bar per client, one colour per label: the partitioning at a glance."""
    counts = np.asarray(counts)
    num_clients, num_labels = counts.shape
    fig = Figure(figsize=(min(4 + 0.35 * num_clients, 20), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = colormaps["tab10" if num_labels <= 10 else "tab20"]
    bottom = np.zeros(num_clients)
    edges = np.arange(num_clients + 1) - 0.5
    for label in range(num_labels):
        style = dict(color=cmap(label % cmap.N), label=str(label))
        if num_clients <= 50:
            ax.bar(np.arange(num_clients), counts[:, label], bottom=bottom, width=0.8, **style)
        else:  # one filled outline per label, not one bar per client: 1,000 clients took 40 s
            ax.stairs(bottom + counts[:, label], edges, baseline=bottom.copy(), fill=True,
                      **style)
        bottom += counts[:, label]
    ax.set(xlabel="client (partition id)", ylabel="examples", title=title)
    ax.set_xticks(np.arange(num_clients) if num_clients <= 50 else [])
    if num_labels <= 20:
        ax.legend(title="label", loc="upper left", bbox_to_anchor=(1, 1), fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


def _canvas(figsize=(6, 4)) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path) -> Path:
    # The run folder is rewritten every round: never leave a half-written PNG.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def run_series(rounds: list[dict], initial: dict | None = None) -> dict:
    """Round, test accuracy and epsilon of a run's records (results.json "rounds").

    Round 0 is the initial model (epsilon 0); rounds without a test accuracy
    (not evaluated yet) are left out.
    """
    done = [r for r in rounds if "test_accuracy" in r]
    start = [(0, initial["test_accuracy"], 0.0)] if initial and "test_accuracy" in initial else []
    points = start + [(r["round"], r["test_accuracy"], float(r["epsilon"])) for r in done]
    return {"round": [p[0] for p in points], "test_accuracy": [p[1] for p in points],
            "epsilon": [p[2] for p in points]}


def plot_run_accuracy(rounds: list[dict], path, initial: dict | None = None) -> dict:
    """Test accuracy (left axis) and epsilon (right axis) against the round.

    Returns the series drawn (`run_series`), so tests check data, not pixels.
    """
    series = run_series(rounds, initial)
    _save(run_accuracy_figure(series), path)
    return series


def run_accuracy_figure(series: dict) -> Figure:
    """accuracy.png: both curves, and one legend that names them (two axes, two colours)."""
    fig, ax = _canvas()
    curves = ax.plot(series["round"], series["test_accuracy"], "o-", color="tab:blue",
                     label="test accuracy (left axis)")
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Server-side test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="y", labelcolor="tab:blue")
    twin = ax.twinx()
    if all(np.isfinite(series["epsilon"])):
        curves += twin.plot(series["round"], series["epsilon"], "s--", color="tab:red",
                            label="epsilon so far (right axis)")
        twin.set_ylabel("epsilon", color="tab:red")
    else:  # noise 0 or deterministic-noise: no privacy guarantee, nothing finite to draw
        twin.set_ylabel("epsilon = inf (no guarantee)", color="tab:red")
    twin.tick_params(axis="y", labelcolor="tab:red")
    ax.legend(handles=curves, loc="center right", fontsize="small")
    return fig


def plot_sweep_rounds(curves: dict[str, dict], path) -> dict:
    """One curve per setting: mean test accuracy per round, shaded +- one std."""
    fig, ax = _canvas()
    for label, curve in curves.items():
        mean, std = np.asarray(curve["mean"]), np.asarray(curve["std"])
        ax.plot(curve["round"], mean, "o-", label=label)
        ax.fill_between(curve["round"], mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
           title="Test accuracy per round (mean over repeats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves:
        ax.legend(fontsize="small")
    _save(fig, path)
    return curves


def plot_frontier(points: list[dict], reference: float | None, path) -> dict:
    """Final accuracy against final epsilon, one point per noise level.

    `points` have noise, epsilon (finite), mean and std; `reference` is the
    non-private (noise 0) accuracy, drawn as a horizontal line since its
    epsilon is infinite.
    """
    _save(frontier_figure(points, reference), path)
    return {"points": points, "reference": reference}


def frontier_figure(points: list[dict], reference: float | None) -> Figure:
    """accuracy_vs_epsilon.png; each point's `z=` label stays inside the figure."""
    fig, ax = _canvas()
    if points:
        ax.errorbar([p["epsilon"] for p in points], [p["mean"] for p in points],
                    yerr=[p["std"] for p in points], fmt="o-", capsize=3, label="DP-FedAvg")
        rightmost = max(p["epsilon"] for p in points)
        for p in points:
            # The largest epsilon sits at the right edge: its label goes to the left.
            right = p["epsilon"] == rightmost and len(points) > 1
            ax.annotate(f"z={p['noise']:g}", (p["epsilon"], p["mean"]),
                        textcoords="offset points", xytext=(-4 if right else 4, -12),
                        ha="right" if right else "left", fontsize="small")
        ax.set_xscale("log")  # epsilon spans orders of magnitude across noise levels
        ax.minorticks_off()  # label each point's epsilon instead of powers of ten
        ax.set_xticks([p["epsilon"] for p in points], [f"{p['epsilon']:.3g}" for p in points])
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label="non-private (noise 0)")
    ax.set(xlabel="final epsilon (log scale)", ylabel="final test accuracy", ylim=(0, 1),
           title="Privacy-utility frontier")
    if points or reference is not None:
        ax.legend(fontsize="small", loc="lower right")
    return fig
