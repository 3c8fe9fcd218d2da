"""Many devices, one server, simulated: with the damped switch (policy.damped) the devices
converge to a share of the server without oscillating; moving at once (switch_p 1) they herd.
Charged the wait their requests add to others' (``wait_price``, policy.priced_state) they
converge to the fleet's best share (brute force over the share) instead of the share where
offloading stops paying each device alone.

Each round every device chooses with the real plan and policy (best_server, then damped) from
the server's wait of the round before (the delayed signal every device sees alike); the server
serves one batch at a time, so a request waits for the others': q = (k - 1) x service time for k
devices on it (a closed loop's queue)."""

import random
import statistics

from test_server_load import tiny  # noqa: F401  (tiny: a module fixture)

from dsc_export.serving.policy import best_server, damped

SERVICE_MS = 30.0  # the simulated server's time per batch


def _simulate(plan, n: int, switch_p: float, rounds: int = 80, seed: int = 0, wait_price: float = 0.0) -> list[int]:
    """Devices on the server per round."""
    rng = random.Random(seed)
    current = [None] * n  # (server index or None, split) per device
    rate = 2 * 3 * 16 * 16 * 4 / 0.02 / 1e6  # the raw input of a batch of 2 takes 20 ms
    on, q = [], 0.0
    for _ in range(rounds):
        state = [(rate, q, 1.0)]
        for d in range(n):
            best = best_server(plan, 2, state, current=current[d], wait_price=wait_price)
            kept = None
            if current[d] is not None:
                i, split = current[d]
                times = plan.latencies(2, rate if i is not None else 1.0, q_ms=q if i is not None else 0.0)
                kept = (i, split, times[plan.candidates.index(split)])
            choice = damped(best, kept, switch_p, rng.random())
            current[d] = (choice[0], choice[1])
        k = sum(c[0] is not None for c in current)
        on.append(k)
        q = max(0, k - 1) * SERVICE_MS
    return on


def _equilibrium(plan, n: int) -> set[int]:
    """The shares where no single device gains by moving (brute force over k)."""
    rate = 2 * 3 * 16 * 16 * 4 / 0.02 / 1e6
    local = plan.latencies(2, 1.0)[plan.candidates.index("local")]

    def remote(k):  # the best server option for a device when k devices are on the server
        return min(t for c, t in zip(plan.candidates, plan.latencies(2, rate, q_ms=max(0, k - 1) * SERVICE_MS))
                   if c != "local")
    return {k for k in range(n + 1)
            if (k == 0 or remote(k) <= local * 1.05) and (k == n or remote(k + 1) >= local * 0.95)}


def test_devices_sharing_a_server_converge_with_the_damped_switch(tiny):  # noqa: F811
    _, plan = tiny
    n = 8
    eq = _equilibrium(plan, n)
    assert eq and 0 < min(eq) and max(eq) < n  # sharing pays: neither all here nor all there
    herd = _simulate(plan, n, switch_p=1.0)
    assert herd[20:].count(0) + herd[20:].count(n) > 0.8 * len(herd[20:])  # all on, all off, again
    for seed in range(3):
        on = _simulate(plan, n, switch_p=0.2, seed=seed)
        tail = on[30:]
        assert 0 not in tail and n not in tail, on  # no swing to either end
        assert abs(statistics.mean(tail) - statistics.mean(sorted(eq))) <= 1.5, (on, eq)
        assert statistics.pstdev(tail) <= 1.5, on
        swings = sum(abs(a - b) for a, b in zip(tail, tail[1:])) / len(tail)
        assert swings <= 1.5, on  # about one device moves per round, not the fleet


def _fleet_mean_ms(plan, n: int, k: int) -> float:
    """The mean latency over the fleet's n devices with k of them on the server (brute force)."""
    rate = 2 * 3 * 16 * 16 * 4 / 0.02 / 1e6
    local = plan.latencies(2, 1.0)[plan.candidates.index("local")]
    remote = min(t for c, t in zip(plan.candidates, plan.latencies(2, rate, q_ms=max(0, k - 1) * SERVICE_MS))
                 if c != "local") if k else 0.0
    return (k * remote + (n - k) * local) / n


def test_priced_devices_converge_to_the_fleets_best_share(tiny):  # noqa: F811
    _, plan = tiny
    n = 8
    best = min(range(n + 1), key=lambda k: _fleet_mean_ms(plan, n, k))
    selfish = max(_equilibrium(plan, n))
    assert best < selfish  # each device alone would offload past the fleet's best share
    for seed in range(3):
        priced = _simulate(plan, n, switch_p=0.2, seed=seed, wait_price=1.0)[30:]
        alone = _simulate(plan, n, switch_p=0.2, seed=seed)[30:]
        # nearer the best share by at least half a device; one device's move changes the wait by
        # a whole service time here, so the share hovers between the best and one above it
        assert abs(statistics.mean(priced) - best) + 0.5 <= abs(statistics.mean(alone) - best), (priced, alone)
        assert n not in priced and statistics.pstdev(priced) <= 1.2, priced  # no herd onto the server
        fleet = statistics.mean(_fleet_mean_ms(plan, n, k) for k in priced)
        assert fleet < 0.97 * statistics.mean(_fleet_mean_ms(plan, n, k) for k in alone), (priced, alone)
        assert fleet <= 1.12 * _fleet_mean_ms(plan, n, best), (priced, best)
