"""Pictures of runs: curves per epoch or step (probe, training), written as PNG files without a screen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Series = tuple[Sequence[float], Sequence[float]]  # (x values, y values)


def plot_curves(path: str, panels: Mapping[str, Mapping[str, Series]], xlabel: str, title: str | None = None) -> str:
    """Draw one panel per entry of `panels` (its title -> {series name -> (xs, ys)}) side by side; save as PNG.

    Empty series are skipped; a panel with none says so, so a picture is always written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never ask for a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        drawn = 0
        for name, (xs, ys) in series.items():
            if len(xs):
                ax.plot(list(xs), list(ys), marker="o" if len(xs) <= 30 else None, markersize=3, label=name)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
