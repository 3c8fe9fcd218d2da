"""The fleet model (dsc_export.fleet): exact MVA against a discrete-event simulation of the same
closed network, N = 1 against the sum of the parts, the assignment search against brute force, and the
equilibria of devices each choosing for itself (unpriced and priced) against a brute force over solve()."""

import heapq
import itertools
import random

import pytest

from dsc_export.fleet import Demand, best_assignment, equilibria, pins, solve


def simulate(ds, counts, batches=60000, seed=1, shared_link=True):
    """Closed network by events: each device thinks (exponential, delay_ms), then the link
    (processor sharing, exponential link_ms; its own link, a delay, when not shared), then the
    server (FCFS, exponential server_ms), and again. Returns (mean latency per batch, server busy
    fraction)."""
    rng = random.Random(seed)
    devs = [c for c, m in enumerate(counts) for _ in range(m)]
    ev = []  # (time, seq, device, stage)
    seq = itertools.count()
    link = {}  # device -> remaining work on the shared link (ms at full rate)
    queue, busy = [], [None]
    start = {}
    done, total, server_busy, t, warm, t_warm = 0, 0.0, 0.0, 0.0, batches // 10, 0.0

    def ex(m):
        return rng.expovariate(1.0 / m) if m > 0 else 0.0

    def to_server(now, d):
        nonlocal server_busy
        if ds[devs[d]].server_ms == 0:
            finish(now, d)
        elif busy[0] is None:
            busy[0] = d
            s = ex(ds[devs[d]].server_ms)
            server_busy += s
            heapq.heappush(ev, (now + s, next(seq), d, "server"))
        else:
            queue.append(d)

    def finish(now, d):
        nonlocal done, total, server_busy, t_warm
        done += 1
        if done == warm:
            t_warm, total, server_busy = now, 0.0, 0.0
        elif done > warm:
            total += now - start[d]
        start[d] = now
        heapq.heappush(ev, (now + ex(ds[devs[d]].delay_ms), next(seq), d, "think"))

    for d in range(len(devs)):
        start[d] = 0.0
        heapq.heappush(ev, (ex(ds[devs[d]].delay_ms), next(seq), d, "think"))
    while done < batches:
        # the next link completion under processor sharing, against the next event
        t_link = t + min(link.values()) * len(link) if link else float("inf")
        t_next = ev[0][0] if ev else float("inf")
        now = min(t_link, t_next)
        for d in link:
            link[d] -= (now - t) / len(link)
        t = now
        if t_link <= t_next:
            d = min(link, key=link.get)
            del link[d]
            to_server(t, d)
            continue
        _, _, d, stage = heapq.heappop(ev)
        if stage == "think":
            w = ex(ds[devs[d]].link_ms)
            if not shared_link:
                heapq.heappush(ev, (t + w, next(seq), d, "own_link"))
            elif w > 0:
                link[d] = w
            else:
                to_server(t, d)
        elif stage == "own_link":
            to_server(t, d)
        else:
            busy[0] = None
            if queue:
                e = queue.pop(0)
                busy[0] = e
                s = ex(ds[devs[e]].server_ms)
                server_busy += s
                heapq.heappush(ev, (t + s, next(seq), e, "server"))
            finish(t, d)
    return total / (batches - warm), server_busy / (t - t_warm)


A = Demand("a", 30.0, 10.0, 20.0)
B = Demand("b", 5.0, 25.0, 20.0)  # same server time as A (FCFS, one rate); the link shares: product form
L = Demand("local", 100.0, 0.0, 0.0)


@pytest.mark.parametrize("ds,counts", [([A], [3]), ([A], [8]), ([A, B, L], [2, 2, 1]), ([A, B], [1, 4])])
def test_mva_matches_simulation(ds, counts):
    sol = solve(ds, counts)
    sim_mean, sim_util = simulate(ds, counts)
    assert sol.mean_ms == pytest.approx(sim_mean, rel=0.04)
    assert sol.server_utilization == pytest.approx(sim_util, rel=0.04)


def test_own_links_match_simulation():
    ds, counts = [A, B], [3, 3]
    shared, own = solve(ds, counts), solve(ds, counts, shared_link=False)
    sim_mean, _ = simulate(ds, counts, shared_link=False)
    assert own.mean_ms == pytest.approx(sim_mean, rel=0.04)
    assert own.mean_ms < shared.mean_ms  # the shared link queues


def test_one_device_is_the_sum_of_its_parts():
    for d in (A, B, L, Demand("x", 1.5, 42.0, 7.25)):
        sol = solve([A, d] if d is not A else [d], [0, 1] if d is not A else [1])
        assert sol.mean_ms == pytest.approx(d.delay_ms + d.link_ms + d.server_ms, rel=1e-12)
        assert sol.server_wait_ms == pytest.approx(0.0, abs=1e-9)


def test_saturated_server_throughput_is_its_capacity():
    sol = solve([A], [200])
    assert sol.server_utilization == pytest.approx(1.0, abs=1e-3)
    assert sum(sol.throughput_per_s.values()) == pytest.approx(1e3 / A.server_ms, rel=1e-3)


def brute(ds, n):
    best = None
    for vec in itertools.product(range(n + 1), repeat=len(ds)):
        if sum(vec) == n:
            m = solve(ds, vec).mean_ms
            if best is None or m < best[0] - 1e-9:
                best = (m, vec)
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_search_matches_brute_force(n):
    offload = Demand("offload", 4.0, 15.0, 48.0)
    cut = Demand("cut", 137.0, 10.0, 30.0)
    ds = [offload, cut, Demand("late", 300.0, 3.0, 12.0), Demand("local", 302.0, 0.0, 0.0)]
    got = best_assignment(ds, n)
    m, vec = brute(ds, n)
    assert got.mean_ms == pytest.approx(m, rel=1e-12)
    assert [got.counts.get(d.id, 0) for d in ds] == list(vec)
    assert len(pins(got)) == n


def test_a_mixed_assignment_beats_every_uniform_one():
    # offload is fastest alone but the server saturates; local never queues
    ds = [Demand("offload", 2.0, 5.0, 40.0), Demand("local", 150.0, 0.0, 0.0)]
    got = best_assignment(ds, 6)
    uniform = [solve(ds, [6, 0]).mean_ms, solve(ds, [0, 6]).mean_ms]
    assert set(got.counts) == {"offload", "local"}
    assert got.mean_ms < min(uniform) * 0.95
    assert solve([ds[0]], [1]).mean_ms < ds[1].delay_ms  # alone, offload wins


def _brute_equilibria(ds, n, price):
    """Every assignment where no device gains by moving alone: solve() per assignment and move."""
    def cost(vec, c):
        r = solve(ds, vec).latency_ms[ds[c].id]
        return r + price * (r - ds[c].alone_ms)  # the price: w x its queueing at the link and server
    found = set()
    for vec in itertools.product(range(n + 1), repeat=len(ds)):
        if sum(vec) != n:
            continue
        moves = [(c, tuple(m - (j == c) + (j == c2) for j, m in enumerate(vec)), c2)
                 for c in range(len(ds)) if vec[c] for c2 in range(len(ds)) if c2 != c]
        if all(cost(vec, c) <= cost(v2, c2) * (1 + 1e-9) for c, v2, c2 in moves):
            found.add(vec)
    return found


SHARED = [Demand("offload", 5.0, 16.0, 48.0), Demand("cut", 140.0, 13.0, 30.0), Demand("local", 300.0, 0.0, 0.0)]


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("price", [0.0, 1.0])
def test_equilibria_match_brute_force(n, price):
    got = equilibria(SHARED, n, price)
    assert {tuple(e.counts.get(d.id, 0) for d in SHARED) for e in got} == _brute_equilibria(SHARED, n, price)
    assert [e.mean_ms for e in got] == sorted(e.mean_ms for e in got)


def test_the_price_moves_the_equilibrium_to_the_fleets_best():
    """Each for itself, the devices crowd the server and the link past the fleet's best; priced,
    the worst equilibrium comes within 10 % of the best assignment (one device more on the server
    than the best: 3 of 6, against 2), the unpriced one is 1.5x it (all 6 on the server)."""
    n = 6
    best = best_assignment(SHARED, n).mean_ms
    selfish, priced = equilibria(SHARED, n), equilibria(SHARED, n, 1.0)
    assert selfish and priced
    assert selfish[-1].mean_ms > 1.3 * best
    assert priced[-1].mean_ms <= 1.10 * best


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        solve([A, B], [1])
    with pytest.raises(ValueError):
        solve([A], [0])
    with pytest.raises(ValueError):
        best_assignment([A], 0)
    with pytest.raises(ValueError):
        equilibria([A], 0)
