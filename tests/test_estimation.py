"""The client's rate estimate (ServerEstimate: median of 3, settle 2, jump 2) against a step, an
outlier, a cold start and noise. Pure: readings are fed as (1 MB, round trip) with no server."""

import random

import pytest

from dsc_export.serving.estimation import ServerEstimate


def feed(est: ServerEstimate, *rates: float) -> list[float]:
    """Feed one 1 MB transfer per rate (MB/s, all of the round trip on the wire); the estimate after each."""
    out = []
    for r in rates:
        est.observe(1_000_000, round_trip_ms=1e3 / r, queue_ms=0.0, server_ms=0.0, rtt_ms=0.0, tail_ms=0.0)
        out.append(est.rate.value)
    return out


def steady(rate: float, n: int = 4) -> ServerEstimate:
    est = ServerEstimate(rate)
    feed(est, *[rate] * n)
    assert est.rate.value == pytest.approx(rate) and not est.rate.provisional
    return est


def test_a_step_down_is_followed_after_one_reading():
    est = steady(40.0)
    after = feed(est, 4.0)  # the batch that met the change read 4 MB/s
    assert after[-1] == pytest.approx(4.0)  # the next batch is planned at 4 (the median of 3 kept 40)
    assert est.rate.provisional  # until a second reading confirms it
    after = feed(est, 4.4)
    assert after[-1] == pytest.approx(4.4) and not est.rate.provisional  # confirmed: restarted at the latest
    after = feed(est, 4.2, 4.3)
    assert after == pytest.approx([4.2, 4.3])  # median of (4, 4.4, 4.2) then of (4.4, 4.2, 4.3): 40 is gone


def test_a_step_up_is_followed_after_two_readings():
    est = steady(4.0)
    assert feed(est, 40.0) == pytest.approx([4.0])  # one fast reading moves nothing
    assert est.rate.provisional  # a client running locally re-probes at once
    assert feed(est, 44.0) == pytest.approx([44.0]) and not est.rate.provisional


def test_one_slow_reading_sets_one_plan_low_and_then_leaves_no_trace():
    est, clean = steady(10.0), steady(10.0)
    values = feed(est, 11.0, 1.0, 9.0, 10.5, 9.5)
    assert values[1] == pytest.approx(1.0) and values[2] != pytest.approx(1.0)  # believed for one batch only
    assert values[2:] == pytest.approx(feed(clean, 11.0, 9.0, 10.5, 9.5)[1:])  # as if it had never come


def test_one_fast_reading_moves_nothing():
    est, clean = steady(10.0), steady(10.0)
    values = feed(est, 11.0, 100.0, 9.0, 10.5)
    assert values[1] == values[0]  # the fast one did not move it
    assert values[2:] == pytest.approx(feed(clean, 11.0, 9.0, 10.5)[1:])  # and left no trace
    assert not est.rate.provisional


def test_a_cold_first_reading_far_off_the_prior_is_replaced_by_the_next():
    est = ServerEstimate(40.0)  # issue 25: a cold first answer read a 40 MB/s link as 6 MB/s
    assert feed(est, 6.0) == pytest.approx([6.0]) and est.rate.provisional
    assert feed(est, 40.0) == pytest.approx([40.0]) and not est.rate.provisional  # replaced, not averaged
    far = ServerEstimate(40.0)  # the link really is at 6: two readings say so
    assert feed(far, 6.0, 6.0) == pytest.approx([6.0, 6.0]) and not far.rate.provisional


def test_noise_around_a_steady_rate_restarts_nothing():
    rng = random.Random(25)
    est = steady(10.0)
    for _ in range(500):
        value = feed(est, 10.0 * rng.uniform(0.8, 1.2))[-1]
        assert not est.rate.provisional  # no reading within +-20 % is taken for a step
        assert 8.0 <= value <= 12.0  # the median of three readings within +-20 %


def test_the_demo_table_counts_the_batches_planned_at_the_old_rate():
    from dsc_export.demo import session_by_rate

    def row(rate, est, got, pred, ms, split="cut029-float16"):
        return {"rate_MBps": rate, "split": split, "rate_estimate_MBps": est, "measured_rate_MBps": got,
                "predicted_ms": pred, "measured_ms": ms}

    rows = [row(2.0, 2.0, 1.8, 370.0, 390.0), row(2.0, 1.8, None, 360.0, 380.0, "local"),
            row(5.0, 45.0, 4.75, 100.0, 330.0, "offload"), row(5.0, 4.75, 4.2, 280.0, 300.0),
            row(5.0, 4.2, 4.2, 290.0, 310.0), row(5.0, 4.2, 4.1, 290.0, 320.0),
            row(9.0, 1.0, 9.0, 50.0, 60.0)]
    slow, five, only = session_by_rate(rows)
    assert slow["stale"] == 0 and slow["splits"] == ["cut029-float16", "local"]
    assert slow["measured_ms"] == pytest.approx(385.0) and slow["rest_measured_ms"] == pytest.approx(385.0)
    assert five["stale"] == 1  # planned at 45 MB/s; this rate's readings: median 4.2
    assert five["measured_ms"] == pytest.approx(315.0) and five["predicted_ms"] == pytest.approx(240.0)
    assert five["rest_measured_ms"] == pytest.approx(310.0) and five["rest_predicted_ms"] == pytest.approx(860 / 3)
    assert only["stale"] == 1 and only["rest_measured_ms"] is None


def test_the_uncongested_rate_is_the_fastest_recent_reading():
    """A link shared with other devices: readings between its rate alone (40) and a quarter of
    it; the uncongested rate is the fastest of the last 8 (brute force), never below the
    estimate, and a single unconfirmed reading far above it does not count."""
    rng = random.Random(3)
    est = steady(40.0)
    readings = [40.0 / rng.choice([1, 1.25, 1.5, 1.9]) for _ in range(30)]  # none 2x below: no restart
    seen = [40.0] * 4  # steady's
    for r in readings:
        feed(est, r)
        seen.append(r)
        v = est.rate.value  # a reading more than 2x above it is a suspected step up: not counted yet
        assert not est.rate.provisional
        assert est.rate.uncongested_MBps == pytest.approx(max([v, *(x for x in seen[-8:] if x <= 2 * v)]))
    assert max(readings[-8:]) == 40.0  # the fastest of the last 8 had the link to itself
    before = est.rate.value
    feed(est, 10.0)  # one slow reading (maybe one slow request): the fast readings still count
    assert est.rate.provisional
    assert est.rate.uncongested_MBps == pytest.approx(max(x for x in seen[-7:] if x <= 2 * before))
    feed(est, 10.0)  # a second: the link itself slowed down (a step): its old rate is forgotten at once
    assert est.rate.uncongested_MBps == pytest.approx(10.0)
    feed(est, *[10.0] * 6)
    feed(est, 95.0)  # one reading far above, not yet confirmed
    assert est.rate.uncongested_MBps == pytest.approx(10.0)
    assert est.uncongested_planning_MBps() == pytest.approx(10.0)  # no hand-over measured


def test_the_uncontended_slowdown_is_the_least_recent_one():
    """Each answered request's slowdown (server_ms / the profiled tail); the uncontended one is the
    least of the last 8 (brute force), never above the smoothed estimate."""
    est = ServerEstimate(10.0)
    slows = [3.0, 1.2, 4.0, 6.0, 2.5, 5.0, 7.0, 3.5, 6.5, 4.5, 8.0]
    for k, sl in enumerate(slows):
        est.observe(1_000_000, round_trip_ms=100.0 + 10 * sl, queue_ms=0.0, server_ms=10 * sl, rtt_ms=0.0,
                    tail_ms=10.0)
        assert est.uncontended_s() == pytest.approx(min([est.s, *slows[max(0, k - 7):k + 1]]))
    assert est.uncontended_s() == pytest.approx(2.5) and 2.5 < est.s  # 1.2 aged out
