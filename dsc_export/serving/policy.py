"""Which server and which split a batch takes (pure): the plan's choice per server, then across
servers, with the plan's one margin rule (:func:`~dsc_export.planning.margin_choice`).
"""

from __future__ import annotations

import math

from dsc_export.errors import UserError
from dsc_export.planning import Plan, margin_choice

Choice = tuple[int | None, str, float]  # (server index or None for here, split, predicted ms)


def server_urls(server_url: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The server URLs from one URL, a comma-separated list, or a sequence of either (pure).

    Raises:
        UserError: the same URL twice.
    """
    if not server_url:
        return []
    items = [server_url] if isinstance(server_url, str) else list(server_url)
    urls = [u.strip() for item in items for u in item.split(",") if u.strip()]
    seen = {u for u in urls if urls.count(u) > 1}
    if seen:
        raise UserError(f"server {sorted(seen)[0]} is given twice")
    return urls


# (rate MB/s, q ms, s), optionally + (the link's uncongested rate, the uncontended s, others' share of the requests)
State = tuple[float, ...]


def best_server(plan: Plan, batch: int, states: list[State | None], *,
                current: tuple[int | None, str] | None = None,
                exclude: set[str] | frozenset[str] = frozenset(), wait_price: float = 0.0) -> Choice:
    """Choose split and server together (pure): per server that is up, the plan's best split for
    its (rate, q, s), priced by :func:`priced_state` (:meth:`Plan.choose`, through
    :func:`~dsc_export.planning.eq4_ms`); then among those pairs and running here,
    :func:`~dsc_export.planning.margin_choice`: the cheapest pair wins, running here wins when
    within the plan's margin of it (the tie-break toward the device), and the pair in use
    (``current``) is kept unless another is cheaper by more than the margin. Unpriced
    (``wait_price`` 0) the cost is the predicted time.

    Args:
        batch: samples in the batch.
        states: per server, (rate MB/s, q ms, s), optionally followed by the link's uncongested
            rate (MB/s), the server's uncontended slowdown (:func:`priced_state`; None: not
            known) and the share of the server's requests that are other clients' (0-1; the
            price is weighted by it: the delays a request adds to its own client's next
            requests are in that client's own time already; 1 where not given), or None for a
            server that is down.
        current: (server index or None for local, split) in use.
        exclude: candidates not to consider (privacy: ``offload``).
        wait_price: the weight of the delay a request adds to other devices' requests
            (:func:`priced_state`); 0 compares predicted times alone (each device for itself).

    Returns:
        (server index, or None to run here; split; predicted ms: Eq. 4 at the server's state,
        the price not included).

    Raises:
        UserError: as :meth:`Plan.choose`.
    """
    local_t = plan.choose(batch, 1.0, exclude=set(plan.candidates) - {"local"})[1]
    options: list[tuple[int | None, str, float, float]] = []  # (server, split, cost, predicted)
    for i, st in enumerate(states):
        if st is None:
            continue
        rate, q, sl = st[:3]
        cur = current[1] if current and current[0] == i else None
        priced = _priced(st, wait_price)
        split, cost = plan.choose(batch, priced[0], cur, exclude=set(exclude) | {"local"}, q_ms=priced[1], s=priced[2])
        if not math.isinf(cost):
            t = cost if priced == (rate, q, sl) else plan.choose(  # the split's own Eq. 4 time
                batch, rate, exclude=set(plan.candidates) - {split}, q_ms=q, s=sl)[1]
            options.append((i, split, cost, t))
    # margin_choice's tie-break goes to the highest index: slowest pairs first, so that among
    # servers the fastest wins (the first listed at equal times), and running here last
    ranked = [o for _, o in sorted(enumerate(options), key=lambda p: (-p[1][2], -p[0]))]
    if not options or "local" not in exclude:  # nothing up (or every candidate excluded): here
        ranked.append((None, "local", local_t, local_t))
    keys = [(o[0], o[1]) for o in ranked]
    keep = keys.index(tuple(current)) if current is not None and tuple(current) in keys else None
    i, split, _, predicted = ranked[margin_choice([o[2] for o in ranked], plan.margin, keep)]
    return i, split, predicted


def priced_ms(plan: Plan, batch: int, state: State, split: str, wait_price: float) -> float:
    """What a batch on ``split`` at a server in ``state`` is charged (pure): Eq. 4 at
    :func:`priced_state` (its predicted time plus the price), ms; as :func:`best_server` compares."""
    rate, q, sl = _priced(state, wait_price)
    return plan.choose(batch, rate, exclude=set(plan.candidates) - {split}, q_ms=q, s=sl)[1]


def _priced(state: State, wait_price: float) -> tuple[float, float, float]:
    """:func:`priced_state` of a :data:`State` (its optional parts None, and others' share 1,
    where absent)."""
    r0, s0, others = (tuple(state[3:]) + (None, None, 1.0))[:3]
    return priced_state(*state[:3], r0, s0, wait_price * (1.0 if others is None else others))


def priced_state(rate_MBps: float, q_ms: float, s: float, uncongested_MBps: float | None,
                 uncontended_s: float | None, wait_price: float) -> tuple[float, float, float]:
    """The (rate, q, s) a request to a server is charged at (pure): besides the delays it meets
    itself, ``wait_price`` (w) times the delays it adds to other devices' requests, taken to be
    the ones it meets (Eq. 4 at the result is its time plus that price):

    * its wait at the server q: charged (1 + w) q;
    * on a shared link, its time on the wire beyond the link's uncongested time, B / r - B / r0
      per B bytes (r: the rate it gets; r0: ``uncongested_MBps``, the link with nobody else on
      it): charged as a rate r' with 1 / r' = (1 + w) / r - w / r0;
    * at the server, its tail's time beyond the tail's uncontended time, (s - s0) T_tail (s0:
      ``uncontended_s``; a server that merges waiting requests into one batch, or shares its
      cores between them, runs each request's tail slower the more requests it has):
      charged as s' = (1 + w) s - w s0.

    A part whose uncongested figure is None, or not better than the one met, is not charged.

    Why the delay it meets: a FCFS server adds to the wait of each request queued behind one
    request exactly that request's service time; summed over requests, the waits requests add
    to others equal the waits they meet (every millisecond one request waits is one the request
    in service ahead of it adds), so the mean wait a request adds is q. Transfers that overlap
    on a processor-sharing link, and requests merged into one batch, slow each other down
    alike. Charged that, devices that each choose for themselves stop offloading where their
    own gain is smaller than the others' loss: the marginal-cost toll that makes a selfish
    (Wardrop) equilibrium the fleet's best (A. C. Pigou 1920; M. Beckmann, C. B. McGuire,
    C. B. Winsten 1956; for queues, P. Naor, Econometrica 37(1), 1969). Without it (w = 0),
    devices offload until a batch at the server takes as long as one here, and sharing gains the
    fleet little (bench_fleet, 2026-12-04: load-aware 1.24-1.34x the oracle at N = 4 and 8).
    In an open M/G/1 queue the marginal toll is q / (1 - rho) (Pollaczek-Khinchine
    differentiated); that over-charges a closed fleet of a few devices
    (:func:`dsc_export.fleet.equilibria`).

    Args:
        rate_MBps: r, the rate the device gets on the link (MB/s).
        q_ms: the server's expected wait, ms (>= 0).
        s: the server's slowdown against its profile now.
        uncongested_MBps: r0, or None.
        uncontended_s: s0, or None.
        wait_price: w, 0 (each device for itself); 1: the delays a request adds taken to be
            those it meets (their mean, summed over requests); above 1: the marginal delay, which
            is larger where the server is busy (1 / (1 - rho) in an open queue).

    Returns:
        (r', q', s'): the rate, wait and slowdown to compare candidates at.
    """
    if not wait_price:
        return rate_MBps, q_ms, s
    r, sl = rate_MBps, s
    if uncongested_MBps is not None and uncongested_MBps > r:
        r = 1.0 / ((1.0 + wait_price) / rate_MBps - wait_price / uncongested_MBps)
    if uncontended_s is not None and uncontended_s < s:
        sl = (1.0 + wait_price) * s - wait_price * uncontended_s
    return r, q_ms * (1.0 + wait_price), sl


def damped(best: Choice, kept: Choice | None, switch_p: float, u: float) -> Choice:
    """Against herding (pure): move from the pair in use (``kept``, with its predicted time now)
    to a better one (``best``) only with probability ``switch_p``; ``u`` is a uniform draw in
    [0, 1). Devices that share a server all see the same, delayed load signal; if all moved at
    once they would crowd onto the server and all leave again. Moving with probability p, about
    p of them move per round, so the fleet walks toward the share where moving no longer pays
    instead of swinging past it (a damped best response). ``switch_p`` 1 moves at once.
    A pair that is gone (``kept`` None: the server is down) is left at once.
    """
    if kept is None or (best[0], best[1]) == (kept[0], kept[1]) or u < switch_p:
        return best
    return kept
