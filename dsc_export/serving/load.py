"""The server's own bookkeeping of its load, in process: the per-split statistics ``serve``
prints (:class:`Stats`), the recent load the load query answers (:class:`LoadMeter`), the gate
that lets one batch compute at a time and merges the requests that wait for it (:class:`Gate`),
and the hand-over time Triton spends on a request outside dsc-export's handler
(:class:`HandOver`). No Triton here: :mod:`dsc_export.serving.server` wires these to it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dsc_export.serving.protocol import ServerLoad


@dataclass
class Stats:
    """Per-split batch counts, server-side compute time, and requests' wait at the gate."""

    requests: dict[str, int] = field(default_factory=dict)  # batches run
    samples: dict[str, int] = field(default_factory=dict)
    compute_ms: dict[str, float] = field(default_factory=dict)
    waits: dict[str, int] = field(default_factory=dict)  # requests
    queue_ms: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, split: str, batch: int, ms: float, queue_ms: list[float] = ()) -> None:
        """Count one batch of ``batch`` samples of ``split`` that computed for ``ms`` and whose
        requests waited ``queue_ms`` each (ms)."""
        with self.lock:
            self.requests[split] = self.requests.get(split, 0) + 1
            self.samples[split] = self.samples.get(split, 0) + batch
            self.compute_ms[split] = self.compute_ms.get(split, 0.0) + ms
            self.waits[split] = self.waits.get(split, 0) + len(queue_ms)
            self.queue_ms[split] = self.queue_ms.get(split, 0.0) + sum(queue_ms)

    def table(self) -> list[tuple[str, ...]]:
        """The per-split statistics as table rows (a header row first), as ``serve`` prints them."""
        rows = [("split", "batches", "samples", "compute ms (mean per batch)", "wait ms (mean per request)")]
        for s in sorted(self.requests):
            rows.append((s, str(self.requests[s]), str(self.samples[s]), f"{self.compute_ms[s] / self.requests[s]:.2f}",
                         f"{self.queue_ms.get(s, 0.0) / max(self.waits.get(s, 0), 1):.2f}"))
        return rows


class LoadMeter:
    """The server's recent load (what the load query answers), from the batches it ran.

    Args:
        window_s: how far back "recent" reaches, seconds.
        clock: seconds, monotonic (``time.perf_counter``; a fake one in tests).
    """

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.perf_counter):
        self.window_s, self.clock = window_s, clock
        self.since = clock()
        self.waiting = 0  # requests at the gate now
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of each batch, seconds
        self._requests: deque[tuple[float, float, float]] = deque()  # (end, queue ms, slowdown or nan)
        self.lock = threading.Lock()

    def add(self, start: float, end: float, queue_ms: list[float], slowdown: list[float]) -> None:
        """One batch ran from ``start`` to ``end`` (s); its requests waited ``queue_ms`` and ran
        ``slowdown`` times their profiled time (NaN: not known)."""
        with self.lock:
            self._busy.append((start, end))
            self._requests.extend((end, q, x) for q, x in zip(queue_ms, slowdown))
            self._trim(end)

    def _trim(self, now: float) -> None:
        lo = now - self.window_s
        while self._busy and self._busy[0][1] < lo:
            self._busy.popleft()
        while self._requests and self._requests[0][0] < lo:
            self._requests.popleft()

    def load(self) -> ServerLoad:
        """Queue depth now; utilisation, mean wait and mean slowdown over the recent window."""
        now = self.clock()
        with self.lock:
            self._trim(now)
            lo = max(now - self.window_s, self.since)
            busy = sum(min(e, now) - max(s, lo) for s, e in self._busy if e > lo)
            span = max(now - lo, 1e-9)
            qs = [q for _, q, _ in self._requests]
            xs = [x for _, _, x in self._requests if x == x]
            return ServerLoad(float(self.waiting), min(1.0, busy / span), sum(qs) / len(qs) if qs else 0.0,
                              sum(xs) / len(xs) if xs else float("nan"), self.window_s, float(len(qs)))


class Waiting:
    """Requests Triton handed one handler thread, waiting at the gate."""

    def __init__(self, inputs: list[np.ndarray]):
        self.inputs, self.arrived = inputs, time.perf_counter()
        self.answers: list[dict[str, np.ndarray]] | None = None
        self.error: BaseException | None = None
        self.done = False


class Gate:
    """One batch computes at a time on this server; requests that wait for it are merged.

    A handler thread puts its requests in the split's line and waits while another batch runs;
    the thread that finds the server free takes the line from the front (up to ``limit`` samples
    when merging, else one handler's requests) and runs it; threads whose requests it took wait
    for their answers. Each request's wait (arrival here to the start of its batch) is what
    :data:`QUEUE_MS` reports.
    """

    def __init__(self, meter: LoadMeter):
        self.meter = meter
        self._cv = threading.Condition()
        self._busy = False
        self._lines: dict[str, list[Waiting]] = {}

    def serve(self, key: str, item: Waiting, run: Callable[[list[Waiting], float], None], merge: bool,
              limit: int) -> list[dict[str, np.ndarray]]:
        """Wait for the gate, run ``item`` (with whatever waits beside it) or have it run, and
        return its answers. ``run(items, start)`` fills each item's ``answers``.

        Raises:
            whatever ``run`` raised for the batch ``item`` was in.
        """
        with self._cv:
            self._lines.setdefault(key, []).append(item)
            self.meter.waiting += len(item.inputs)
        while True:
            with self._cv:
                while not item.done and self._busy:
                    self._cv.wait()
                if item.done:
                    break
                self._busy = True
                line = self._lines[key]
                take, n = [], 0
                while line and (not take or (merge and n + len(line[0].inputs) <= limit)):
                    n += len(line[0].inputs)
                    take.append(line.pop(0))
                self.meter.waiting -= n
            try:
                run(take, time.perf_counter())
            except BaseException as exc:
                for it in take:
                    it.error = exc
            finally:
                with self._cv:
                    for it in take:
                        it.done = True
                    self._busy = False
                    self._cv.notify_all()
        if item.error is not None:
            raise item.error
        return item.answers


class HandOver:
    """Triton's time on a request outside dsc-export's handler, a fixed part and a part per MB: the
    hand-over from Triton's core to the Python backend's stub and on to this process (and the
    answer's way back), which grows with the request's bytes and with the load on the server's
    cores. Neither :data:`~dsc_export.contract.QUEUE_MS` nor :data:`~dsc_export.contract.SERVER_MS`
    covers it, so a client that left it in its wire time would read a busy server as a slow link
    (issue 25: 23 MB/s estimated on a 39 MB/s link).

    Measured per model and interval between two reads: the mean of Triton's own request duration
    (statistics extension, ``inference_stats.success``: from the request's arrival in the server
    to its answer, after the HTTP/gRPC receive) minus the mean of the handler's own time (entry to
    return, :meth:`handled`) for the requests of the same interval. :meth:`fit` fits a fixed part
    per request and a part per MB to those means over the recent window.

    Args:
        window_s: how far back "recent" reaches, seconds.
        clock: seconds, monotonic.
    """

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.perf_counter):
        self.window_s, self.clock = window_s, clock
        self.lock = threading.Lock()
        self._handled: dict[str, list[float]] = {}  # model -> [requests, handler ms, bytes], cumulative
        self._last: dict[str, tuple[float, float, float, float, float]] | None = None
        self._recent: deque[tuple[float, float, float, float]] = deque()  # (time, requests, ms, MB) each

    def handled(self, model: str, requests: int, ms_each: float, nbytes: int) -> None:
        """``requests`` requests of ``model`` (``nbytes`` in all) spent ``ms_each`` ms each in the
        handler, from its entry to its return."""
        with self.lock:
            h = self._handled.setdefault(model, [0.0, 0.0, 0.0])
            h[0] += requests
            h[1] += requests * ms_each
            h[2] += nbytes

    def update(self, triton: dict[str, tuple[float, float]]) -> None:
        """Take one read of Triton's statistics in: model -> (successful requests, their total
        duration in ms), both cumulative. The first read only sets the baseline."""
        now = self.clock()
        with self.lock:
            cur = {m: (*triton[m], *self._handled.get(m, (0.0, 0.0, 0.0))) for m in triton}
            last, self._last = self._last, cur
            for m, (n, ms, hn, hms, nb) in cur.items() if last is not None else ():
                n0, ms0, hn0, hms0, nb0 = last.get(m, (0.0, 0.0, 0.0, 0.0, 0.0))
                dn, dhn, dnb = n - n0, hn - hn0, nb - nb0
                if dn > 0 and dhn > 0:
                    over = max(0.0, (ms - ms0) / dn - (hms - hms0) / dhn)
                    self._recent.append((now, dhn, over, dnb / dhn / 1e6))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def fit(self) -> tuple[float, float]:
        """The recent hand-over time of a request as ``a + b * MB``: (a in ms per request, b in ms
        per MB of request, 1e6 bytes); (NaN, NaN) with no requests in the window.

        Weighted least squares over the intervals' means (weights: their requests), both parts
        kept >= 0. Where the requests' sizes hardly differ (within 1.5x) the two parts cannot be
        told apart: all of it is per MB when the requests are large (>= 0.1 MB), else fixed.
        """
        with self.lock:
            pts = [(n, o, mb) for _, n, o, mb in self._recent]
        if not pts:
            return float("nan"), float("nan")
        w = np.array([p[0] for p in pts])
        y, x = np.array([p[1] for p in pts]), np.array([p[2] for p in pts])
        ym, xm = float(np.average(y, weights=w)), float(np.average(x, weights=w))
        if x.max() < 1.5 * max(x.min(), 1e-9) or x.max() - x.min() < 1e-3:
            return (0.0, ym / xm) if xm >= 0.1 else (ym, 0.0)
        b = float(np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2))
        b = max(b, 0.0)
        a = ym - b * xm
        if a < 0:  # through the origin
            a, b = 0.0, float(np.sum(w * x * y) / np.sum(w * x * x))
        return a, b
