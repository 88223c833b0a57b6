"""Plots: the leadership map (the paper's Figure 4) and learning curves, saved as PNG with matplotlib."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from ._writing import write_regular
from .errors import ConfigError


def pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as the regular file ``path`` (never through a link; a device or a folder there is refused), and
    close it. For a picture of your own: ``fig, ax = pyplot().subplots(); ...; save_figure(fig, "out.png")``."""
    import io

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return write_regular(path, buffer.getvalue())


def plot_leadership(leadership: Sequence[Sequence[Sequence[int]]], path: str | Path) -> Path:
    """Workers as dots, one row per block, one panel per epoch; colour and size show how often each led.

    ``leadership[e][k][w]`` is how many batches worker w of block k led in epoch e
    (``Trainer.leadership``).
    """
    if not leadership:
        raise ConfigError("no leadership statistics yet: train at least one full epoch first")
    plt = pyplot()
    epochs = len(leadership)
    blocks = len(leadership[0])
    workers = max((len(b) for b in leadership[0]), default=1)
    peak = max((c for epoch in leadership for block in epoch for c in block), default=1) or 1
    fig, axes = plt.subplots(1, epochs, figsize=(2.2 + 1.6 * epochs, 0.6 + 0.55 * blocks), squeeze=False)
    for e, ax in enumerate(axes[0]):
        for k, counts in enumerate(leadership[e]):
            share = [c / peak for c in counts]
            ax.scatter(range(len(counts)), [k] * len(counts), c=share, s=[20 + 180 * v for v in share],
                       cmap="viridis", vmin=0, vmax=1, edgecolors="k", linewidths=0.3)
        ax.set_title(f"epoch {e + 1}", fontsize=9)
        ax.set_xticks(range(workers))
        ax.set_yticks(range(blocks))
        ax.set_yticklabels([f"block {k}" for k in range(blocks)] if e == 0 else [])
        ax.set_xlabel("worker", fontsize=8)
        ax.set_ylim(blocks - 0.5, -0.5)
        ax.tick_params(labelsize=7)
    fig.suptitle("times selected as leader (colour and size)", fontsize=9)
    return save_figure(fig, path)


def plot_curves(series: dict[str, Sequence[float]], path: str | Path, *, xlabel="epoch", ylabel="test error (%)",
                title="", spread: dict[str, Sequence[float]] | None = None,
                x: dict[str, Sequence[float]] | None = None, log_x: bool = False) -> Path:
    """One line per named series (for example BP against LFNN-ℓ), saved as PNG; ``spread`` (the same names, one
    value per point, for example the standard deviation over seeds) draws error bars. ``x`` gives a series' x
    positions (default 1, 2, 3, ...), ``log_x`` a logarithmic x axis. The legend sits below the axes, so that it
    never hides a point."""
    spread, x = spread or {}, x or {}
    for what, given in (("spread", spread), ("x", x)):
        for name, values in given.items():
            if name not in series or len(values) != len(series[name]):
                raise ConfigError(f"plot_curves: {what}[{name!r}] has {len(values)} values, but the series of that "
                                  f"name has {len(series.get(name, []))}: give one value per point of a named series")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2 + 0.25 * len(series)))
    for name, values in series.items():
        xs = x.get(name, range(1, len(values) + 1))
        ax.errorbar(xs, values, yerr=spread.get(name), marker="o", capsize=3, label=name)
    ticks = sorted({v for name, values in series.items() for v in x.get(name, range(1, len(values) + 1))})
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return save_figure(fig, path)


def plot_demo(curves: dict[str, Sequence[dict]], memory: dict | None, path: str | Path, *, title: str = "",
              hosts: dict | None = None, hosts_title: str = "") -> Path:
    """Test accuracy against training seconds, one curve per method; beside it, peak memory as bars, and where two
    hosts were measured, their samples/s as bars labelled with the bytes each method sent per step."""
    plt = pyplot()
    panels = [("curves", 2.2)] + ([("memory", 1)] if memory else []) + ([("hosts", 1.2)] if hosts else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 + 4.5 * (len(panels) - 1), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [w for _, w in panels]})
    axes = dict(zip((n for n, _ in panels), axes[0]))
    ax = axes["curves"]
    for name, curve in curves.items():
        ax.plot([p["seconds"] for p in curve], [p["accuracy"] for p in curve], marker="o",
                markersize=4, label=name, linewidth=2.2 if name == "backprop" else 1.6)
    ax.set_xlabel("training time (s, evaluations excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    if memory:
        names = list(memory["peak_bytes"])
        bars = axes["memory"]
        bars.bar(range(len(names)), [memory["peak_bytes"][n] / 2**30 for n in names],
                 color=["tab:green" if n != "backprop" else "tab:blue" for n in names])
        bars.set_xticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=8)
        bars.set_ylabel("peak memory of a training step (GiB)")
        bars.set_title(memory["model"], fontsize=9)
    if hosts:
        names = list(hosts)
        bars = axes["hosts"]
        heights = [hosts[n]["samples_per_s"] for n in names]
        bars.bar(range(len(names)), heights, color=["tab:blue" if "DDP" in n else "tab:green" for n in names])
        for i, n in enumerate(names):
            bars.annotate(f"{hosts[n]['bytes_per_step'] / 1e6:.1f} MB/step", (i, heights[i]), ha="center",
                          va="bottom", fontsize=8)
        bars.set_xticks(range(len(names)), [n.replace(" (", "\n(").replace(", ", ",\n") for n in names], fontsize=8)
        bars.set_ylabel("samples/s across the link")
        bars.set_title(hosts_title, fontsize=9)
    return save_figure(fig, path)
