"""Charts (matplotlib, headless Agg backend, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib  # a core dependency, imported here so the CLI starts fast

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bottleneck_chart(analysis, path: str | os.PathLike, title: str | None = None) -> Path:
    """Compression ratio (bytes on the wire / input bytes) of every cut point along the network,
    with ratio 1 (natural bottleneck line) and the compressive bottlenecks (Eq. 3) marked."""
    plt = _pyplot()
    pts = analysis.cut_points
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    xs = [p.index for p in pts]
    ys = [max(p.ratio, 1e-6) for p in pts]
    ax.plot(xs, ys, "-", color="0.6", lw=1, zorder=1)
    nat = [p for p in pts if p.natural and not p.compressive]
    other = [p for p in pts if not p.natural]
    comp = [p for p in pts if p.compressive]
    ax.scatter([p.index for p in other], [p.ratio for p in other], s=14, color="0.55",
               label="cut point (not a bottleneck)", zorder=2)
    ax.scatter([p.index for p in nat], [p.ratio for p in nat], s=14, color="tab:blue",
               label="natural bottleneck (c < 1)", zorder=3)
    ax.scatter([p.index for p in comp], [p.ratio for p in comp], s=70, marker="*",
               color="tab:red", label="compressive bottleneck (Eq. 3)", zorder=4)
    for p in comp:
        ax.annotate(p.scope or f"#{p.index}", (p.index, p.ratio), textcoords="offset points",
                    xytext=(4, 6), fontsize=7, color="tab:red", rotation=20)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("cut point (graph order)")
    ax.set_ylabel(f"compression ratio c (bytes, wire {analysis.wire_dtype})")
    name = title or Path(analysis.source).name
    ax.set_title(f"{name}: {analysis.summary()}")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
