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


def best_server(plan: Plan, batch: int, states: list[tuple[float, float, float] | None], *,
                current: tuple[int | None, str] | None = None,
                exclude: set[str] | frozenset[str] = frozenset(), wait_price: float = 0.0) -> Choice:
    """Choose split and server together (pure): per server that is up, the plan's best split for
    its (rate, q priced by :func:`priced_wait_ms`, s) (:meth:`Plan.choose`, through
    :func:`~dsc_export.planning.eq4_ms`); then
    among those pairs and running here, :func:`~dsc_export.planning.margin_choice`: the fastest
    pair wins, running here wins when within the plan's margin of it (the tie-break toward the
    device), and the pair in use (``current``) is kept unless another is faster by more than
    the margin.

    Args:
        batch: samples in the batch.
        states: per server, (rate MB/s, q ms, s), or None for a server that is down.
        current: (server index or None for local, split) in use.
        exclude: candidates not to consider (privacy: ``offload``).
        wait_price: the weight of the wait a request adds to other devices' requests
            (:func:`priced_wait_ms`): a server's pairs are compared at their predicted time plus
            ``wait_price`` x q; 0 compares predicted times alone (each device for itself).

    Returns:
        (server index, or None to run here; split; predicted ms: Eq. 4 with the server's q, the
        price not included).

    Raises:
        UserError: as :meth:`Plan.choose`.
    """
    local_t = plan.choose(batch, 1.0, exclude=set(plan.candidates) - {"local"})[1]
    options: list[tuple[int | None, str, float, float]] = []  # (server, split, cost, predicted)
    for i, st in enumerate(states):
        if st is None:
            continue
        rate, q, sl = st
        cur = current[1] if current and current[0] == i else None
        # every candidate of a server sends, so each pays the same price: compared at q + price
        split, cost = plan.choose(batch, rate, cur, exclude=set(exclude) | {"local"},
                                  q_ms=priced_wait_ms(q, wait_price), s=sl)
        if not math.isinf(cost):
            t = cost if not wait_price else plan.choose(  # the split's own Eq. 4 time
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


def priced_wait_ms(q_ms: float, wait_price: float) -> float:
    """The wait a request to a server is charged, ms: the wait it meets (q) and ``wait_price``
    times the wait it adds to the requests of other devices, which is q again on average (pure).

    Why q: a FCFS server adds to the waits of the requests queued behind a request exactly that
    request's service time, once per request behind it; summed over requests, the waits
    requests add to others equal the waits they meet (every millisecond one request waits is
    one the request in service ahead of it adds). So q, the mean wait a request meets, is also
    the mean wait it adds. Charged it, devices that each choose for themselves stop offloading
    where their own gain is smaller than the others' loss: the marginal-cost toll that makes a
    selfish (Wardrop) equilibrium the fleet's best (A. C. Pigou 1920; M. Beckmann, C. B.
    McGuire, C. B. Winsten 1956; for queues, P. Naor, Econometrica 37(1), 1969). Without it
    (``wait_price`` 0), devices offload until a batch at the server takes as long as one here,
    so sharing the server gains the fleet nothing (bench_fleet: load-aware at the best static
    policy's mean, 1.24-1.34x the oracle). The mean is the closed loop's: in an open M/G/1
    queue the marginal toll is q / (1 - rho) (Pollaczek-Khinchine differentiated), which
    over-charges a fleet of a few devices (each waits for the others, not an endless stream).

    Args:
        q_ms: the server's expected wait, ms (>= 0).
        wait_price: 0 (each device for itself) to 1 (the mean wait a request adds, in full).
    """
    return q_ms * (1.0 + wait_price)


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
