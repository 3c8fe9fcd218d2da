"""Client pieces that need no server: the rate estimator and talking to a stock Triton."""

import numpy as np
import pytest

from dsc_export.serving.estimation import RateEstimator
from dsc_export.serving.transport import HttpTransport


def test_rate_estimator_smooths_and_ignores_latency_bound_transfers():
    r = RateEstimator(10.0, alpha=0.5, min_bytes=65536)
    assert r.observe(1000, 0.001) is None and r.value == 10.0  # too small to say anything
    assert r.observe(2_000_000, 0.1) == pytest.approx(20.0)
    assert r.value == pytest.approx(20.0)  # the first observation replaces the guess
    r.observe(1_000_000, 0.1)  # 10 MB/s
    assert r.value == pytest.approx(15.0)
    assert r.observe(1_000_000, 0.0) is None
    r.observe(4_000_000, 0.1, stale=True)  # after a long silence the new figure replaces the old
    assert r.value == pytest.approx(40.0)


class FakeMod:
    class InferInput:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

        def set_data_from_numpy(self, x, binary_data=True):
            self.x = x

    class InferRequestedOutput:
        def __init__(self, name, binary_data=True):
            self.name = name


class StockTriton:
    """A stock Triton serving a bundle's repository: no dsc_meta model, no server_ms output."""

    def __init__(self):
        self.asked = []

    def infer(self, model, inputs, outputs=None, timeout=None):
        if model == "dsc_meta":
            raise RuntimeError("[404] Request for unknown model: 'dsc_meta' is not found")
        self.asked.append([o.name for o in outputs])

        class R:
            def as_numpy(self, name):
                return np.ones((inputs[0].x.shape[0], 1000), np.float32)

        return R()

    def get_model_config(self, name):
        return {"name": name, "parameters": {"dsc_model_sha256": {"string_value": "ab" * 32}}}


def test_client_talks_to_a_stock_triton_repository():
    remote = HttpTransport.__new__(HttpTransport)
    remote.url, remote.timeout_s, remote.has_server_ms = "x:8000", 1.0, True
    remote.mod, remote.client, remote.per_model = FakeMod, StockTriton(), {}
    assert remote.model_sha256("offload") == "ab" * 32
    assert remote.has_server_ms is False
    out = remote.infer("cut033", np.zeros((2, 40, 28, 28), np.float32), ["logits"])
    assert remote.client.asked == [["logits"]]  # server_ms is not requested from a stock server
    assert out["logits"].shape == (2, 1000) and out["server_ms"].shape == (2, 1) and not out["server_ms"].any()
    assert not out["queue_ms"].any()  # nor queue_ms: no wait is known


def test_server_refuses_old_pytriton_with_numpy_2(monkeypatch):
    import importlib.metadata

    from dsc_export.errors import UserError
    from dsc_export.serving import server

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.7")
    monkeypatch.setattr(server.np, "__version__", "2.4.6")
    with pytest.raises(UserError, match="nvidia-pytriton 0.5.7 does not work with numpy 2.4.6"):
        server._check_versions()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.7.0")
    server._check_versions()  # the pair the serve extra installs


class LoadingServer:
    """A Triton that comes up: refused at first, then its models get ready one poll at a time.

    ``stock``: a stock Triton serving a bundle's repository (configs carry the model's sha256,
    no dsc_meta); otherwise a dsc-export serve whose dsc_meta is loaded last.
    """

    def __init__(self, models, stock=False, refused=2, never=()):
        self.polls, self.models, self.stock, self.refused, self.never = 0, list(models), stock, refused, set(never)
        self.order = self.models + ([] if stock else ["dsc_meta"])

    def is_server_live(self):
        self.polls += 1
        if self.polls <= self.refused:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        return True

    def is_model_ready(self, name):
        if name in self.never or name not in self.order:
            return False
        return self.order.index(name) < self.polls - self.refused

    def get_model_config(self, name):
        return {"name": name, "parameters": {"dsc_model_sha256": {"string_value": "ab" * 32}} if self.stock else {}}

    def get_model_repository_index(self):
        return [{"name": m, "state": "READY" if self.is_model_ready(m) else "LOADING"} for m in self.order]


def _remote(client):
    remote = HttpTransport.__new__(HttpTransport)
    remote.url, remote.timeout_s, remote.has_server_ms = "x:8000", 1.0, True
    remote.mod, remote.client = FakeMod, client
    return remote


def test_run_waits_for_every_model_and_for_dsc_meta():
    server = LoadingServer(["offload", "cut002", "cut004"])
    said = []
    _remote(server).wait_ready(["offload", "cut002", "cut004"], 10, said.append)
    assert all(server.is_model_ready(m) for m in server.order)  # dsc_meta too: loaded last
    assert said == [["offload", "cut002", "cut004"]]  # told once, with what it waits for


def test_a_stock_triton_is_not_waited_on_for_dsc_meta():
    server = LoadingServer(["offload"], stock=True, refused=0)
    _remote(server).wait_ready(["offload"], 10, lambda p: None)
    assert server.polls == 1  # ready at once; no wait for a dsc_meta it will never have (that would fail)


def test_wait_ready_refuses_with_what_is_missing():
    from dsc_export.errors import UserError
    from dsc_export.serving.protocol import wait_ready

    server = LoadingServer(["offload", "cut002"], never=["cut002"])
    with pytest.raises(UserError) as exc:
        wait_ready(server, ["offload", "cut002"], 0.3, "x:8000", poll_s=0.05)
    assert str(exc.value) == ("the server at x:8000 has not made cut002 ready within 0.3 s; it has cut002, dsc_meta, "
                              "offload; serve this split dir's server side there, or wait longer with --wait-ready")
    with pytest.raises(UserError, match=r"does not answer within 0.1 s \(\[Errno 111\] Connection refused\)"):
        wait_ready(LoadingServer(["offload"], refused=10**6), ["offload"], 0.1, "x:8000", poll_s=0.05)
