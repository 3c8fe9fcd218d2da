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
                exclude: set[str] | frozenset[str] = frozenset()) -> Choice:
    """Choose split and server together (pure): per server that is up, the plan's best split for
    its (rate, q, s) (:meth:`Plan.choose`, through :func:`~dsc_export.planning.eq4_ms`); then
    among those pairs and running here, :func:`~dsc_export.planning.margin_choice`: the fastest
    pair wins, running here wins when within the plan's margin of it (the tie-break toward the
    device), and the pair in use (``current``) is kept unless another is faster by more than
    the margin.

    Args:
        batch: samples in the batch.
        states: per server, (rate MB/s, q ms, s), or None for a server that is down.
        current: (server index or None for local, split) in use.
        exclude: candidates not to consider (privacy: ``offload``).

    Returns:
        (server index, or None to run here; split; predicted ms).

    Raises:
        UserError: as :meth:`Plan.choose`.
    """
    local_t = plan.choose(batch, 1.0, exclude=set(plan.candidates) - {"local"})[1]
    options: list[Choice] = []
    for i, st in enumerate(states):
        if st is None:
            continue
        rate, q, sl = st
        cur = current[1] if current and current[0] == i else None
        split, t = plan.choose(batch, rate, cur, exclude=set(exclude) | {"local"}, q_ms=q, s=sl)
        if not math.isinf(t):
            options.append((i, split, t))
    # margin_choice's tie-break goes to the highest index: slowest pairs first, so that among
    # servers the fastest wins (the first listed at equal times), and running here last
    ranked = [o for _, o in sorted(enumerate(options), key=lambda p: (-p[1][2], -p[0]))]
    if not options or "local" not in exclude:  # nothing up (or every candidate excluded): here
        ranked.append((None, "local", local_t))
    keys = [(o[0], o[1]) for o in ranked]
    keep = keys.index(tuple(current)) if current is not None and tuple(current) in keys else None
    return ranked[margin_choice([o[2] for o in ranked], plan.margin, keep)]


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
