"""The run's and the sweep's plots say what they show: a legend, labels inside the figure."""

from __future__ import annotations

import pytest

from dpfl_app.run.plots import frontier_figure, run_accuracy_figure, run_series

# The README's sweep (20 seeds per noise level): z = 0.3 at the largest epsilon.
SWEEP_POINTS = [{"noise": 1.0, "epsilon": 8.38, "mean": 0.619, "std": 0.110},
                {"noise": 0.75, "epsilon": 12.68, "mean": 0.735, "std": 0.092},
                {"noise": 0.5, "epsilon": 23.27, "mean": 0.862, "std": 0.035},
                {"noise": 0.3, "epsilon": 51.68, "mean": 0.918, "std": 0.016}]


def _inside(fig, artist) -> bool:
    """Within the plot's frame: not across its edge, not cut by the figure's."""
    fig.canvas.draw()
    box, frame = artist.get_window_extent(fig.canvas.get_renderer()), fig.axes[0].bbox
    return (frame.x0 <= box.x0 and box.x1 <= frame.x1
            and frame.y0 <= box.y0 and box.y1 <= frame.y1)


def test_accuracy_png_has_a_legend_for_both_curves():
    records = [{"round": r, "test_accuracy": 0.5 + r / 10, "epsilon": 10.0 * r} for r in (1, 2)]
    fig = run_accuracy_figure(run_series(records, {"test_accuracy": 0.1}))
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "test accuracy (left axis)", "epsilon so far (right axis)"]


def test_without_a_finite_epsilon_the_legend_names_only_accuracy():
    records = [{"round": 1, "test_accuracy": 0.9, "epsilon": float("inf")}]
    fig = run_accuracy_figure(run_series(records))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "test accuracy (left axis)"]


@pytest.mark.parametrize("points", [SWEEP_POINTS, SWEEP_POINTS[:1]])
def test_every_noise_label_of_the_sweep_plot_is_inside_its_frame(points):
    fig = frontier_figure(points, reference=0.95)
    labels = [t for t in fig.axes[0].texts if t.get_text().startswith("z=")]
    assert [t.get_text() for t in labels] == [f"z={p['noise']:g}" for p in points]
    assert all(_inside(fig, t) for t in labels), [t.get_text() for t in labels]
