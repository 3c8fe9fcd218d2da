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
    with ratio 1 (natural bottleneck line) and the compressive bottlenecks (``compressive_mask``) marked."""
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
    return _save(fig, plt, path)


def _axes_labels(ax, plan) -> None:
    ax.set_xlabel("data rate r (MB/s, log scale)")
    ax.set_ylabel("batch size B")
    ax.set_xscale("log")


HATCHES = ("////", "xxxx", "....", "\\\\\\\\", "++++", "oo")


def wire_form(split_id: str) -> str:
    """The wire form a split id names: ``cut029-int8`` -> ``int8``, ``offload-jpeg95`` ->
    ``jpeg95``,
    ``cut029`` -> ``float32``, ``offload`` -> ``raw``, ``local`` -> ``""``."""
    if split_id == "local":
        return ""
    base, _, form = split_id.partition("-")
    return form or ("raw" if base == "offload" else "float32")


def choice_heatmap(plan, path: str | os.PathLike, title: str = "") -> Path:
    """The paper's Fig. 2: the best split per (batch size, data rate) cell, with a legend."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    ids = plan.candidates
    k = np.array([[ids.index(c) for c in row] for row in plan.choice])
    palette = plt.get_cmap("tab10").colors
    # one colour per cut, one hatch per form
    bases = list(dict.fromkeys(c.partition("-")[0] for c in ids))
    cmap = ListedColormap([palette[bases.index(c.partition("-")[0]) % 10] for c in ids])
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    x, y = _edges(plan.rates_MBps, log=True), _edges(plan.batch_sizes)
    ax.pcolormesh(x, y, k, cmap=cmap, norm=BoundaryNorm(np.arange(len(ids) + 1) - 0.5, len(ids)))
    _axes_labels(ax, plan)
    # the wire forms (split ids cutNNN-float16, cutNNN-int8, offload-jpeg95 ...): one hatch each
    forms = [wire_form(c) for c in ids]
    hatches = {f: HATCHES[j % len(HATCHES)] for j, f in enumerate(dict.fromkeys(
        f for f in forms if f not in ("float32", "raw", "")))}
    for f, hatch in hatches.items():
        mask = np.array([[forms[i] == f for i in row] for row in k])
        ax.pcolor(x, y, np.ma.masked_where(~mask, np.ones(mask.shape)), hatch=hatch,
                  facecolor="none",
                  edgecolor=(0, 0, 0, 0.45), linewidth=0)
    used = sorted(set(k.ravel().tolist()))
    ax.legend(handles=[Patch(facecolor=cmap(i), hatch=hatches.get(forms[i], ""),
                             edgecolor=(0, 0, 0, 0.45),
                             label=ids[i]) for i in used],
              title="best split (hatch: wire form)", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8)
    extras = [f"rtt {plan.rtt_ms:g} ms"] + (["privacy"] if plan.privacy else [])
    ax.set_title(title or f"Best split per batch size and data rate ({', '.join(extras)})")
    return _save(fig, plt, path)


def gain_heatmap(plan, baseline: str, path: str | os.PathLike, *, title: str = "") -> Path:
    """The paper's Fig. 3: relative gain |T_dsc - T_base| / T_base of dynamic splitting per cell."""
    import numpy as np

    plt = _pyplot()
    g = np.array(plan.gain[baseline]["grid"]) * 100
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    mesh = ax.pcolormesh(_edges(plan.rates_MBps, log=True), _edges(plan.batch_sizes), g, cmap="viridis",
                         vmin=0, vmax=max(float(g.max()), 1e-9))
    fig.colorbar(mesh, ax=ax, label=f"gain over static '{baseline}' (%)")
    _axes_labels(ax, plan)
    ax.set_title(title or f"Relative gain of dynamic splitting over '{baseline}' "
                 f"(mean {plan.gain[baseline]['mean'] * 100:.1f} %)")
    return _save(fig, plt, path)


def _edges(values, log: bool = False):
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return np.array([v[0] / 1.1, v[0] * 1.1]) if log else np.array([v[0] - 0.5, v[0] + 0.5])
    if log:
        lv = np.log(v)
        mid = (lv[1:] + lv[:-1]) / 2
        return np.exp(np.concatenate([[lv[0] - (mid[0] - lv[0])], mid, [lv[-1] + (lv[-1] - mid[-1])]]))
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _save(fig, plt, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
