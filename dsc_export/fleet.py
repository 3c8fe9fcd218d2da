"""A fleet of devices sharing one edge server and one link: a queueing model and the best static
assignment of devices to candidates. Pure functions, no I/O.

Each of N devices runs batches back to back (a closed loop). A device on candidate c spends, per
batch, ``delay_ms`` on its own (the head, plus the round-trip overhead of a request: no
queueing), ``link_ms`` on the link shared by every device (the batch's bytes / the rate), and
``server_ms`` on the server (the tail), where it waits behind other devices' batches. ``local``
has no link and no server time.

The network is solved by exact multi-class Mean Value Analysis (M. Reiser and S. S. Lavenberg,
"Mean-Value Analysis of Closed Multichain Queuing Networks", J. ACM 27(2), 1980): one class per
candidate (its devices), a delay station per device, and two queueing stations (the link, the
server). MVA is exact for product-form networks (BCMP): the delay station and a
processor-sharing link (TCP flows share a shaped link roughly fairly) are; an FCFS server is
only where every class has the same service time, so elsewhere the figure is MVA's usual
approximation. Not modelled: the server merging waiting requests of one split into one batch
(it serves them faster than one by one, so the model's wait errs high under load), and service
time variance beyond exponential. Times in ms, throughputs in batches/ms.

The batch-weighted mean latency (what the fleet benchmark measures, a mean over batches) is
sum_c X_c R_c / sum_c X_c; with no think time outside the latency it is N / sum_c X_c, so the
assignment that minimises it also maximises the fleet's throughput.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """One candidate's per-batch demands, ms: on the device alone (head + rtt), on the shared
    link (bytes / rate), on the server (tail)."""

    id: str
    delay_ms: float
    link_ms: float
    server_ms: float

    @property
    def alone_ms(self) -> float:
        """The latency of one batch with no other device (the paper's Eq. 4 with the rtt)."""
        return self.delay_ms + self.link_ms + self.server_ms


@dataclass(frozen=True)
class Solution:
    """The model's answer for one population (devices per candidate).

    Attributes:
        counts: devices per candidate id (those with none left out).
        latency_ms: mean latency per batch of each candidate's devices.
        throughput_per_s: batches per second of each candidate's devices together.
        mean_ms: the mean latency per batch over all batches (batch-weighted).
        server_utilization, link_utilization: busy fraction of each station (0..1).
        server_wait_ms: the mean wait at the server per batch that goes there.
    """

    counts: dict[str, int]
    latency_ms: dict[str, float]
    throughput_per_s: dict[str, float]
    mean_ms: float
    server_utilization: float
    link_utilization: float
    server_wait_ms: float


def demands(plan, batch: int, rate_MBps: float, ids: Sequence[str] | None = None) -> list[Demand]:
    """Each candidate's demands (:class:`Demand`) from a plan (its profiled head/tail times, bytes
    and rtt) at batch size ``batch`` and link rate ``rate_MBps`` (MB/s, 10^6 B): the parts of
    :func:`dsc_export.planning.eq4_ms` on an idle server (q = 0, s = 1)."""
    out = []
    for c in ids or plan.candidates:
        head, tail = plan.parts_ms(c, batch)
        nbytes = plan.times[c]["bytes"] * batch
        sends = nbytes > 0
        out.append(Demand(c, head + sends * plan.rtt_ms, nbytes / (rate_MBps * 1e3), tail if sends else 0.0))
    return out


def _sweep(ds: Sequence[Demand], nmax: int, shared_link: bool = True):
    """Exact MVA for every population vector with at most ``nmax`` devices in all: {vector:
    (R per class, X per class, Q link, Q server)}. One pass over the lattice, each vector from
    those with one device fewer (the arrival theorem)."""
    k = len(ds)
    zero = (0,) * k
    got = {zero: ((0.0,) * k, (0.0,) * k, 0.0, 0.0)}
    # vectors in order of their total, so every n - e_c is done before n
    for total in range(1, nmax + 1):
        for cut in itertools.combinations(range(total + k - 1), k - 1):
            n = tuple(b - a - 1 for a, b in zip((-1,) + cut, cut + (total + k - 1,)))
            r, x = [0.0] * k, [0.0] * k
            ql = qs = 0.0
            for c, d in enumerate(ds):
                if n[c] == 0:
                    continue
                prev = got[n[:c] + (n[c] - 1,) + n[c + 1:]]
                # a device's own link: no queueing there (a delay); the shared one queues
                rl = d.link_ms * (1.0 + prev[2]) if shared_link else d.link_ms
                rs = d.server_ms * (1.0 + prev[3])
                r[c] = d.delay_ms + rl + rs
                x[c] = n[c] / r[c] if r[c] > 0 else float("inf")
                ql += x[c] * rl
                qs += x[c] * rs
            got[n] = (tuple(r), tuple(x), ql, qs)
    return got


def _solution(ds: Sequence[Demand], n: tuple[int, ...], sol) -> Solution:
    r, x, _, qs = sol
    xt = sum(x)
    us = sum(xc * d.server_ms for xc, d in zip(x, ds))
    ul = sum(xc * d.link_ms for xc, d in zip(x, ds))
    to_server = sum(xc for xc, d in zip(x, ds) if d.server_ms > 0)
    return Solution(
        counts={d.id: m for d, m in zip(ds, n) if m},
        latency_ms={d.id: rc for d, rc, m in zip(ds, r, n) if m},
        throughput_per_s={d.id: xc * 1e3 for d, xc, m in zip(ds, x, n) if m},
        mean_ms=sum(xc * rc for xc, rc in zip(x, r)) / xt,
        server_utilization=us, link_utilization=ul,
        server_wait_ms=(qs - us) / to_server if to_server else 0.0)


def solve(ds: Sequence[Demand], counts: Sequence[int], shared_link: bool = True) -> Solution:
    """The model for ``counts[c]`` devices on candidate ``ds[c]`` (exact MVA, Reiser & Lavenberg
    1980). ``shared_link``: one link for all devices (it queues) or one each (a delay).

    Raises:
        ValueError: counts of another length than ``ds``, a negative count, or no device.
    """
    counts = tuple(int(m) for m in counts)
    if len(counts) != len(ds) or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"counts must be {len(ds)} non-negative integers, not all zero; got {counts}")
    keep = [c for c, m in enumerate(counts) if m]
    sub = [ds[c] for c in keep]
    n = tuple(counts[c] for c in keep)
    got = _sweep(sub, sum(n), shared_link)
    return _solution(sub, n, got[n])


def best_assignment(ds: Sequence[Demand], n: int, shared_link: bool = True,
                    allowed: Sequence[str] | None = None) -> Solution:
    """The static assignment of ``n`` identical devices to candidates that minimises the mean
    latency per batch (equivalently maximises the batches per second), over every multiset (all
    compositions of ``n`` over the candidates, solved in one MVA sweep), with its prediction.
    Ties go to the assignment found first (candidates in ``ds`` order). ``allowed``: the
    candidate ids to consider (default all).

    Raises:
        ValueError: ``n`` < 1 or no candidate allowed.
    """
    ds = [d for d in ds if allowed is None or d.id in allowed]
    if n < 1 or not ds:
        raise ValueError(f"need at least one device and one candidate (n={n}, {len(ds)} candidates)")
    got = _sweep(ds, n, shared_link)
    best = None
    for vec, sol in got.items():
        if sum(vec) != n:
            continue
        x = sum(sol[1])
        mean = sum(xc * rc for xc, rc in zip(sol[1], sol[0])) / x
        if best is None or mean < best[0] * (1 - 1e-12):
            best = (mean, vec)
    return _solution(ds, best[1], got[best[1]])


def pins(sol: Solution) -> list[str]:
    """Device i's candidate under an assignment: ids repeated by their counts, in the solution's
    order (device 0 first)."""
    return [c for c, m in sol.counts.items() for _ in range(m)]


def equilibria(ds: Sequence[Demand], n: int, wait_price: float = 0.0,
               shared_link: bool = True) -> list[Solution]:
    """The assignments of ``n`` devices where no device gains by moving alone to another
    candidate (Nash equilibria of the fleet's devices, each choosing for itself), as the model
    predicts them, best first: what devices that each choose by their own predicted time settle
    at, given time to. A device's cost is its latency plus ``wait_price`` times the queueing delay
    it meets at the link and the server (the charge of
    :func:`dsc_export.serving.policy.priced_state`); 0 is each device for itself.

    Raises:
        ValueError: ``n`` < 1 or no candidate.
    """
    if n < 1 or not ds:
        raise ValueError(f"need at least one device and one candidate (n={n}, {len(ds)} candidates)")
    got = _sweep(ds, n, shared_link)

    def cost(vec: tuple[int, ...], c: int) -> float:  # its latency, and the price of what of it is queueing
        r = got[vec][0][c]
        return r + wait_price * (r - ds[c].alone_ms)

    found = []
    for vec in got:
        if sum(vec) != n:
            continue
        stay = all(cost(vec, c) <= cost(moved, c2) * (1 + 1e-9)
                   for c in range(len(ds)) if vec[c]
                   for c2 in range(len(ds)) if c2 != c
                   for moved in [tuple(m - (j == c) + (j == c2) for j, m in enumerate(vec))])
        if stay:
            found.append(_solution(ds, vec, got[vec]))
    return sorted(found, key=lambda s: s.mean_ms)
