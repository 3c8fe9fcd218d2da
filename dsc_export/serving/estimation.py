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
    optionally robust to one outlier (a cold start, one slow request) and quick to follow a step.

    A step of the link's rate (``jump``) is told from an outlier by which side it lies on. Time on
    the wire is bytes / rate plus delays, and delays are never negative: one slow request can make
    a reading as low as it likes, while a reading far above the link needs an error in what is
    subtracted (the server's times, the plan's rtt), which is rare. And the two errors cost
    differently: planned at a rate too low, a batch takes a split that sends less and runs no
    slower than predicted (at worst about the local time); planned at a rate too high, it sends
    bytes the link cannot carry, and takes many times its predicted time (``make demo``: the
    batch after 100 -> 5 MB/s took 328 ms against 109 predicted). So:

    * a reading more than ``jump`` times *below* the estimate is believed at once, provisionally
      (:attr:`provisional`): the next reading confirms it (also that far below the old estimate:
      the estimate restarts from these two, at the latest) or refutes it (the old estimate and
      window come back, the outlier leaves no trace). A step down is followed by the first batch
      after the one that met it; one slow request sets one batch's plan too low, never more;
    * a reading more than ``jump`` times *above* it moves nothing until a second one in a row
      says so too (then the estimate restarts from these two, at the latest): a step up is
      followed by the second batch after the one that met it (as the median of three did);
    * readings within ``jump`` of it are smoothed (``alpha``) and, with ``window``, their median
      taken: noise does not restart anything.

    Either kind of suspect reading sets :attr:`provisional`, so a client that runs locally
    re-probes at its first chance (after ``probe_every`` local batches), whatever its probe budget.

    Args:
        initial_MBps: the rate assumed before the first transfer (the prior), MB/s.
        alpha: weight of a new observation (0-1).
        min_bytes: transfers smaller than this say nothing of the rate (latency-bound).
        window: with ``window`` >= 3 observations in a row, the estimate is their median
            (one slow request among them moves it not at all); 0: the smoothed value only.
        settle: a first observation more than ``settle`` times off the prior (either way) is
            provisional (:attr:`provisional`): the next observation replaces it instead of
            being averaged with it, and a client re-probes at once (0: off).
        jump: a later observation more than ``jump`` times off the estimate is a suspected step,
            as above (0: off: such a reading is smoothed in like any other).
    """

    def __init__(self, initial_MBps: float, alpha: float = 0.5, min_bytes: int = 65536, *,
                 window: int = 0, settle: float = 0.0, jump: float = 0.0):
        self.value, self.alpha, self.min_bytes = float(initial_MBps), alpha, min_bytes
        self.prior, self.window, self.settle, self.jump = float(initial_MBps), window, settle, jump
        self.observations = 0
        self.provisional = False
        self._recent: deque[float] = deque(maxlen=max(window, 1))
        self._settling = False  # the first reading was far off the prior: the next replaces it
        self._held: tuple[float, list[float], float] | None = None  # (value, window, low reading)
        self._high: float | None = None  # a reading far above the estimate, waiting for a second
        self._readings: deque[float] = deque(maxlen=8)  # the last readings, for uncongested_MBps

    def observe(self, nbytes: int, seconds: float, stale: bool = False) -> float | None:
        """Add one transfer; tiny ones (latency-bound) are not counted. Returns its rate.

        ``stale``: the estimate is old (no measurement for a while): the new one replaces it.
        """
        if nbytes < self.min_bytes or seconds <= 0:
            return None
        rate = nbytes / seconds / 1e6
        self._readings.append(rate)
        first = self.observations == 0 or stale
        self.observations += 1
        if first or self._settling:
            self._restart([rate])
            self._settling = self.provisional = bool(
                first and self.settle and not self.prior / self.settle <= rate <= self.prior * self.settle)
            return rate
        if self._held is not None:  # the last reading was far below the estimate before it
            value, recent, low = self._held
            if rate * self.jump < value:  # so is this one: the link is slower
                self._restart([low, rate])
                return rate
            self.value, self._recent = value, deque(recent, maxlen=self._recent.maxlen)  # one slow request
        self._held, high, self._high, self.provisional = None, self._high, None, False
        if self.jump and rate * self.jump < self.value:  # believed at once, provisionally
            self._held = (self.value, list(self._recent), rate)
            self.value, self.provisional = rate, True
        elif self.jump and rate > self.value * self.jump:  # believed once a second reading agrees
            if high is not None:
                self._restart([high, rate])
            else:
                self._high, self.provisional = rate, True
        else:
            self._recent.append(rate)
            self.value = self.alpha * rate + (1 - self.alpha) * self.value
            if self.window and len(self._recent) >= self.window:
                self.value = statistics.median(self._recent)
        return rate

    @property
    def uncongested_MBps(self) -> float:
        """The link's rate with nobody else on it, as far as the last 8 readings tell, MB/s: the
        fastest of them (a transfer that had the link to itself), never below the estimate; a
        reading more than ``jump`` times above the estimate (the one before a provisional low
        reading) and not yet confirmed is left out, and a step of the link (a restart of the
        estimate) forgets the readings before it.
        On a link that other devices share (a processor-sharing bottleneck such as one htb
        class), bytes / this rate is a transfer's time alone and the rest of its time on the wire
        is the delay the others add (:func:`~dsc_export.serving.policy.priced_state`)."""
        ref = self._held[0] if self._held is not None else self.value  # not one slow reading's
        ok = [r for r in self._readings if not self.jump or r <= ref * self.jump]
        return max([self.value, *ok])

    def _restart(self, readings: list[float]) -> None:
        """Forget the readings before these (the link changed: its uncongested rate too); the
        estimate is the latest."""
        self._recent.clear()
        self._recent.extend(readings)
        self._readings = deque(readings, maxlen=self._readings.maxlen)
        self.value, self._held, self._high, self.provisional = readings[-1], None, None, False


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
        # provisional (issue 25: a cold first answer read a 40 MB/s link as 6 MB/s); a step of
        # more than 2x is followed after one reading (down) or two (up)
        self.rate = RateEstimator(initial_MBps, alpha, min_bytes, window=3, settle=2.0, jump=2.0)
        self.alpha = alpha
        self.q_ms, self.s = 0.0, 1.0
        # the server's time outside its handler: ms per request and ms per MB (load answers)
        self.handover_fixed_ms, self.handover_ms_per_MB = 0.0, 0.0
        self.heard = -math.inf  # time.monotonic() of the last news of the server
        self._slow: deque[float] = deque(maxlen=8)  # the last requests' slowdowns, for uncontended_s
        # the share of the server's recent requests that were other clients' (the load answers'
        # count less this client's own): what a request's added delays fall on; 1 until a load
        # answer tells (a client that sends all the time asks none: it keeps the last it heard)
        self.others_share = 1.0
        self._answered: deque[float] = deque()  # time.monotonic() of this client's answered requests

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
        now = time.monotonic()
        self._answered.append(now)
        while self._answered[0] < now - 60.0:  # a client that never asks the load keeps a minute
            self._answered.popleft()
        wire_ms = round_trip_ms - queue_ms - server_ms - self.handover_ms(nbytes) - rtt_ms
        measured = self.rate.observe(nbytes, wire_ms / 1e3, stale=stale)
        slow = max(1.0, server_ms / tail_ms) if tail_ms > 0 else None
        if slow is not None:
            self._slow.append(slow)
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

    def uncongested_planning_MBps(self) -> float:
        """:meth:`planning_MBps` at the link's uncongested rate
        (:attr:`RateEstimator.uncongested_MBps`), MB/s."""
        return 1.0 / (1.0 / self.rate.uncongested_MBps + self.handover_ms_per_MB / 1e3)

    def uncontended_s(self) -> float:
        """The server's slowdown with nobody else on it, as far as this client's last 8 answered
        requests tell: the least of their slowdowns (a request whose tail ran alone), never above
        the estimate :attr:`s` (:func:`~dsc_export.serving.policy.priced_state`)."""
        return min([self.s, *self._slow])

    def observe_load(self, load: proto.ServerLoad) -> None:
        """Take a load query's answer in: its recent wait, slowdown and hand-over time per MB
        (an idle server: 0 and 1; a hand-over not measured, NaN, leaves the estimate as is), and
        the share of its recent requests that were not this client's (:attr:`others_share`,
        smoothed: the requests in the server's window less this client's answered ones)."""
        now = time.monotonic()
        while self._answered and self._answered[0] < now - max(load.window_s, 60.0):
            self._answered.popleft()
        if load.requests == 0:
            self._server(0.0, 1.0)
            share = 0.0  # nobody else's requests to delay (nor this client's)
        else:
            self._server(load.q_ms, max(1.0, load.s) if load.s == load.s else None)
            mine = sum(t >= now - load.window_s for t in self._answered)
            share = max(0.0, load.requests - mine) / load.requests
        self.others_share = self.alpha * share + (1 - self.alpha) * self.others_share
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
