"""What a client knows of a server: the link's data rate and the server's expected wait q and
slowdown s, smoothed from the client's own answered requests and the server's load answers.

The rate is bytes sent over the time on the wire: the request's round trip minus the server's
reported wait ``queue_ms``, its compute ``server_ms``, its hand-over time outside its handler
(the load answer's ``handover_ms`` plus ``handover_ms_per_MB`` times the request's MB) and the plan's per-request
overhead ``rtt``, so a busy server never reads as a slow link. The choice takes the hand-over
back in as a per-byte cost (:meth:`ServerEstimate.planning_MBps`). Pure state, no I/O: the client
(:mod:`dsc_export.serving.client`) feeds it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

from dsc_export.serving import protocol as proto


class RateEstimator:
    """Data rate from (bytes, seconds on the wire) observations: exponentially smoothed, and
    optionally robust to one outlier (a cold start, one slow request).

    Args:
        initial_MBps: the rate assumed before the first transfer (the prior), MB/s.
        alpha: weight of a new observation (0-1).
        min_bytes: transfers smaller than this say nothing of the rate (latency-bound).
        window: with ``window`` >= 3 observations in a row, the estimate is their median
            (one slow request among them moves it not at all); 0: the smoothed value only.
        settle: a first observation more than ``settle`` times off the prior (either way) is
            provisional (:attr:`provisional`): the next observation replaces it instead of
            being averaged with it, and a client re-probes at once (0: off).
    """

    def __init__(self, initial_MBps: float, alpha: float = 0.5, min_bytes: int = 65536, *,
                 window: int = 0, settle: float = 0.0):
        self.value, self.alpha, self.min_bytes = float(initial_MBps), alpha, min_bytes
        self.prior, self.window, self.settle = float(initial_MBps), window, settle
        self.observations = 0
        self.provisional = False
        self._recent: deque[float] = deque(maxlen=max(window, 1))

    def observe(self, nbytes: int, seconds: float, stale: bool = False) -> float | None:
        """Add one transfer; tiny ones (latency-bound) are not counted. Returns its rate.

        ``stale``: the estimate is old (no measurement for a while): the new one replaces it.
        """
        if nbytes < self.min_bytes or seconds <= 0:
            return None
        rate = nbytes / seconds / 1e6
        fresh = self.observations == 0 or stale or self.provisional
        if fresh:
            self._recent.clear()
        self._recent.append(rate)
        self.value = rate if fresh else self.alpha * rate + (1 - self.alpha) * self.value
        if self.window and len(self._recent) >= self.window:
            self.value = statistics.median(self._recent)
        first = self.observations == 0 or stale
        self.provisional = bool(first and self.settle and
                                not self.prior / self.settle <= rate <= self.prior * self.settle)
        self.observations += 1
        return rate


class ServerEstimate:
    """What a client knows of one server: the link's data rate, the server's expected wait q and
    its slowdown s against its profile (the state :func:`~dsc_export.planning.eq4_ms` needs),
    each exponentially smoothed.

    One object per server, so a client of several servers keeps one per URL.

    Args:
        initial_MBps: the rate assumed before the first transfer, MB/s.
        alpha: weight of a new observation (0-1).
        min_bytes: transfers smaller than this say nothing of the rate (latency-bound).
    """

    def __init__(self, initial_MBps: float, *, alpha: float = 0.5, min_bytes: int = 65536):
        # robust: the median of the last 3 measurements; a first one far off the prior is
        # provisional (issue 25: a cold first answer read a 40 MB/s link as 6 MB/s)
        self.rate = RateEstimator(initial_MBps, alpha, min_bytes, window=3, settle=2.0)
        self.alpha = alpha
        self.q_ms, self.s = 0.0, 1.0
        # the server's time outside its handler: ms per request and ms per MB (load answers)
        self.handover_fixed_ms, self.handover_ms_per_MB = 0.0, 0.0
        self.heard = -math.inf  # time.monotonic() of the last news of the server

    def observe(self, nbytes: int, *, round_trip_ms: float, queue_ms: float, server_ms: float,
                rtt_ms: float, tail_ms: float, stale: bool = False) -> float | None:
        """Take one answered request in. Returns the rate it measured (MB/s), or None.

        Args:
            nbytes: bytes sent.
            round_trip_ms: from sending the request to having the answer (ms).
            queue_ms, server_ms: the server's wait and compute for it (ms, as it reported).
            rtt_ms: the plan's per-request overhead (ms), not time on the wire.
            tail_ms: the profiled T_tail for this request's own batch size (ms; 0 leaves s as is).
            stale: the estimate is old: the new rate replaces it.
        """
        wire_ms = round_trip_ms - queue_ms - server_ms - self.handover_ms(nbytes) - rtt_ms
        measured = self.rate.observe(nbytes, wire_ms / 1e3, stale=stale)
        slow = max(1.0, server_ms / tail_ms) if tail_ms > 0 else None
        self._server(queue_ms, slow)
        return measured

    def handover_ms(self, nbytes: int) -> float:
        """The server's expected hand-over time for a request of ``nbytes`` bytes, ms."""
        return self.handover_fixed_ms + self.handover_ms_per_MB * nbytes / 1e6

    def planning_MBps(self) -> float:
        """The rate the choice plans with, MB/s: the link's, with the server's hand-over time
        per MB as a further per-byte cost (1 / (1/rate + handover per MB)); the link's rate
        while none is known. (The fixed part per request is the plan's ``rtt``'s kind of cost.)"""
        return 1.0 / (1.0 / self.rate.value + self.handover_ms_per_MB / 1e3)

    def observe_load(self, load: proto.ServerLoad) -> None:
        """Take a load query's answer in: its recent wait, slowdown and hand-over time per MB
        (an idle server: 0 and 1; a hand-over not measured, NaN, leaves the estimate as is)."""
        if load.requests == 0:
            self._server(0.0, 1.0)
        else:
            self._server(load.q_ms, max(1.0, load.s) if load.s == load.s else None)
        a, b, k = load.handover_ms, load.handover_ms_per_MB, self.alpha
        if a == a and b == b and a >= 0 and b >= 0:
            self.handover_fixed_ms = k * a + (1 - k) * self.handover_fixed_ms
            self.handover_ms_per_MB = k * b + (1 - k) * self.handover_ms_per_MB

    def _server(self, q_ms: float, s: float | None) -> None:
        a = self.alpha
        self.q_ms = a * max(0.0, q_ms) + (1 - a) * self.q_ms
        if s is not None:
            self.s = a * s + (1 - a) * self.s
        self.heard = time.monotonic()
