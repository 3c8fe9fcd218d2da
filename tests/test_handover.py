"""The server's hand-over time (Triton's time on a request outside dsc-export's handler): what
the server measures from Triton's statistics, what the load answer carries, and what a client
takes out of its wire time (issue 25: a saturated server read as a slow link)."""

from __future__ import annotations

import numpy as np
import pytest

from dsc_export.serving.estimation import ServerEstimate
from dsc_export.serving.load import HandOver
from dsc_export.serving.protocol import ServerLoad


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _serve(h: HandOver, triton: dict, model: str, n: int, handler_ms: float, over_ms: float, nbytes: int):
    """n requests of nbytes each: the handler's time, and Triton's (handler + hand-over) added up."""
    h.handled(model, n, handler_ms, n * nbytes)
    req, ms = triton.get(model, (0, 0.0))
    triton[model] = (req + n, ms + n * (handler_ms + over_ms))


def test_fit_recovers_a_fixed_part_and_a_part_per_MB():
    clock = Clock()
    h = HandOver(10.0, clock)
    triton = {}
    h.update(dict(triton))  # the baseline
    a, b = 1.5, 6.0  # ms per request, ms per MB
    for k, (model, mb) in enumerate([("big", 2.4), ("small", 0.001), ("mid", 0.6)] * 3):
        clock.t = k * 0.3
        _serve(h, triton, model, 4, 20.0 + k, a + b * mb, int(mb * 1e6))
        h.update(dict(triton))
    fa, fb = h.fit()
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6)


def test_one_request_size_large_is_all_per_MB_small_is_all_fixed():
    for mb, want in [(2.4, (0.0, 12.0 / 2.4)), (0.001, (12.0, 0.0))]:
        h, triton = HandOver(10.0, Clock()), {}
        h.update({"m": (0, 0.0)})
        _serve(h, triton, "m", 3, 30.0, 12.0, int(mb * 1e6))
        h.update(dict(triton))
        assert h.fit() == pytest.approx(want)


def test_nothing_measured_is_nan_and_old_readings_leave_the_window():
    clock = Clock()
    h, triton = HandOver(2.0, clock), {}
    assert all(x != x for x in h.fit())
    h.update({"m": (0, 0.0)})
    _serve(h, triton, "m", 2, 10.0, 5.0, 1_000_000)
    h.update(dict(triton))
    assert h.fit() == pytest.approx((0.0, 5.0))
    clock.t = 5.0
    h.update(dict(triton))  # no request since: the reading of 5 s ago is out of the window
    assert all(x != x for x in h.fit())


def test_the_load_answer_carries_the_hand_over_and_reads_an_older_server():
    load = ServerLoad(1.0, 0.5, 3.0, 1.2, 2.0, 7.0, 1.5, 6.0)
    assert ServerLoad.from_array(load.to_array()) == load
    old = ServerLoad.from_array(np.array([1.0, 0.5, 3.0, 1.2, 2.0, 7.0]))  # six values: before the fields
    assert old.q_ms == 3.0 and old.handover_ms != old.handover_ms and old.handover_ms_per_MB != old.handover_ms_per_MB


def test_a_client_takes_the_hand_over_out_of_its_wire_time():
    link, nbytes, rtt = 40.0, 2_400_000, 1.0
    wire_ms = nbytes / (link * 1e6) * 1e3
    q, server, over = 30.0, 25.0, 2.0 + 7.0 * nbytes / 1e6  # the server's wait, compute, hand-over (ms)
    rt = wire_ms + q + server + over + rtt
    blind_to_it = ServerEstimate(40.0)
    est = ServerEstimate(40.0)
    for _ in range(4):
        est.observe_load(ServerLoad(0, 0.9, q, 1.0, 2.0, 10.0, 2.0, 7.0))
    for e in (blind_to_it, est):
        for _ in range(3):
            e.observe(nbytes, round_trip_ms=rt, queue_ms=q, server_ms=server, rtt_ms=rtt, tail_ms=25.0)
    assert blind_to_it.rate.value < 0.8 * link  # the hand-over read as wire: the link looks slow
    # the load answers' hand-over is smoothed in (4 answers, alpha 0.5: 15/16 of it)
    assert est.rate.value == pytest.approx(link, rel=0.03)
    # the choice still pays the hand-over per byte: 1 / (1/rate + b)
    assert est.planning_MBps() == pytest.approx(1 / (1 / est.rate.value + est.handover_ms_per_MB / 1e3))
    assert est.planning_MBps() < est.rate.value
