"""Planning: the split lookup table, its gains, and scenarios. Pure functions.

Each of the paper's equations is written once, in a function that cites it:

- :func:`eq4_ms`: T_l, the predicted end-to-end time of one candidate, with bytes on the wire, a
  round-trip time and the server's state (q, its expected wait; s >= 1, its slowdown against its
  profile) as extras; the grid, :meth:`Plan.latencies` and :func:`simulate` all call it;
- :func:`full_offload_ms`: T_0, full offloading (:func:`eq4_ms` with no head, sending the input);
- :func:`eq6_index`: the argmin over the candidates, ties (and with a margin every candidate within
  the margin of the fastest) to the candidate that keeps more of the model on the device; the
  lookup table (:func:`choose_index`) and :meth:`Plan.choose` both call it;
- :func:`gain`: the relative gain over a baseline, used by :func:`make_plan` and :func:`simulate`.

``offload`` has no head (the input is sent), ``local`` no tail and nothing to send (so no rtt and
no q).

Head and tail times for batch sizes between profiled ones are interpolated linearly in the batch
size (time per batch grows close to linearly between neighbouring sizes); a batch size outside
the profiled range is an error, never a silent extrapolation. Rates are in MB/s, 1 MB = 10^6 B.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.artifacts import Manifest, Profile, check_pair, read_json
from dsc_export.errors import UserError
from dsc_export.fidelity import admitted, check_floor

PLAN_SCHEMA = "dsc-export.plan/1"


@dataclass
class Candidate:
    """One split as the planner sees it: profiled head and tail times and bytes per sample."""

    id: str
    batches: list[int]  # profiled batch sizes (sorted)
    head_ms: list[float]  # per profiled batch size (zeros for offload)
    tail_ms: list[float]  # (zeros for local)
    bytes: int  # per sample on the wire (0 for local)

    def parts_ms(self, batch: float) -> tuple[float, float]:
        """(T_head(B), T_tail(B)) in ms, each interpolated linearly between profiled batch sizes.

        Raises:
            UserError: ``batch`` outside the profiled range.
        """
        return (interpolate(self.batches, self.head_ms, batch, self.id),
                interpolate(self.batches, self.tail_ms, batch, self.id))

    @property
    def sends(self) -> bool:
        """True when the candidate sends something to the server (every candidate but ``local``)."""
        return self.bytes > 0


def interpolate(xs: list[int], ys: list[float], x: float, what: str = "") -> float:
    """Piecewise-linear y(x) on sorted ``xs``; outside [xs[0], xs[-1]] is an error.

    Raises:
        UserError: ``x`` outside the profiled range.
    """
    if not xs[0] <= x <= xs[-1]:
        raise UserError(f"batch size {x:g} is outside the profiled range {xs[0]}-{xs[-1]}"
                        + (f" for {what}" if what else "") + "; profile those batch sizes (bench --batch-sizes)")
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def candidates(manifest: Manifest, device: Profile, server: Profile, *, privacy: bool = False,
               min_agreement: float | None = None, excluded: dict[str, str] | None = None,
               admit_all: bool = False) -> list[Candidate]:
    """The planner's candidates in device order (offload forms, splits in graph order with their
    wire forms, local): every split the fidelity floor admits
    (:func:`dsc_export.fidelity.admitted`).

    Args:
        min_agreement: the top-1 agreement a lossy form (int8, JPEG) needs; None: lossless forms
            (and float16 within its tolerance) only.
        excluded: filled with {split id: why it is not a candidate}.
        admit_all: every split, whatever its fidelity (baselines to report gains against).

    Raises:
        UserError: the profiles cannot be combined, are not of this split dir's model, or miss
            a split or part the candidates need; ``min_agreement`` outside [0, 1].
    """
    check_pair(device, server)
    if device.model_sha256 != manifest.model.sha256:
        raise UserError("the profiles were taken on another model than this split dir's (model sha256 differs)")
    check_floor(min_agreement)
    out = []  # offload: no head, the input's bytes (T_0, full_offload_ms); local: no tail, nothing sent
    for s in manifest.splits:
        if privacy and s.kind == "offload":
            continue
        why = None if admit_all else admitted(s, min_agreement)
        if why:
            if excluded is not None:
                excluded[s.id] = why
            continue
        head = _series(device, s.id, "head") if s.head or s.encodes else None  # a codec: the encoder
        tail = _series(server, s.id, "tail") if s.tail else None
        batches = sorted(set(head or {}) & set(tail or {})) if head and tail else sorted(head or tail)
        if len(batches) == 0:
            raise UserError(f"the device and server profiles share no batch size for split {s.id}")
        out.append(Candidate(s.id, batches, [head[b] if head else 0.0 for b in batches],
                             [tail[b] if tail else 0.0 for b in batches], s.bytes if s.kind != "local" else 0))
    return out


def _series(p: Profile, split: str, part: str) -> dict[int, float]:
    got = {t.batch: t.median_ms for t in p.timings if t.split == split and t.part == part}
    if not got:
        raise UserError(f"the {p.role} profile has no time for {split}/{part}; profile the split dir that was planned")
    return got


def eq4_ms(head_ms, tail_ms, bytes_per_sample, batch, rate_MBps, *, rtt_ms=0.0, q_ms=0.0, s=1.0):
    """End-to-end time of one candidate l, in ms: the paper's Eq. 4, T_l = T_head + D c_l / r +
    T_tail, with D c_l as B * bytes_l on the wire, plus a round-trip time and the server's state::

        T_l(B, r) = T_head_l(B) + B * bytes_l / r + [rtt + q if it sends] + s * T_tail_l(B)

    An idle server (q = 0, s = 1) and no rtt give the paper's formula. Works on Python floats
    (:meth:`Plan.latencies`, per candidate) and on numpy arrays that broadcast
    (:func:`latency_grid`: candidates x batches x rates) alike; this is the only place the
    formula is written.

    Args:
        head_ms, tail_ms: T_head_l(B) on the device, T_tail_l(B) as profiled on the server (ms;
            0 for no head / no tail).
        bytes_per_sample: bytes_l on the wire per sample (0: nothing is sent, no rtt, no q).
        batch: B, samples.
        rate_MBps: r, the data rate (MB/s, 1 MB = 10^6 bytes), positive.
        rtt_ms: per-request overhead of a candidate that sends (ms).
        q_ms: q, the expected wait at the server before the tail runs (ms, >= 0).
        s: the server's slowdown against its profile (1: as profiled).
    """
    sends = bytes_per_sample > 0
    return head_ms + batch * bytes_per_sample / (rate_MBps * 1e3) + sends * (rtt_ms + q_ms) + s * tail_ms


def full_offload_ms(tail_ms, input_bytes, batch, rate_MBps, *, rtt_ms=0.0, q_ms=0.0, s=1.0):
    """T_0, the time of full offloading (the paper's Eq. 5, T_0 = D / r + T_tail_{1,L}), in ms.

    It is :func:`eq4_ms` at l = 0: no head, the raw input's bytes on the wire, the whole model
    on the server. The ``offload`` candidate of :func:`candidates` has exactly that form (zero
    head times, the input's bytes), so the grid and :meth:`Plan.choose` compute T_0 through
    :func:`eq4_ms` like any candidate; this function names it.

    Args:
        tail_ms: the whole model's time on the server at batch B (ms).
        input_bytes: bytes of one input sample (D / B).
        batch, rate_MBps, rtt_ms, q_ms, s: as :func:`eq4_ms`.
    """
    return eq4_ms(0.0, tail_ms, input_bytes, batch, rate_MBps, rtt_ms=rtt_ms, q_ms=q_ms, s=s)


def check_server_state(q_ms: float, s: float) -> None:
    """Raises UserError unless q >= 0 ms and s > 0 (a server's wait and slowdown)."""
    if not (q_ms >= 0 and s > 0):
        raise UserError(f"the server's wait q must be >= 0 ms and its slowdown s positive; got q={q_ms}, s={s}")


def latency_grid(cands: list[Candidate], batch_sizes: list[int], rates: list[float], *, rtt_ms: float = 0.0,
                 q_ms: float = 0.0, s: float = 1.0) -> np.ndarray:
    """T_l(B, r) in ms for every candidate and cell, shape [candidates, batches, rates]
    (:func:`eq4_ms` on the whole grid at once).

    Raises:
        UserError: a batch size or rate that is not positive, a batch size outside a candidate's
            profiled range, or a negative q / non-positive s.
    """
    if any(b <= 0 for b in batch_sizes):
        raise UserError("batch sizes must be positive")
    if any(not r > 0 for r in rates):
        raise UserError("data rates must be positive (MB/s)")
    check_server_state(q_ms, s)
    parts = np.array([[c.parts_ms(x) for x in batch_sizes] for c in cands]).reshape(len(cands), len(batch_sizes), 2)
    per_byte = np.array([c.bytes for c in cands], dtype=np.float64)[:, None, None]
    b = np.asarray(batch_sizes, dtype=np.float64)[None, :, None]
    r = np.asarray(rates, dtype=np.float64)[None, None, :]
    return eq4_ms(parts[..., 0:1], parts[..., 1:2], per_byte, b, r, rtt_ms=rtt_ms, q_ms=q_ms, s=s)


def eq6_index(times_ms: Sequence[float], margin: float = 0.0) -> int:
    """The paper's Eq. 6, s_opt = argmin_l T_l, over ``times_ms`` (one per candidate, in device
    order: offload, splits, local), with our tie-break: among the candidates within ``margin``
    (relative, 0.05 = 5 %) of the fastest, and exact ties, the one with the highest index — the
    one that keeps the most of the model on the device — wins. An excluded candidate is given
    ``inf``. Pure Python on purpose: :meth:`Plan.choose` calls it per batch at run time.
    """
    limit = min(times_ms) * (1.0 + margin) + 1e-12
    for i in range(len(times_ms) - 1, -1, -1):
        if times_ms[i] <= limit:
            return i
    return 0  # only when every time is nan


def margin_choice(times_ms: Sequence[float], margin: float = 0.0, current: int | None = None) -> int:
    """The run-time choice among ``times_ms``: :func:`eq6_index` (its tie-break toward the
    highest index within ``margin``), then the one in use (``current``, an index) is kept unless
    the winner is faster by more than ``margin`` (relative). The one home of this rule:
    :meth:`Plan.choose` (candidates) and :func:`dsc_export.serving.policy.best_server` (server
    and candidate pairs) both call it.
    """
    best = eq6_index(times_ms, margin)
    if current is not None and times_ms[current] <= times_ms[best] * (1.0 + margin):
        return current
    return best


def choose_index(times: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """:func:`eq6_index` in every cell of ``times`` (shape [candidates, ...]); the result has
    shape ``times.shape[1:]``."""
    cells = times.reshape(times.shape[0], -1).T.tolist()
    return np.array([eq6_index(c, margin) for c in cells], dtype=np.int64).reshape(times.shape[1:])


def gain(t_dsc: np.ndarray, t_base: np.ndarray) -> np.ndarray:
    """The paper's Eq. 7 term per state, |T_dsc - T_base| / T_base (arrays broadcast); the gain
    G over a scenario or grid is its mean."""
    return np.abs(t_dsc - t_base) / t_base


def rate_grid(text: str, steps: int = 64) -> list[float]:
    """``"1:128"`` -> ``steps`` rates on a log scale; ``"1,5,20"`` -> those rates.

    Raises:
        UserError: not positive rates in either form.
    """
    try:
        if ":" in text:
            lo, hi = (float(x) for x in text.split(":"))
            if not (lo > 0 and hi >= lo):
                raise ValueError
            return [float(v) for v in np.geomspace(lo, hi, steps)] if hi > lo else [lo]
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
        if not rates or rates[0] <= 0:
            raise ValueError
        return rates
    except ValueError:
        raise UserError(f"data rates must be positive MB/s, as LO:HI (log scale) or a list; got '{text}'") from None


@dataclass
class Plan:
    """``dsc-export.plan/1``: the lookup table (batch x data rate -> split), every candidate's
    predicted time per cell, and the gains over the baselines (fields and units: docs/contracts.md).

    ``times`` keeps each candidate's profiled head/tail times and bytes, so :meth:`choose`
    answers for any batch size in range and any rate, not only the grid's cells.
    """

    batch_sizes: list[int]
    rates_MBps: list[float]
    rtt_ms: float
    privacy: bool
    margin: float
    candidates: list[str]
    choice: list[list[str]]
    latency_ms: dict[str, list[list[float]]]
    gain: dict[str, dict[str, Any]]
    times: dict[str, dict[str, Any]]
    model_sha256: str
    device_profile: dict[str, Any]  # sha256 of the profile file, host, emulation
    server_profile: dict[str, Any]
    # the fidelity floor (plan --min-agreement; None: lossless forms only) and the splits it
    # left out, with why
    min_agreement: float | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    schema: str = PLAN_SCHEMA
    _fast: dict = field(default_factory=dict, repr=False, compare=False)

    # --- run time ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Per integer batch size in range: each candidate's (T_head, T_tail)."""
        cands = [Candidate(c, t["batches"], t["head_ms"], t["tail_ms"], t["bytes"]) for c, t in self.times.items()
                 if c in self.candidates]
        lo = max(c.batches[0] for c in cands)
        hi = min(c.batches[-1] for c in cands)
        parts = {b: tuple(c.parts_ms(b) for c in cands) for b in range(lo, hi + 1)}
        self._fast.update(parts=parts, ids=tuple(c.id for c in cands), bytes=tuple(c.bytes for c in cands),
                          cands=cands, range=(lo, hi))

    def parts_ms(self, candidate: str, batch: int | float) -> tuple[float, float]:
        """(T_head, T_tail) of one candidate at ``batch`` as profiled, in ms.

        Raises:
            UserError: an unknown candidate, or a batch size outside its profiled range.
        """
        if not self._fast:
            self._prepare()
        f = self._fast
        if candidate not in f["ids"]:
            raise UserError(f"unknown split '{candidate}'; the plan's candidates: {', '.join(f['ids'])}")
        i = f["ids"].index(candidate)
        got = f["parts"].get(batch)
        return got[i] if got is not None else f["cands"][i].parts_ms(batch)

    def latencies(self, batch: int | float, rate_MBps: float, *, q_ms: float = 0.0, s: float = 1.0) -> list[float]:
        """Every candidate's predicted time in ms (:func:`eq4_ms`), in ``candidates`` order.

        Args:
            batch: B, within the plan's profiled range (a fractional B is interpolated).
            rate_MBps: r, MB/s.
            q_ms, s: the server's expected wait (ms) and slowdown; 0 and 1 for an idle server.

        Raises:
            UserError: a batch size outside the profiled range, a rate that is not positive, a
                negative q or a non-positive s.
        """
        if not self._fast:
            self._prepare()
        f = self._fast
        parts = f["parts"].get(batch)
        if parts is None:
            lo, hi = f["range"]
            if isinstance(batch, int) or not lo <= batch <= hi:
                raise UserError(f"batch size {batch} is outside the plan's profiled range {lo}-{hi}: "
                                f"use a batch size in that range (run --batch-size), or build and bench "
                                f"batch {batch} too and make the plan again")
            parts = tuple(c.parts_ms(batch) for c in f["cands"])
        if not rate_MBps > 0:
            raise UserError(f"data rate must be positive, got {rate_MBps}")
        if q_ms or s != 1.0:
            check_server_state(q_ms, s)
        rtt = self.rtt_ms
        return [eq4_ms(h, t, nb, batch, rate_MBps, rtt_ms=rtt, q_ms=q_ms, s=s) for (h, t), nb in zip(parts, f["bytes"])]

    def choose(self, batch: int, rate_MBps: float, current: str | None = None,
               exclude: set[str] | frozenset[str] = frozenset(), *, q_ms: float = 0.0,
               s: float = 1.0) -> tuple[str, float]:
        """The split for this batch size, data rate and server state, and its predicted time in ms.

        Computed from the stored per-candidate times (:meth:`latencies`), not from the nearest
        grid cell; the choice is :func:`eq6_index`. With ``current`` (the split in use) and a margin, stay with
        it unless another candidate is faster by more than the margin. ``exclude``: candidates not
        to consider (privacy mode excludes ``offload``; a client whose server is down excludes all
        but ``local``). ``q_ms``, ``s``: the server's expected wait and slowdown (a busy server
        moves the choice toward the device).

        Raises:
            UserError: as :meth:`latencies`.
        """
        times = self.latencies(batch, rate_MBps, q_ms=q_ms, s=s)
        ids = self._fast["ids"]
        if exclude:
            times = [math.inf if c in exclude else t for c, t in zip(ids, times)]
        keep = ids.index(current) if current in ids and current not in exclude else None
        i = margin_choice(times, self.margin, keep)
        return ids[i], times[i]

    def shares(self) -> dict[str, float]:
        """The share of the grid's cells (0..1) each candidate wins, in ``candidates`` order."""
        cells = [c for row in self.choice for c in row]
        return {c: (cells.count(c) / len(cells) if cells else 0.0) for c in self.candidates}

    # --- JSON -------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The plan as ``dsc-export.plan/1`` JSON text, ``schema`` first."""
        d = asdict(self)
        d.pop("_fast")
        return json.dumps({"schema": d.pop("schema"), **d}, indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan from its parsed JSON.

        Raises:
            UserError: another schema.
            TypeError: a missing or unknown field (:func:`read_plan` turns it into one line).
        """
        if d.get("schema") != PLAN_SCHEMA:
            raise UserError(f"not a {PLAN_SCHEMA} file (schema: {d.get('schema')!r})")
        d = dict(d)
        d.pop("schema")
        return cls(**d)


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan at ``path`` (``dsc-export.plan/1``, written by ``dsc-export plan``).

    Raises:
        UserError: the file is missing, is not JSON, or is not a plan of this schema (one line).
    """
    path = Path(path)
    return read_json(path, Plan.from_dict, "plan",
                     missing=f"plan '{path}' does not exist; make one with dsc-export plan")


def make_plan(manifest: Manifest, device: Profile, server: Profile, *, batch_sizes: list[int] | None = None,
              rates: list[float] | None = None, rtt_ms: float = 0.0, privacy: bool = False,
              static: list[str] | None = None, margin: float = 0.0,
              profile_hashes: tuple[str, str] = ("", ""),
              min_agreement: float | None = None) -> Plan:
    """Compute the lookup table and the gains.

    Args:
        manifest: the split dir's manifest (split ids, bytes per sample, model hash).
        device, server: the two profiles (same model).
        batch_sizes: grid rows [default 1-64, or the profiled range if narrower].
        rates: grid columns in MB/s [default 64 rates from 1 to 128 on a log scale].
        rtt_ms: round-trip time added to every candidate that sends.
        privacy: leave ``offload`` out (raw input never leaves the device).
        static: static splits to report gains against [default: every compressive split].
        margin: relative margin (0.05 = 5 %) a split must win by over one that keeps more on
            the device.
        profile_hashes: sha256 of the device and server profile files, recorded in the plan.
        min_agreement: the fidelity floor for lossy forms (:func:`candidates`).

    Raises:
        UserError: a negative ``rtt_ms`` or ``margin``, an unknown static split, or as
            :func:`candidates` and :func:`latency_grid`.
    """
    if rtt_ms < 0 or margin < 0:
        raise UserError("--rtt-ms and --margin must not be negative")
    excluded: dict[str, str] = {}
    cands = candidates(manifest, device, server, privacy=privacy, min_agreement=min_agreement,
                       excluded=excluded)
    lo = max(c.batches[0] for c in cands)
    hi = min(c.batches[-1] for c in cands)
    batch_sizes = batch_sizes or list(range(max(1, lo), min(64, hi) + 1))
    rates = rates or rate_grid("1:128")
    for c in cands:
        for b in (min(batch_sizes), max(batch_sizes)):
            c.parts_ms(b)  # out of range: a one-line error naming the candidate
    grid = latency_grid(cands, batch_sizes, rates, rtt_ms=rtt_ms)
    idx = choose_index(grid, margin)
    ids = [c.id for c in cands]
    t_dsc = np.take_along_axis(grid, idx[None], axis=0)[0]
    all_ids = [s.id for s in manifest.splits]
    static = static if static is not None else [s.id for s in manifest.splits
                                                if s.kind == "split" and s.id in ids]
    for s in static:
        if s not in all_ids:
            raise UserError(f"unknown static split '{s}'; known: {', '.join(all_ids)}")
    baselines = ["local", "offload"] + [s for s in static if s not in ("local", "offload")]
    gains: dict[str, dict[str, Any]] = {}
    for base in baselines:
        if base in ids:
            t_base = grid[ids.index(base)]
        else:  # offload under privacy, a split the floor left out: still a baseline to compare with
            every = candidates(manifest, device, server, privacy=False, admit_all=True)
            bc = next(c for c in every if c.id == base)
            t_base = latency_grid([bc], batch_sizes, rates, rtt_ms=rtt_ms)[0]
        g = gain(t_dsc, t_base)
        gains[base] = {"grid": np.round(g, 5).tolist(), "mean": float(g.mean())}
    return Plan(
        batch_sizes=list(batch_sizes), rates_MBps=[round(r, 6) for r in rates], rtt_ms=rtt_ms, privacy=privacy,
        margin=margin, candidates=ids, choice=[[ids[k] for k in row] for row in idx.tolist()],
        latency_ms={c: np.round(grid[i], 4).tolist() for i, c in enumerate(ids)}, gain=gains,
        times={c.id: {"batches": c.batches, "head_ms": c.head_ms, "tail_ms": c.tail_ms, "bytes": c.bytes}
               for c in cands},
        model_sha256=manifest.model.sha256,
        device_profile={"sha256": profile_hashes[0], "host": device.host, "emulation": device.emulation,
                        "backend": device.backend},
        server_profile={"sha256": profile_hashes[1], "host": server.host, "emulation": server.emulation,
                        "backend": server.backend},
        min_agreement=min_agreement, excluded=excluded,
    )


def best_static(plan: Plan) -> str | None:
    """The static split whose gain is smallest (the best fixed choice), among the compressive splits."""
    statics = [b for b in plan.gain if b not in ("local", "offload")]
    return min(statics, key=lambda b: plan.gain[b]["mean"]) if statics else None


# --- scenarios -------------------------------------------------------------------------------

@dataclass
class Step:
    """One step of a scenario: batch size, data rate (MB/s), and the server's wait (ms) and slowdown."""

    batch: int
    rate_MBps: float
    q_ms: float = 0.0
    s: float = 1.0


def parse_scenario(text: str, source: str = "scenario") -> list[Step]:
    """A CSV with a header naming ``batch`` and ``rate_MBps`` columns, and optionally ``q_ms``
    (the server's expected wait, ms) and ``s`` (its slowdown, >= 1); others are ignored.

    Raises:
        UserError: a missing column or a malformed row (with its line number).
    """
    rows = list(csv.reader(io.StringIO(text)))
    lines = [(k + 1, r) for k, r in enumerate(rows) if r and not r[0].lstrip().startswith("#")]
    if not lines:
        raise UserError(f"{source}: empty scenario")
    _, header = lines[0]
    header = [h.strip() for h in header]
    if "batch" not in header or "rate_MBps" not in header:
        raise UserError(f"{source}: the header must name the columns 'batch' and 'rate_MBps' (got {','.join(header)})")
    ib, ir = header.index("batch"), header.index("rate_MBps")
    iq, is_ = (header.index(h) if h in header else None for h in ("q_ms", "s"))
    steps = []
    for line_no, row in lines[1:]:
        try:
            b, r = int(row[ib]), float(row[ir])
            q = float(row[iq]) if iq is not None else 0.0
            sl = float(row[is_]) if is_ is not None else 1.0
            if b <= 0 or not r > 0 or not q >= 0 or not sl >= 1:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(f"{source}, line {line_no}: expected a positive integer batch, a positive rate"
                            f"{', q_ms >= 0 and s >= 1' if iq is not None or is_ is not None else ''}, "
                            f"got {','.join(row)}") from None
        steps.append(Step(b, r, q, sl))
    if not steps:
        raise UserError(f"{source}: no steps after the header")
    return steps


def simulate(plan: Plan, steps: list[Step], baselines: list[str] | None = None) -> dict[str, Any]:
    """Run a scenario through the plan: the per-step choice and the :func:`gain` against each baseline.

    The dynamic choice keeps the split in use unless another wins by more than the plan's margin.
    Each step's server state (``q_ms``, ``s``) enters every candidate's time (:meth:`Plan.latencies`).

    Raises:
        UserError: an unknown baseline, or a step the plan cannot answer (as :meth:`Plan.latencies`).
    """
    baselines = baselines or (["local"] + ([] if plan.privacy else ["offload"])
                              + [c for c in plan.candidates if c not in ("local", "offload")])
    if not plan._fast:
        plan._prepare()
    ids = plan._fast["ids"]
    for b in baselines:
        if b not in ids:
            raise UserError(f"unknown baseline '{b}'; the plan's candidates: {', '.join(ids)}")
    per_step = []
    current = None
    for k, s in enumerate(steps):
        choice, t = plan.choose(s.batch, s.rate_MBps, current, q_ms=s.q_ms, s=s.s)
        current = choice
        times = dict(zip(ids, plan.latencies(s.batch, s.rate_MBps, q_ms=s.q_ms, s=s.s)))
        per_step.append({"step": k, "batch": s.batch, "rate_MBps": s.rate_MBps, "q_ms": s.q_ms, "s": s.s,
                         "choice": choice, "predicted_ms": t, "baseline_ms": {b: times[b] for b in baselines}})
    t_dsc = np.array([p["predicted_ms"] for p in per_step])
    gains = {b: float(gain(t_dsc, np.array([p["baseline_ms"][b] for p in per_step])).mean()) for b in baselines}
    return {"steps": per_step, "gain": gains,
            "total_ms": {"dynamic": sum(p["predicted_ms"] for p in per_step),
                         **{b: sum(p["baseline_ms"][b] for p in per_step) for b in baselines}}}

