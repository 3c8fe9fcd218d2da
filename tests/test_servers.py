"""More than one server: split and server chosen together, a failed server skipped for its
back-off with the batch retried elsewhere, a server of another model refused, a stock Triton's
load read from its statistics."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_server_load import FakeServer, tiny  # noqa: F401  (tiny: a module fixture)

from dsc_export.artifacts import read_manifest
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.serving import client as client_mod
from dsc_export.serving.client import ClientOptions, DynamicSplitClient
from dsc_export.serving.policy import best_server, server_urls
from dsc_export.serving.processes import kill_stubs
from dsc_export.serving.server import free_ports
from dsc_export.serving.tritonserver import ModelStats, stats_load

ROOT = Path(__file__).parents[1]


def _pairs(plan, batch, states):
    """Every (server, candidate, predicted ms) the plan gives, local as server None."""
    local = plan.latencies(batch, 1.0)[plan.candidates.index("local")]
    out = [(None, "local", local)]
    for i, st in enumerate(states):
        if st is not None:
            lat = plan.latencies(batch, st[0], q_ms=st[1], s=st[2])
            out += [(i, c, t) for c, t in zip(plan.candidates, lat) if c != "local"]
    return out


def test_server_urls():
    assert server_urls("a:1") == ["a:1"]
    assert server_urls("a:1, b:2") == ["a:1", "b:2"]
    assert server_urls(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert server_urls(None) == [] and server_urls(()) == []
    with pytest.raises(UserError, match="server a:1 is given twice"):
        server_urls(["a:1", "b:2,a:1"])


def test_best_server_is_the_fastest_pair_of_server_and_split(tiny):  # noqa: F811
    _, plan = tiny
    for states in ([(100.0, 300.0, 1.0), (100.0, 0.0, 1.0)],  # the first waits: the second
                   [(100.0, 0.0, 1.0), (1.0, 0.0, 1.0)],  # the second's link is slow: the first
                   [(1.0, 0.0, 1.0), (100.0, 20.0, 3.0)],  # a slow link or a busy, slow server
                   [None, (10.0, 5.0, 1.0)],  # the first is down
                   [(100.0, 5000.0, 1.0), (100.0, 5000.0, 1.0)]):  # both swamped: here
        for batch in (1, 2):
            i, split, t = best_server(plan, batch, states)
            pairs = _pairs(plan, batch, states)
            best = min(p[2] for p in pairs)
            assert (i, split, t) in pairs
            assert t <= best * (1 + plan.margin) + 1e-9
            if split != "local":
                assert t == best
            assert states[i] is not None if i is not None else True
    # the best split differs per server (a slow link: the small cut tensor; a fast one: offload)
    states = [(0.1, 0.0, 1.0), (100.0, 0.0, 1.0)]
    per = [min((p for p in _pairs(plan, 2, states) if p[0] == k), key=lambda p: p[2]) for k in (0, 1)]
    assert per[0][1] != per[1][1]
    assert best_server(plan, 2, states)[:2] == (1, per[1][1])
    # the pair in use is kept within the margin; privacy never offloads
    assert best_server(plan, 2, [(100.0, 0.0, 1.0)] * 2, current=(1, per[1][1]))[0] == 1
    assert best_server(plan, 2, [(100.0, 0.0, 1.0)] * 2, exclude={"offload"})[1] != "offload"


@pytest.mark.parametrize("price", [0.5, 1.0])
def test_a_priced_wait_chooses_by_time_plus_price_and_predicts_the_time(tiny, price):  # noqa: F811
    """best_server(wait_price=w): the pair with the least Eq. 4 time + w x (q + the link's delay
    beyond its uncongested time) wins (brute force over every pair), and the time it returns is
    Eq. 4's, the price left out."""
    _, plan = tiny

    def delay(i, c, batch, st):  # what the request meets beyond an idle server and a free link
        link = plan.times[c]["bytes"] * batch / 1e3 * (1 / st[0] - 1 / st[3]) if len(st) > 3 else 0.0
        tail = (st[2] - st[4]) * plan.parts_ms(c, batch)[1] if len(st) > 4 else 0.0
        return st[1] + link + tail

    for states in ([(100.0, 30.0, 1.0)], [(100.0, 60.0, 1.0), (10.0, 5.0, 1.0)], [(1.0, 0.0, 1.0), None],
                   [(100.0, 40.0, 2.0), (100.0, 45.0, 1.0)], [(5.0, 10.0, 1.0, 20.0), (5.0, 12.0, 1.0, 5.0)],
                   [(2.0, 0.0, 1.0, 8.0)], [(50.0, 5.0, 6.0, 50.0, 1.5), (20.0, 8.0, 2.0, 40.0, 2.0)]):
        for batch in (1, 2):
            pairs = _pairs(plan, batch, states)
            cost = {(i, c): t + (price * delay(i, c, batch, states[i]) if i is not None else 0.0)
                    for i, c, t in pairs}
            i, split, t = best_server(plan, batch, states, wait_price=price)
            assert cost[(i, split)] <= min(cost.values()) * (1 + plan.margin) + 1e-9
            assert (i, split, t) in pairs  # the predicted time, not the cost
    # a server whose wait makes offloading pay this device but cost the fleet more: here
    local = plan.latencies(2, 1.0)[plan.candidates.index("local")]
    remote = min(plan.latencies(2, 100.0))
    q = (local - remote) * 0.75  # remote + q < local < remote + 2q
    assert best_server(plan, 2, [(100.0, q, 1.0)])[0] == 0
    assert best_server(plan, 2, [(100.0, q, 1.0)], wait_price=1.0)[:2] == (None, "local")
    # the same on a shared link: a free link's rate, and the rate a crowded one leaves this device
    lat = dict(zip(plan.candidates, plan.latencies(2, 100.0)))
    c = min((c for c in plan.candidates if c != "local"), key=lat.get)
    nbytes_ms = plan.times[c]["bytes"] * 2 / 1e3  # ms per 1/(MB/s)
    r = 1 / (1 / 100.0 + (local - lat[c]) * 0.3 / nbytes_ms)  # it meets a delay of 0.3 of the gap to local
    assert best_server(plan, 2, [(r, 0.0, 1.0, 100.0)])[:2] == (0, c)
    priced = best_server(plan, 2, [(r, 0.0, 1.0, 100.0)], wait_price=1.0)[1]
    assert plan.times[priced]["bytes"] < plan.times[c]["bytes"]  # fewer bytes on the crowded link, or none
    assert best_server(plan, 2, [(r, 0.0, 1.0, r)], wait_price=1.0)[:2] == (0, c)  # uncrowded: no price


def test_stats_load_is_the_mean_wait_of_the_window():
    before = {"a": ModelStats(10, 5, 100.0, 50.0), "b": ModelStats(4, 4, 8.0, 40.0)}
    after = {"a": ModelStats(14, 7, 180.0, 70.0), "b": ModelStats(4, 4, 8.0, 40.0), "c": ModelStats(2, 1, 6.0, 9.0)}
    load, per_model = stats_load(before, after, 2.0)
    assert load.requests == (14 - 10) + 2
    assert load.q_ms == pytest.approx(((180.0 - 100.0) + 6.0) / load.requests)
    assert per_model == {"a": ((180.0 - 100.0) / 4, (70.0 - 50.0) / 4), "c": (3.0, 4.5)}  # b: nothing new
    assert load.s != load.s and load.window_s == 2.0  # no profile at a stock Triton: s unknown
    idle, none = stats_load(after, after, 1.0)
    assert idle.requests == 0 and idle.q_ms == 0.0 and none == {}


class Refused(FakeServer):
    def infer(self, model, x, outputs):
        raise ConnectionRefusedError(f"[Errno 111] Connection refused ({self.url})")


def test_batches_go_to_the_idle_server_and_survive_a_failed_one(tiny):  # noqa: F811
    root, plan = tiny
    man = read_manifest(root)
    whole = make_session(root / man.model.path)
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    want = whole.run(None, {"image": x})[0]
    busy, idle = FakeServer(root, 50.0), FakeServer(root, 50.0)
    busy.url, idle.url, busy.queue_ms, busy.recent_q = "busy:1", "idle:2", 300.0, 300.0
    logs = []
    client = DynamicSplitClient(root, None, plan, options=ClientOptions(
        load_probe_s=0.0, initial_rate_MBps=50.0, backoff_s=0.2, max_backoff_s=0.5), log=logs.append)
    with client:
        client.endpoints = [client._endpoint(s.url, s) for s in (busy, idle)]
        for _ in range(6):
            np.testing.assert_allclose(client.infer(x)["logits"], want, rtol=1e-4, atol=1e-5)
        assert all(b.server == "idle:2" for b in logs[1:]), [(b.server, b.q_ms) for b in logs]
        assert client.endpoints[0].estimate.q_ms > 100  # the load query keeps it known busy
        # the idle server dies: the batch is retried on the busy one, nothing runs here unasked
        client.endpoints[1].remote = Refused(root, 50.0)
        client.endpoints[1].remote.url = "idle:2"
        t = time.monotonic()
        np.testing.assert_allclose(client.infer(x)["logits"], want, rtol=1e-4, atol=1e-5)
        b = logs[-1]
        assert b.fallback.startswith("idle:2: ConnectionRefusedError") and b.tries == 1
        assert b.server == "busy:1" or b.split == "local"  # the next best: the busy server, or here
        ep = client.endpoints[1]
        assert t + 0.2 <= ep.down_until <= time.monotonic() + 0.2 and ep.backoff_s == 0.4
        np.testing.assert_allclose(client.infer(x)["logits"], want, rtol=1e-4, atol=1e-5)
        assert logs[-1].tries == 0  # skipped while backing off
        for expect in (0.5, 0.5):  # each failure in a row doubles the back-off, up to the cap
            ep.down_until = 0.0
            client._current = (1, logs[0].planned)
            client.infer(x)
            assert logs[-1].tries == 1 and ep.backoff_s == expect


def test_a_server_of_another_model_is_refused_by_url(tiny, monkeypatch):  # noqa: F811
    root, plan = tiny
    sha = read_manifest(root).model.sha256

    class Remote:
        def __init__(self, url, protocol, timeout_s):
            self.url, self.has_server_ms = url, True

        def wait_ready(self, models, timeout_s, on_wait):
            pass

        def model_sha256(self, model):
            return sha if self.url == "a:1" else "0" * 64

        def close(self):
            pass

    monkeypatch.setattr(client_mod, "connect", Remote)
    with pytest.raises(UserError, match=r"^the server at b:2 serves another model \(sha256 000000000000…"):
        DynamicSplitClient(root, "a:1,b:2", plan)
    with DynamicSplitClient(root, ["a:1"], plan) as c:
        assert [e.url for e in c.endpoints] == ["a:1"]


def _serve(root: Path, log: Path) -> tuple[subprocess.Popen, str]:

    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "dsc_export", "serve", str(root), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1",
                             "--triton-log", str(log)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{http}"


def test_killing_one_of_two_servers_loses_no_batch(tiny, tmp_path):  # noqa: F811
    """Two real servers (each its own process group); the one answering is killed (SIGKILL)
    mid-run. Every batch is answered, by a server, exactly like the whole model."""
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    root, plan = tiny
    man = read_manifest(root)
    whole = make_session(root / man.model.path)
    procs = [_serve(root, tmp_path / f"triton-{k}.log") for k in range(2)]
    try:
        logs = []
        rng = np.random.default_rng(3)
        with DynamicSplitClient(root, [u for _, u in procs], plan, options=ClientOptions(
            initial_rate_MBps=100.0, deadline_s=3.0, backoff_s=0.2, max_backoff_s=0.5,
            ready_timeout_s=180), log=logs.append) as client:
            killed = None
            for k in range(12):
                if k == 4:
                    killed = next(p for p, u in procs if u == logs[-1].server)  # the one in use
                    os.killpg(killed.pid, signal.SIGKILL)
                    killed.wait(timeout=30)
                    time.sleep(0.3)
                x = rng.random((2, 3, 16, 16), dtype=np.float32)
                got = client.infer(x)["logits"]
                np.testing.assert_allclose(got, whole.run(None, {"image": x})[0], rtol=1e-4, atol=1e-5)
        dead = next(u for p, u in procs if p is killed)
        alive = next(u for p, u in procs if p is not killed)
        assert len(logs) == 12
        assert all(b.server is not None and b.split != "local" for b in logs), logs  # offload wins: never here
        assert all(b.fallback is None and b.tries == 0 for b in logs[:4])
        # batch 4 either tried the dead server and was retried on the other at once, or (a client
        # whose estimates already preferred the other server, as on a loaded machine) went there
        assert logs[4].server == alive
        assert logs[4].fallback is None or logs[4].fallback.startswith(dead)
        assert all(b.server == alive for b in logs[4:])
    finally:
        for p, _ in procs:  # the killed one's stubs too: they outlive it (tests/test_processes.py)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            kill_stubs(p.pid)


def test_run_cli_takes_several_servers_and_refuses_in_one_line(tiny):  # noqa: F811

    root, _ = tiny
    (port,) = free_ports(1)

    def run(*servers):
        args = [a for s in servers for a in ("--server", s)]
        return subprocess.run([sys.executable, "-m", "dsc_export", "run", str(root), *args, "--wait-ready", "0",
                               "--batches", "1"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)

    r = run("127.0.0.1:1", "127.0.0.1:2,127.0.0.1:1")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: server 127.0.0.1:1 is given twice"]
    r = run(f"127.0.0.1:{port}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in r.stderr
