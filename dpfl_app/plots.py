"""Plots for the run folder, drawn on an Agg canvas: no display, no pyplot state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_partitions(counts: list[list[int]], path, title: str = "Labels per client") -> Path:
    """One stacked bar per client, one colour per label: the partitioning at a glance."""
    counts = np.asarray(counts)
    num_clients, num_labels = counts.shape
    fig = Figure(figsize=(min(4 + 0.35 * num_clients, 20), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = colormaps["tab10" if num_labels <= 10 else "tab20"]
    bottom = np.zeros(num_clients)
    for label in range(num_labels):
        ax.bar(np.arange(num_clients), counts[:, label], bottom=bottom, width=0.8,
               color=cmap(label % cmap.N), label=str(label))
        bottom += counts[:, label]
    ax.set(xlabel="client (partition id)", ylabel="examples", title=title)
    ax.set_xticks(np.arange(num_clients) if num_clients <= 50 else [])
    if num_labels <= 20:
        ax.legend(title="label", loc="upper left", bbox_to_anchor=(1, 1), fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)
