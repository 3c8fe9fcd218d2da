"""Formatting helpers of the command line: progress lines, tables, a progress bar.
"""

from __future__ import annotations

import contextlib
import sys

import click


def log_line(msg: str) -> None:
    click.secho(f"· {msg}", err=True, fg="bright_black")


def log_note(msg: str) -> None:
    """Progress messages of the library; its ``note: ...`` lines stand out in yellow."""
    if msg.startswith("note: "):
        click.secho(msg, err=True, fg="yellow")
    else:
        log_line(msg)


def print_table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        line = "  ".join(cells).rstrip()
        click.secho(line, bold=(k == 0))


def shorten(name: str, width: int = 60) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


@contextlib.contextmanager
def progress_bar(label: str):
    """A ``progress(done, total, item)`` callback whose bar appears on its first call, so that the
    library's checks (a bad dir, a missing backend or engine) fail as one line before any bar."""
    state = {}

    def progress(done: int, total: int, item: str) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True,
                                             item_show_func=lambda x: x)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.length = max(total, 1)
        bar.update(done - bar.pos, item)

    try:
        yield progress
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def print_profile(prof) -> None:
    rows = [("split", "part", "batch", "median ms", "p10", "p90", "p90/p10", "runs")]
    for t in prof.timings:
        rows.append((t.split, t.part, str(t.batch), f"{t.median_ms:.2f}", f"{t.p10_ms:.2f}", f"{t.p90_ms:.2f}",
                     f"{t.p90_ms / t.p10_ms:.2f}" if t.p10_ms else "-", str(t.runs)))
    print_table(rows, right={2, 3, 4, 5, 6, 7})


def print_candidates(plan, man) -> None:
    """Per candidate: its wire form, bytes per input, top-1 agreement and share of the grid it wins;
    then the splits the fidelity floor left out, and why."""
    share = plan.shares()
    rows = [("candidate", "wire", "bytes/input", "agreement", "grid won")]
    for s in man.splits:
        if s.id not in share and s.id not in plan.excluded:
            continue
        agree = (s.fidelity or {}).get("top1_agreement")
        rows.append((s.id, s.wire or "-", f"{s.bytes:,}", "-" if agree is None else f"{agree:.3f}",
                     f"{share[s.id] * 100:.1f} %" if s.id in share else "excluded"))
    print_table(rows, right={2, 3, 4})
    for sid, why in plan.excluded.items():
        click.echo(f"  {sid}: {why}")


def print_choice_map(plan) -> None:
    """A compact text map of the choice grid: rows batch sizes, columns rates, one letter per split."""
    ids = plan.candidates
    sym = {c: ("O" if c == "offload" else "L" if c == "local" else str(k)) for k, c in enumerate(ids)}
    rows = ([i for i, b in enumerate(plan.batch_sizes) if b in (1, 2, 4, 8, 16, 32, 64, 128)]
            or list(range(len(plan.batch_sizes))))
    marks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    cols = sorted({min(range(len(plan.rates_MBps)), key=lambda j: abs(plan.rates_MBps[j] - m)) for m in marks
                   if plan.rates_MBps[0] / 1.5 <= m <= plan.rates_MBps[-1] * 1.5}) or list(range(len(plan.rates_MBps)))
    click.echo("best split (rows: batch size, columns: MB/s)")
    click.echo("      " + "".join(f"{plan.rates_MBps[j]:>6.3g}" for j in cols))
    for i in rows:
        click.echo(f"{plan.batch_sizes[i]:>5} " + "".join(f"{sym[plan.choice[i][j]]:>6}" for j in cols))
    click.echo("  " + ", ".join(f"{sym[c]} = {c}" for c in ids))


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())
