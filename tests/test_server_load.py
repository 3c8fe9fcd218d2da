"""Server load in the choice: the server reports its wait and compute apart, the client keeps the
wait out of its rate estimate, and its choice moves to the device while the server is busy."""

import threading
import time

import numpy as np
import pytest
from served_models import conv_net

from dsc_export.artifacts import Profile, Timing, read_manifest
from dsc_export.ort import make_session
from dsc_export.planning import make_plan
from dsc_export.serving.estimation import RateEstimator, ServerEstimate
from dsc_export.serving.protocol import QUEUE_MS, SERVER_MS, ServerLoad

# --- the estimate alone -----------------------------------------------------------------------


def test_rate_estimate_is_unaffected_by_the_servers_wait():
    link, rtt, nbytes = 20.0, 2.0, 400_000  # MB/s, ms, bytes: 20 ms on the wire
    est = ServerEstimate(5.0, alpha=0.5)
    blind = RateEstimator(5.0, 0.5)  # today's client: the wait counts as time on the wire
    wire_ms = nbytes / (link * 1e3)
    for queue in [0, 0, 50, 200, 400, 400, 400, 0]:  # the server saturates, then recovers
        compute, tail = 8.0, 4.0  # merged into a bigger batch: twice its own batch's profiled time
        round_trip = wire_ms + queue + compute + rtt
        est.observe(nbytes, round_trip_ms=round_trip, queue_ms=queue, server_ms=compute, rtt_ms=rtt, tail_ms=tail)
        blind.observe(nbytes, (round_trip - compute - rtt) / 1e3)
        assert est.rate.value == pytest.approx(nbytes / (wire_ms / 1e3) / 1e6)
        if queue >= 200:
            assert blind.value < 0.5 * link  # what the load-blind estimate makes of a busy server
    assert est.s == pytest.approx(2.0, rel=0.01)  # smoothed from 1 (as profiled) toward 8 ms / 4 ms
    assert 0 < est.q_ms < 400  # smoothed: it fell with the last, idle answer
    est.observe_load(ServerLoad(0, 0.0, 0.0, float("nan"), 2.0, 0))  # an idle server: q -> 0, s -> 1
    est.observe_load(ServerLoad(0, 0.0, 0.0, float("nan"), 2.0, 0))
    assert est.q_ms < 0.3 * 400 and 1.0 <= est.s < 2.0
    est.observe_load(ServerLoad(3, 0.9, 120.0, 3.0, 2.0, 40))
    assert est.q_ms > 50 and est.s > 1.5


# --- the client with a fake loaded server ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A conv net split dir, and a plan where the device is slow (50 ms a sample) and the server fast."""
    from test_serving_contract import _split_with_plan

    root = _split_with_plan(conv_net(outputs=("logits",)), tmp_path_factory.mktemp("load") / "tiny", [1, 2])
    man = read_manifest(root)
    sha = man.model.sha256
    dev = Profile("device", "onnxruntime", {}, None, sha,
                  [Timing(split=s.id, part="head", batch=b, median_ms=50.0 * b * (0.5 if s.kind == "split" else 1.0),
                          p10_ms=0, p90_ms=0, runs=3)
                   for s in man.splits if s.head for b in (1, 2)])
    srv = Profile("server", "onnxruntime", {}, None, sha,
                  [Timing(split=s.id, part="tail", batch=b, median_ms=1.0 * b, p10_ms=0, p90_ms=0, runs=3)
                   for s in man.splits if s.tail for b in (1, 2)])
    return root, make_plan(man, dev, srv, batch_sizes=[1, 2], rates=[1, 10, 100], rtt_ms=1.0)


class FakeServer:
    """Answers with the real tail, after the time the link and the server's wait would take."""

    def __init__(self, root, rate_MBps: float):
        self.root, self.man, self.rate = root, read_manifest(root), rate_MBps
        self.queue_ms, self.has_server_ms, self.sessions, self.loads = 0.0, True, {}, 0
        self.recent_q = 0.0  # the wait of the requests it served lately: what the load query says

    def infer(self, model, x, outputs):
        split = self.man.split(model)
        if model not in self.sessions:
            self.sessions[model] = make_session(self.root / split.tail)
        sess = self.sessions[model]
        time.sleep(x.nbytes / (self.rate * 1e6) + (self.queue_ms + 1.0) / 1e3)
        out = dict(zip(outputs, sess.run(None, {sess.get_inputs()[0].name: x})))
        self.recent_q = self.queue_ms
        return {**out, SERVER_MS: np.full((len(x), 1), 1.0, np.float32),
                QUEUE_MS: np.full((len(x), 1), self.queue_ms, np.float32)}

    def load(self):
        self.loads += 1
        busy = self.recent_q > 0
        return ServerLoad(4 if busy else 0, 1.0 if busy else 0.1, self.recent_q, 1.0, 2.0, 30 if busy else 0)

    def close(self):
        pass


def _client(root, plan, server, **kw):
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    log = kw.pop("log", lambda b: None)
    client = DynamicSplitClient(root, None, plan, options=ClientOptions(
        load_probe_s=0.0, **kw), log=log)
    client.endpoints = [client._endpoint(getattr(server, "url", "remote"), server)]
    client.endpoints[0].estimate.rate.min_bytes = 1000  # the tiny model's tensors are small
    return client


def test_choice_moves_to_the_device_while_the_server_waits_and_back(tiny):
    root, plan = tiny
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16)).astype(np.float32)
    offload_bytes = x.nbytes
    server = FakeServer(root, rate_MBps=offload_bytes / 0.02 / 1e6)  # 20 ms on the wire for the input
    logs = []
    # a budget that would pay for a probe every third batch: none goes to a server busy enough
    with _client(root, plan, server, log=logs.append, initial_rate_MBps=server.rate, probe_budget=10.0) as client:
        want = make_session(root / read_manifest(root).model.path).run(None, {"image": x})[0]
        for queue, n in [(0.0, 4), (300.0, 6), (0.0, 6)]:
            server.queue_ms = queue  # what the next request will wait
            server.recent_q = min(server.recent_q, queue)  # recovered: nobody waits any more
            for _ in range(n):
                got = client.infer(x)["logits"]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    splits = [b.split for b in logs]
    assert all(s != "local" for s in splits[:4])  # an idle server and a fine link: offloaded
    assert splits[4] == "offload" and splits[5:10] == ["local"] * 5  # the server waits 300 ms: back here, no probe
    assert splits[-1] != "local"  # recovered: offloading again
    assert server.loads > 0  # while local, the client asked the server's load
    sent = [b for b in logs if b.measured_rate_MBps is not None]
    for b in sent:  # every measurement reads the link, whatever the server's wait
        assert b.measured_rate_MBps == pytest.approx(server.rate, rel=0.35)
    assert any(b.queue_ms >= 300 for b in sent)
    assert min(b.rate_MBps for b in logs) > 0.5 * server.rate


@pytest.mark.parametrize("price", [0.0, 1.0])
def test_a_priced_client_probes_from_its_budget_only(tiny, price):
    """A server that waits 45 ms over a link where the input takes 40 ms: offloading (43 ms + the
    wait) beats running here (100 ms) for this device alone, not once the wait it adds to others
    is charged (43 + 2 x 45), though it would over a perfect link (3 + 2 x 45: so the link is worth
    probing). Unpriced the client offloads every batch; priced it runs here and probes from its
    budget only (5 % of 100 ms a batch against 33 ms extra: about one probe in 7 batches), not
    after every probe_every (3) local batches, as the probe's time alone would allow."""
    root, plan = tiny
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16)).astype(np.float32)
    server = FakeServer(root, rate_MBps=x.nbytes / 0.04 / 1e6)
    server.queue_ms = server.recent_q = 45.0
    logs = []
    with _client(root, plan, server, log=logs.append, initial_rate_MBps=server.rate, wait_price=price) as client:
        for _ in range(30):
            client.infer(x)
    sent = [b.split != "local" for b in logs[4:]]
    if price == 0:
        assert all(sent)
    else:
        assert 1 <= sum(sent) <= 5, [b.split for b in logs]  # every 4th batch would be 6 or 7


@pytest.mark.parametrize("alone", [True, False])
def test_the_price_falls_on_other_clients_requests_only(tiny, alone):
    """A server that waits 40 ms (a link where the input takes 40 ms): charged at the default w = 3,
    offloading (83 ms, + 3 x 40 charged) loses to running here (100 ms) while the server's load
    answers count requests of other clients; when every request it counts is this client's own
    (it is alone: the delays it adds fall on its own next requests, already in its own time), the
    price falls away and the client offloads, as it would unpriced."""
    root, plan = tiny
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16)).astype(np.float32)
    server = FakeServer(root, rate_MBps=x.nbytes / 0.04 / 1e6)
    server.queue_ms = server.recent_q = 40.0
    answered = []
    real_infer = server.infer

    def infer(model, z, outputs):
        answered.append(time.monotonic())
        return real_infer(model, z, outputs)

    def load():  # the requests of its 2 s window: this client's only, or 30 with other clients'
        mine = sum(t >= time.monotonic() - 2.0 for t in answered)
        return ServerLoad(1, 0.5, server.recent_q, 1.0, 2.0, mine if alone else 30)

    server.infer, server.load = infer, load
    logs = []
    with _client(root, plan, server, log=logs.append, initial_rate_MBps=server.rate) as client:
        assert client.options.wait_price == 3.0
        for _ in range(16):
            client.infer(x)
    late = [b.split for b in logs[6:]]
    if alone:
        assert all(s != "local" for s in late), [b.split for b in logs]
        assert client.endpoints[0].estimate.others_share < 0.1
    else:
        assert late.count("local") >= len(late) - 3, [b.split for b in logs]  # probes aside
        assert client.endpoints[0].estimate.others_share > 0.5


def test_client_recovers_from_a_slow_first_answer(tiny):
    """A cold start: the first answer takes 400 ms more on the wire than the link would (the
    20 ms link reads as 20x slower). The reading is provisional (far off the assumed rate): the
    client runs here, re-probes after probe_every batches whatever the probe budget, and is back
    on the server with the link's rate."""
    root, plan = tiny
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16)).astype(np.float32)
    server = FakeServer(root, rate_MBps=x.nbytes / 0.02 / 1e6)
    real, calls = server.infer, []

    def infer(model, z, outputs):
        calls.append(model)
        if len(calls) == 1:
            time.sleep(0.4)
        return real(model, z, outputs)

    server.infer = infer
    logs = []
    with _client(root, plan, server, log=logs.append, initial_rate_MBps=server.rate) as client:
        for _ in range(8):
            client.infer(x)
    assert logs[0].split == "offload" and logs[0].measured_rate_MBps < 0.1 * server.rate  # the slow one
    assert logs[1].split != "offload"  # believed, at first
    back = next(i for i, b in enumerate(logs[1:], 1) if b.split == "offload")
    assert back <= 1 + client.options.probe_every  # re-measured at the first chance
    assert all(b.split == "offload" for b in logs[back:])
    assert logs[-1].rate_MBps == pytest.approx(server.rate, rel=0.35)


def test_one_slow_answer_among_three_does_not_move_the_rate():
    from dsc_export.serving.estimation import ServerEstimate

    est = ServerEstimate(10.0, alpha=0.5)
    for wire_ms in (100.0, 100.0, 1000.0, 100.0):  # 1 MB each: 10, 10, 1, 10 MB/s
        est.observe(1_000_000, round_trip_ms=wire_ms, queue_ms=0.0, server_ms=0.0, rtt_ms=0.0, tail_ms=0.0)
    assert est.rate.value == pytest.approx(10.0)  # the median of the last three: 1 is out
    slow = ServerEstimate(10.0, alpha=0.5)
    slow.observe(1_000_000, round_trip_ms=1000.0, queue_ms=0.0, server_ms=0.0, rtt_ms=0.0, tail_ms=0.0)
    assert slow.rate.provisional and slow.rate.value == pytest.approx(1.0)
    slow.observe(1_000_000, round_trip_ms=100.0, queue_ms=0.0, server_ms=0.0, rtt_ms=0.0, tail_ms=0.0)
    assert not slow.rate.provisional and slow.rate.value == pytest.approx(10.0)  # replaced, not averaged


def test_a_load_blind_client_reads_a_busy_server_as_a_slow_link(tiny):
    root, plan = tiny
    x = np.zeros((2, 3, 16, 16), np.float32)
    server = FakeServer(root, rate_MBps=x.nbytes / 0.02 / 1e6)
    server.queue_ms = 100.0
    logs = []
    with _client(root, plan, server, log=logs.append, initial_rate_MBps=server.rate, static="offload",
                 load_aware=False) as client:
        for _ in range(3):
            client.infer(x)
    assert all(b.measured_rate_MBps < 0.3 * server.rate for b in logs)  # the wait taken for wire time
    assert all(b.q_ms == 0.0 and b.s == 1.0 for b in logs)


# --- the real server -----------------------------------------------------------------------------


def test_server_reports_wait_and_compute_apart(tiny):
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    import tritonclient.http as th
    from tritonclient.utils import np_to_triton_dtype

    from dsc_export.serving.server import ServeOptions, TailServer, free_ports
    from dsc_export.serving.transport import connect

    root, _ = tiny
    man = read_manifest(root)
    split = next(s for s in man.splits if s.kind == "offload")
    http, grpc, metrics = free_ports(3)
    srv = TailServer(root, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                        threads=1, instances=4, load_window_s=60,
                                        max_queue_delay_us=100,
                                        log_file=root.parent / "triton-load.log"))
    with srv:
        runner = srv._sessions[split.id]
        real = runner.run

        def slow(feeds, outputs=None):  # a tail that takes 40 ms: requests must wait for each other
            time.sleep(0.04)
            return real(feeds, outputs)

        runner.run = slow
        x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
        answers, lock = [], threading.Lock()

        def device(k):
            c = th.InferenceServerClient(srv.urls()["http"])
            inp = th.InferInput("input", list(x.shape), np_to_triton_dtype(x.dtype))
            inp.set_data_from_numpy(x, binary_data=True)
            outs = [th.InferRequestedOutput(n, binary_data=True) for n in ("logits", SERVER_MS, QUEUE_MS)]
            for _ in range(5):
                t = time.perf_counter()
                r = c.infer(split.id, [inp], outputs=outs)
                rt = (time.perf_counter() - t) * 1e3
                with lock:
                    answers.append((rt, float(r.as_numpy(QUEUE_MS)[0, 0]), float(r.as_numpy(SERVER_MS)[0, 0])))
            c.close()

        threads = [threading.Thread(target=device, args=(k,)) for k in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_ms = (time.perf_counter() - t0) * 1e3
        remote = connect(srv.urls()["http"], "http", 5.0)
        load = remote.load()
        remote.close()
    assert len(answers) == 20
    for rt, q, c in answers:
        assert c >= 40.0  # the compute is the tail's run, the 40 ms in it
        assert q >= 0 and q + c <= rt + 0.5  # both happen inside the round trip
    assert max(q for _, q, _ in answers) >= 30.0  # four devices, one batch at a time: someone waited
    batches = srv.stats.requests[split.id]
    assert batches < 20  # requests that waited together ran as one batch
    assert srv.stats.compute_ms[split.id] <= wall_ms  # one batch at a time: computes do not overlap
    assert load.requests == 20 and load.queue_depth == 0
    assert load.q_ms == pytest.approx(np.mean([q for _, q, _ in answers]), rel=1e-3, abs=0.01)
    assert 0 < load.utilization <= 1


def test_a_server_with_its_profile_reports_the_slowdown(tiny, tmp_path):
    """serve --profile: each request's s is its compute over the profiled tail time, and the load
    answer's s is their mean (NaN without a profile: clients fall back on their own estimate)."""
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    from dsc_export.errors import UserError
    from dsc_export.serving.server import ServeOptions, TailServer, free_ports
    from dsc_export.serving.transport import connect

    root, _ = tiny
    man = read_manifest(root)
    split = next(s for s in man.splits if s.kind == "offload")
    profiled_ms = 0.05  # per batch of 1: any real run is slower, so s > 1
    prof = Profile("server", "onnxruntime", {}, None, man.model.sha256,
                   [Timing(split=s.id, part="tail", batch=b, median_ms=profiled_ms * b, p10_ms=0, p90_ms=0, runs=3)
                    for s in man.splits if s.tail for b in (1, 2)])
    with pytest.raises(UserError, match="another model"):
        TailServer(root, profile=Profile("server", "onnxruntime", {}, None, "0" * 64, prof.timings))
    http, grpc, metrics = free_ports(3)
    opts = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                        load_window_s=60,
                        log_file=tmp_path / "triton.log")
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    with TailServer(root, opts, profile=prof) as srv:
        remote = connect(srv.urls()["http"], "http", 5.0)
        try:
            ms = [float(remote.infer(split.id, x, ["logits"])[SERVER_MS].ravel()[0]) for _ in range(4)]
            load = remote.load()
        finally:
            remote.close()
    assert load.requests == 4  # the warm-up is not counted
    assert load.s == pytest.approx(sum(m / profiled_ms for m in ms) / 4, rel=0.02)


def test_the_load_answer_measures_the_hand_over_inside_the_round_trip(tiny):
    """The hand-over the server reports (Triton's own time on a request minus its handler's) is
    part of what is left of each round trip after queue_ms and server_ms, and more than nothing."""
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    from dsc_export.serving.server import ServeOptions, TailServer, free_ports
    from dsc_export.serving.transport import connect

    root, _ = tiny
    split = next(s for s in read_manifest(root).splits if s.kind == "offload")
    http, grpc, metrics = free_ports(3)
    srv = TailServer(root, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                                        load_window_s=60, log_file=root.parent / "triton-handover.log"))
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    with srv:
        remote = connect(srv.urls()["http"], "http", 10.0)
        rest = []
        for _ in range(8):
            t = time.perf_counter()
            r = remote.infer(split.id, x, ["logits"])
            rt = (time.perf_counter() - t) * 1e3
            rest.append(rt - float(r[SERVER_MS].ravel()[0]) - float(r[QUEUE_MS].ravel()[0]))
        time.sleep(0.3)  # the server reads Triton's statistics at most every 0.25 s
        load = remote.load()
        remote.close()
    assert load.requests == 8
    h = load.handover_ms + load.handover_ms_per_MB * x.nbytes / 1e6
    assert h > 0  # Triton's hand-over to the handler and back takes time
    assert h <= float(np.median(rest)) + 0.5  # and it lies inside the round trip's remainder
