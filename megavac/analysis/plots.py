"""Matplotlib helpers shared by the analysis commands (Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the analysis figures need matplotlib: pip install -r requirements.txt") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def family_colors(families: list[str]) -> dict[str, tuple]:
    """One colour per family (sorted by name, so a family keeps its colour across figures of a run)."""
    plt = pyplot()
    names = sorted(set(families))
    if len(names) <= 10:
        cmap = plt.get_cmap("tab10")
        return {f: cmap(i) for i, f in enumerate(names)}
    # tab20's strong colours first, then its pale ones (pale text is hard to read)
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]
    return {f: palette[i % 20] for i, f in enumerate(names)}


def heatmap(ax, mat: np.ndarray, labels: list[str], colors: list, *, vmin: float, vmax: float, cmap: str,
            title: str, show_labels: bool):
    """``mat`` (NaN shown grey) with a strip of ``colors`` (one per row/column: the family) along its top and
    left edges (axes appended to ``ax``); returns the image for a colour bar."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    plt = pyplot()
    cm = plt.get_cmap(cmap).with_extremes(bad="0.85")
    k = len(labels)
    im = ax.imshow(np.ma.masked_invalid(mat), vmin=vmin, vmax=vmax, cmap=cm, interpolation="nearest", aspect="auto")
    div = make_axes_locatable(ax)
    rgba = np.asarray([c[:4] if len(c) >= 4 else (*c[:3], 1.0) for c in colors], dtype=float)
    top = div.append_axes("top", size=0.15, pad=0.03)  # inches
    top.imshow(rgba[None], aspect="auto", interpolation="nearest", extent=(-0.5, k - 0.5, 0, 1))
    left = div.append_axes("left", size=0.15, pad=0.03)
    left.imshow(rgba[:, None], aspect="auto", interpolation="nearest", extent=(0, 1, k - 0.5, -0.5))
    top.set_xticks([])
    top.set_yticks([])
    left.set_xticks([])
    top.set_title(title, fontsize=9)
    ax.set_yticks([])
    if show_labels:
        ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
        left.set_yticks(range(k), labels, fontsize=6)
        for tick, c in zip(ax.get_xticklabels(), colors):
            tick.set_color(c)
        for tick, c in zip(left.get_yticklabels(), colors):
            tick.set_color(c)
    else:
        ax.set_xticks([])
        left.set_yticks([])
    return im


def family_legend(fig, colors: dict[str, tuple], **kw):
    import matplotlib.patches as mpatches

    handles = [mpatches.Patch(color=c, label=f) for f, c in colors.items()]
    return fig.legend(handles=handles, title="family", fontsize=7, title_fontsize=8, **kw)


def save(fig, path) -> str:
    plt = pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)
