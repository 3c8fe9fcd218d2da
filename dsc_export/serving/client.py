"""The device side of dynamic split computing: estimate the rate, choose the split, run the head,
send the cut tensor, get the result — and finish locally when the server does not answer.

Per batch (paper Section 3, with the run-time details the paper leaves open):

1. the client keeps a :class:`ServerEstimate` of the server it talks to: the data rate of the
   link, from this client's own recent transfers (bytes sent over the time on the wire: the
   request's round trip minus the server's reported wait ``queue_ms``, its compute ``server_ms``
   and the plan's per-request overhead ``rtt``), and the server's expected wait q and slowdown s
   (from the same answers, and from the load query when it has sent nothing for a while), each
   smoothed with an exponential moving average. A busy server so never reads as a slow link;
2. the plan gives the split for (batch size, rate, q, s) — :func:`~dsc_export.planning.eq4_ms` on the profiled
   times, not the nearest grid cell — keeping the split in use unless another wins by the plan's
   margin;
3. the head runs here; the cut tensor goes to the server with ``tritonclient`` as binary tensor
   data (HTTP or gRPC); the server's tail returns the outputs.

Before the first batch the client waits (``ready_timeout_s``) until the server has every model of
the split dir ready, and refuses one that does not get ready or serves another model: it never
runs locally because the server was still loading. The server's outputs are taken back into the
model's form by the output contract (:mod:`dsc_export.serving.protocol`: batch moved back to
its axis, constant outputs from the client's own copy of the model).

With several servers (all serving the same model: the sha256 is checked per URL), the client
keeps one :class:`ServerEstimate` per server and chooses split and server together: per server
that is up, the plan's best split for that server's (rate, q, s); the pair with the lowest
predicted time wins (:func:`best_server`), the server in use kept unless another is faster by
the plan's margin.

Once running, if a server is unreachable, slower than the deadline or answers with an error, it
is marked down until its back-off ends (``backoff_s`` = 1 s, doubling per failure in a row up to
``max_backoff_s`` = 30 s, reset by an answer) and the batch is retried on the next best server
that is up, or finished here with the whole model: no batch is ever lost. In privacy mode the
raw input never leaves the device (``offload`` is never chosen). While ``local`` is chosen nothing is sent and the rate
estimate would go stale. Probing is paid for from a budget: every batch without a measurement
adds ``probe_budget`` (default 5 %) of its predicted time, and when the budget covers the extra
predicted cost of the cheapest split that sends enough bytes to measure the link, that batch
goes there. Probing thus costs at most about 5 % over staying local, cheap probes come often
and expensive ones (a slow link) rarely; none go to a server whose load alone keeps the batch
here (not even a perfect link would win); at least ``probe_every`` batches lie between probes. Transfers under 64 KB are not
used for the estimate: they are bound by latency and TCP's slow start, and read low.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.artifacts import read_manifest, verify_files
from dsc_export.codecs import payload_bytes
from dsc_export.errors import UserError, first_line, lazy_import
from dsc_export.offload import Encoder, layout_of
from dsc_export.planning import Plan, read_plan
from dsc_export.serving import protocol as proto  # "protocol" is the http/grpc parameter


@dataclass
class BatchLog:
    """What happened to one batch."""

    index: int
    batch: int
    split: str  # what ran (``local`` after a fallback)
    planned: str  # what the plan chose
    bytes: int  # sent over the wire
    rate_MBps: float | None  # the estimate the choice was made with
    measured_rate_MBps: float | None  # this transfer's bytes / time on the wire
    predicted_ms: float
    measured_ms: float
    head_ms: float
    wire_ms: float  # round trip - queue_ms - server_ms (the plan's rtt included)
    server_ms: float  # the tail's run at the server (on the batch this request joined)
    fallback: str | None = None  # why a server failed this batch (retried on the next server, or run here)
    queue_ms: float = 0.0  # this request's wait at the server
    q_ms: float = 0.0  # the server's expected wait the choice was made with
    s: float = 1.0  # the server's slowdown the choice was made with
    server: str | None = None  # the URL that answered (None: run here)
    tries: int = 0  # servers that failed this batch before it was answered or run here


class RateEstimator:
    """Exponentially smoothed data rate from (bytes, seconds on the wire) observations."""

    def __init__(self, initial_MBps: float, alpha: float = 0.5, min_bytes: int = 65536):
        self.value, self.alpha, self.min_bytes = float(initial_MBps), alpha, min_bytes
        self.observations = 0

    def observe(self, nbytes: int, seconds: float, stale: bool = False) -> float | None:
        """Add one transfer; tiny ones (latency-bound) are not counted. Returns its rate.

        ``stale``: the estimate is old (no measurement for a while): the new one replaces it.
        """
        if nbytes < self.min_bytes or seconds <= 0:
            return None
        rate = nbytes / seconds / 1e6
        fresh = self.observations == 0 or stale
        self.value = rate if fresh else self.alpha * rate + (1 - self.alpha) * self.value
        self.observations += 1
        return rate


class ServerEstimate:
    """What a client knows of one server: the link's data rate, the server's expected wait q and
    its slowdown s against its profile (the state :func:`~dsc_export.planning.eq4_ms` needs), each exponentially smoothed.

    One object per server, so a client of several servers keeps one per URL.

    Args:
        initial_MBps: the rate assumed before the first transfer, MB/s.
        alpha: weight of a new observation (0-1).
        min_bytes: transfers smaller than this say nothing of the rate (latency-bound).
    """

    def __init__(self, initial_MBps: float, *, alpha: float = 0.5, min_bytes: int = 65536):
        self.rate = RateEstimator(initial_MBps, alpha, min_bytes)
        self.alpha = alpha
        self.q_ms, self.s = 0.0, 1.0
        self.heard = -math.inf  # time.monotonic() of the last news of the server

    def observe(self, nbytes: int, *, round_trip_ms: float, queue_ms: float, server_ms: float, rtt_ms: float,
                tail_ms: float, stale: bool = False) -> float | None:
        """Take one answered request in. Returns the rate it measured (MB/s), or None.

        Args:
            nbytes: bytes sent.
            round_trip_ms: from sending the request to having the answer (ms).
            queue_ms, server_ms: the server's wait and compute for it (ms, as it reported).
            rtt_ms: the plan's per-request overhead (ms), not time on the wire.
            tail_ms: the profiled T_tail for this request's own batch size (ms; 0 leaves s as is).
            stale: the estimate is old: the new rate replaces it.
        """
        wire_ms = round_trip_ms - queue_ms - server_ms - rtt_ms
        measured = self.rate.observe(nbytes, wire_ms / 1e3, stale=stale)
        slow = max(1.0, server_ms / tail_ms) if tail_ms > 0 else None
        self._server(queue_ms, slow)
        return measured

    def observe_load(self, load: proto.ServerLoad) -> None:
        """Take a load query's answer in: its recent wait and slowdown (an idle server: 0 and 1)."""
        if load.requests == 0:
            self._server(0.0, 1.0)
        else:
            self._server(load.q_ms, max(1.0, load.s) if load.s == load.s else None)

    def _server(self, q_ms: float, s: float | None) -> None:
        a = self.alpha
        self.q_ms = a * max(0.0, q_ms) + (1 - a) * self.q_ms
        if s is not None:
            self.s = a * s + (1 - a) * self.s
        self.heard = time.monotonic()


class _Remote:
    """tritonclient over HTTP or gRPC with a deadline."""

    def __init__(self, url: str, protocol: str, timeout_s: float):
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.has_server_ms = True  # dsc-export serve reports it; a stock Triton does not
        self.models: list[str] = []  # the tails it serves (set by wait_ready)
        self._stats = None  # a stock Triton's last statistics read: (time.monotonic(), {model: ModelStats})
        self.per_model: dict[str, tuple[float, float]] = {}  # stock Triton: model -> (queue ms, compute ms)
        if protocol == "http":
            self.mod = lazy_import("tritonclient.http", "serve")
            self.client = self.mod.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            self.mod = lazy_import("tritonclient.grpc", "serve")
            self.client = self.mod.InferenceServerClient(url)
        else:
            raise UserError(f"--protocol must be http or grpc, not '{protocol}'")

    def infer(self, model: str, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """Send ``x`` (the cut tensor, batch first) to ``model`` and return the named outputs.

        Raises:
            tritonclient's InferenceServerException or a socket error: the caller's retry
            and back-off handle them.
        """
        from tritonclient.utils import np_to_triton_dtype

        inp = self.mod.InferInput(proto.INPUT, list(x.shape), np_to_triton_dtype(x.dtype))
        names = outputs + ([proto.SERVER_MS, proto.QUEUE_MS] if self.has_server_ms else [])
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            req = [self.mod.InferRequestedOutput(o, binary_data=True) for o in names]
            res = self.client.infer(model, [inp], outputs=req, timeout=int(self.timeout_s * 1e6))
        else:
            inp.set_data_from_numpy(x)
            req = [self.mod.InferRequestedOutput(o) for o in names]
            res = self.client.infer(model, [inp], outputs=req, client_timeout=self.timeout_s)
        out = {o: res.as_numpy(o) for o in names}
        if not self.has_server_ms:  # a stock Triton: its statistics' recent means for this model (0 before any)
            q_ms, compute_ms = self.per_model.get(model, (0.0, 0.0))
            out[proto.SERVER_MS] = np.full((x.shape[0], 1), compute_ms, np.float32)
            out[proto.QUEUE_MS] = np.full((x.shape[0], 1), q_ms, np.float32)
        return out

    def load(self) -> proto.ServerLoad | None:
        """The server's load: its load query (:data:`proto.LOAD`) on ``dsc-export serve``; on a stock
        Triton, estimated from its statistics since the previous call
        (:func:`~dsc_export.serving.tritonserver.stats_load`; None on the first call, which only
        reads them)."""
        if not self.has_server_ms:
            return self._stats_load()
        ping = self.mod.InferInput(proto.PING, [1], "INT32")
        ping.set_data_from_numpy(np.zeros((1,), np.int32))
        if self.protocol == "http":
            res = self.client.infer(proto.LOAD, [ping], timeout=int(self.timeout_s * 1e6))
        else:
            res = self.client.infer(proto.LOAD, [ping], client_timeout=self.timeout_s)
        return proto.ServerLoad.from_array(res.as_numpy(proto.LOAD_OUTPUT))

    def _stats_load(self) -> proto.ServerLoad | None:
        from dsc_export.serving.tritonserver import model_stats, stats_load

        now = time.monotonic()
        stats = {m: model_stats(self.client, m) for m in self.models}
        before, self._stats = self._stats, (now, stats)
        if before is None:
            return None
        load, per_model = stats_load(before[1], stats, now - before[0])
        self.per_model.update(per_model)
        return load

    def wait_ready(self, models: list[str], timeout_s: float, on_wait: Callable[[list[str]], None]) -> None:
        """Wait until the server answers and ``models`` are ready, then for its ``dsc_meta`` too
        unless it is a stock Triton serving a bundle's repository (whose configs carry the model's
        sha256): a ``dsc-export serve`` still loading is never taken for another server.

        Raises:
            UserError: not reachable, or a model not ready, within ``timeout_s``.
        """
        t0 = time.monotonic()
        self.models = list(models)
        proto.wait_ready(self.client, models, timeout_s, self.url, on_wait)
        try:
            if self.client.is_model_ready(proto.META) or self._config(models[0]).get("parameters", {}).get("dsc_model_sha256"):
                return
        except Exception:
            pass
        proto.wait_ready(self.client, [proto.META], max(0.0, timeout_s - (time.monotonic() - t0)), self.url, on_wait)

    def _config(self, model: str) -> dict:
        if self.protocol == "http":
            return self.client.get_model_config(model)
        return self.client.get_model_config(model, as_json=True)["config"]

    def model_sha256(self, any_model: str) -> str:
        """The served model's sha256: from ``dsc_meta`` (dsc-export serve) or, on a stock Triton
        serving a bundle's repository, from the ``dsc_model_sha256`` parameter of a model's config."""
        ping = self.mod.InferInput("ping", [1, 1], "INT32")
        ping.set_data_from_numpy(np.zeros((1, 1), np.int32))
        try:
            if self.protocol == "http":
                res = self.client.infer(proto.META, [ping], timeout=int(self.timeout_s * 1e6))
            else:
                res = self.client.infer(proto.META, [ping], client_timeout=self.timeout_s)
        except Exception as exc:
            if "unknown model" not in str(exc).lower() and "not found" not in str(exc).lower():
                raise
            self.has_server_ms = False
            return self._config(any_model).get("parameters", {}).get("dsc_model_sha256", {}).get("string_value", "")
        v = res.as_numpy("model_sha256").ravel()[0]
        return v.decode() if isinstance(v, bytes) else str(v)

    def close(self) -> None:
        """Close the connection (errors on close are ignored: the server may be gone)."""
        try:
            self.client.close()
        except Exception:
            pass


@dataclass
class Endpoint:
    """One server as the client sees it: how to reach it, what it knows of it, and its back-off.

    Attributes:
        url: ``host:port``.
        remote: the connection (:class:`_Remote`, or anything with ``infer``, ``load``, ``close``
            and ``has_server_ms``).
        estimate: the server's (rate, q, s).
        down_until: ``time.monotonic()`` before which it is not sent anything (its back-off).
        backoff_s: the back-off its next failure gets, seconds.
        asked: ``time.monotonic()`` of the last load query / statistics read.
    """

    url: str
    remote: Any
    estimate: ServerEstimate
    down_until: float = 0.0
    backoff_s: float = 1.0
    asked: float = -math.inf

    def up(self, now: float) -> bool:
        """True when the server's back-off has ended at ``now`` (``time.monotonic()`` seconds)."""
        return now >= self.down_until


def server_urls(server_url: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The server URLs from one URL, a comma-separated list, or a sequence of either (pure).

    Raises:
        UserError: the same URL twice.
    """
    if not server_url:
        return []
    items = [server_url] if isinstance(server_url, str) else list(server_url)
    urls = [u.strip() for item in items for u in item.split(",") if u.strip()]
    seen = {u for u in urls if urls.count(u) > 1}
    if seen:
        raise UserError(f"server {sorted(seen)[0]} is given twice")
    return urls


def best_server(plan: Plan, batch: int, states: list[tuple[float, float, float] | None], *,
                current: tuple[int | None, str] | None = None,
                exclude: set[str] | frozenset[str] = frozenset()) -> tuple[int | None, str, float]:
    """Choose split and server together (pure): per server that is up, the plan's best split for
    its (rate, q, s) (:meth:`Plan.choose`, through :func:`~dsc_export.planning.eq4_ms`); the pair
    with the lowest predicted time wins. The split in use on the server in use (``current``) is
    kept unless another pair is faster by more than the plan's margin.

    Args:
        batch: samples in the batch.
        states: per server, (rate MB/s, q ms, s), or None for a server that is down.
        current: (server index or None for local, split) in use.
        exclude: candidates not to consider (privacy: ``offload``).

    Returns:
        (server index, or None to run here; split; predicted ms).

    Raises:
        UserError: as :meth:`Plan.choose`.
    """
    local_t = plan.choose(batch, 1.0, exclude=set(plan.candidates) - {"local"})[1]
    options: list[tuple[int | None, str, float]] = []
    for i, st in enumerate(states):
        if st is None:
            continue
        rate, q, sl = st
        cur = current[1] if current and current[0] == i else None
        split, t = plan.choose(batch, rate, cur, exclude=set(exclude) | {"local"}, q_ms=q, s=sl)
        if not math.isinf(t):
            options.append((i, split, t))
    if not options or "local" not in exclude:  # nothing up (or every candidate excluded): here
        options.insert(0, (None, "local", local_t))
    best = min(options, key=lambda o: o[2])
    if options[0][0] is None and local_t <= best[2] * (1.0 + plan.margin) + 1e-12:
        best = options[0]  # ties (within the margin) to the device, as Plan.choose
    if current is not None:
        for o in options:
            if (o[0], o[1]) == tuple(current) and o[2] <= best[2] * (1.0 + plan.margin):
                return o
    return best


class DynamicSplitClient:
    """Runs batches with dynamic split computing against one or more tails servers.

    Args:
        split_dir: the split dir (or an unpacked device bundle) with the heads and the whole model.
        plan: the plan (default: ``split_dir/plan.json``).
        server_url: ``host:port`` of the server (HTTP port for ``http``, gRPC port for ``grpc``);
            several servers as a list or comma-separated (every one must serve this model). Each
            batch goes to the server (and split) with the lowest predicted time (:func:`best_server`).
        protocol: ``http`` or ``grpc``.
        privacy: never send the raw input.
        threads: CPU threads for the heads and the whole model here.
        deadline_s: a request slower than this is abandoned and the batch retried on the next
            server or finished locally.
        initial_rate_MBps: the rate assumed before the first transfer [default: the middle of
            the plan's rate range on a log scale].
        backoff_s, max_backoff_s: a failed server is retried after ``backoff_s`` seconds (1 s),
            doubling with each failure in a row up to ``max_backoff_s`` (30 s); an answer resets it.
        probe_every: the fewest batches between two probes of the link.
        probe_budget: the share of each unmeasured batch's predicted time that may be spent on
            probing (see the module docstring).
        log: called with each :class:`BatchLog`.
        load_aware: use the servers' reported wait and slowdown (q, s) in the choice and keep them
            out of the rate estimate; False is the load-blind client (the round trip less the
            compute counts as time on the wire, q = 0, s = 1), a baseline for comparisons.
        load_probe_s: ask a server's load when nothing was heard of it for this long (a stock
            Triton: read its statistics this often).
        static: always use this split (a static baseline for comparisons); the local fallback
            still applies.
        device_slowdown: make the heads and the whole model take K times as long here — the
            run-time side of a device profile taken with ``bench --slowdown K`` (labelled
            emulation, for what-if runs on a machine faster than the device).
        ready_timeout_s: wait this long for each server and every model it must serve to be
            ready (Triton's model-ready API) before the first batch (0: check once).
        say: one-line messages (waiting for the server).

    Raises:
        UserError: no plan or another model's plan, an output no server can answer, the same URL
            twice, or a server that is not ready within ``ready_timeout_s`` or serves another model
            (the message names its URL).
    """

    def __init__(self, split_dir: str | os.PathLike, server_url: str | list[str] | None, plan: Plan | None = None, *,
                 protocol: str = "http", privacy: bool = False, threads: int | None = 1, deadline_s: float = 5.0,
                 initial_rate_MBps: float | None = None, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 probe_every: int = 3, alpha: float = 0.5, probe_budget: float = 0.05, log: Callable[[BatchLog], None] = lambda b: None,
                 static: str | None = None, device_slowdown: float = 1.0, ready_timeout_s: float = 60.0,
                 say: Callable[[str], None] = lambda s: None, load_aware: bool = True, load_probe_s: float = 1.0):
        from dsc_export.engines import PartRunner

        self.root = Path(split_dir)
        self.manifest = read_manifest(self.root)
        if plan is None:
            path = self.root / "plan.json"
            if not path.is_file():
                raise UserError(f"no plan in '{self.root}'; make one with dsc-export plan or pass --plan")
            plan = read_plan(path)
        if plan.model_sha256 != self.manifest.model.sha256:
            raise UserError("the plan was made for another model than this split dir's (model sha256 differs)")
        self.plan = plan
        self.privacy = privacy or plan.privacy
        if static is not None and static not in plan.candidates:
            raise UserError(f"unknown split '{static}'; the plan's candidates: {', '.join(plan.candidates)}")
        offloads = {s.id for s in self.manifest.splits if s.kind == "offload"}  # an encoded image is the input
        if static in offloads and self.privacy:
            raise UserError(f"privacy mode never sends the raw input: {static} cannot be the static split")
        self.static = static
        urls = server_urls(server_url)
        heads = [s for s in self.manifest.splits if s.head]
        verify_files(self.manifest, self.root, sorted({s.head for s in heads}))
        self._heads = {s.id: PartRunner(self.root, self.manifest, s.id, "head", threads=threads)
                       for s in heads if s.kind == "split"}
        self._whole = PartRunner(self.root, self.manifest, "local", "head", threads=threads)
        self._encoders = {s.id: Encoder(s.wire, layout_of(self.manifest), self.manifest.model.input.name)
                          for s in self.manifest.splits if s.encodes}
        self.contract = proto.served_outputs(self.root, self.manifest)
        self._sent = [c.wire_name for c in self.contract if c.kind != "constant"]
        self._constants: dict[str, np.ndarray] | None = None
        self.fixed_batch = proto.fixed_batch(self.manifest)
        self.say = say
        self._in = self.manifest.model.input.name
        lo, hi = min(plan.rates_MBps), max(plan.rates_MBps)
        self.initial_rate_MBps, self.alpha = initial_rate_MBps or math.sqrt(lo * hi), alpha
        self.load_aware, self.load_probe_s = load_aware, load_probe_s
        self.deadline_s, self.backoff_s, self.max_backoff_s = deadline_s, backoff_s, max_backoff_s
        self.probe_every, self.log = probe_every, log
        self.probe_budget, self._budget = probe_budget, 0.0
        if device_slowdown < 1:
            raise UserError("device_slowdown must be at least 1")
        self.device_slowdown = device_slowdown
        if device_slowdown > 1:
            for r in [*self._heads.values(), self._whole, *self._encoders.values()]:
                _slow_down(r, device_slowdown)
        self._current: tuple[int | None, str] | None = None
        self._local_streak = 0
        self._count = 0
        self.endpoints: list[Endpoint] = []
        self._spare = ServerEstimate(self.initial_rate_MBps, alpha=alpha)  # what `rate` shows with no server
        try:
            for url in urls:
                self.endpoints.append(self._endpoint(url, _Remote(url, protocol, deadline_s)))
                self._check_server(self.endpoints[-1], ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _endpoint(self, url: str, remote) -> Endpoint:
        return Endpoint(url, remote, ServerEstimate(self.initial_rate_MBps, alpha=self.alpha), backoff_s=self.backoff_s)

    # one server: the attributes a single-server client has always had
    @property
    def remote(self):
        """The first server's connection (None without a server)."""
        return self.endpoints[0].remote if self.endpoints else None

    @remote.setter
    def remote(self, remote) -> None:
        """Talk to this one server (a connection or a stand-in) instead."""
        self.endpoints = [self._endpoint(getattr(remote, "url", "remote"), remote)] if remote is not None else []

    @property
    def server(self) -> ServerEstimate:
        """The first server's estimate."""
        return self.endpoints[0].estimate if self.endpoints else self._spare

    @property
    def rate(self) -> RateEstimator:
        """The first server's rate estimate."""
        return self.server.rate

    def _check_server(self, ep: Endpoint, timeout_s: float) -> None:
        """Wait for the server's models, then refuse one that serves another model."""
        models = [s.id for s in self.manifest.splits if s.tail]
        ep.remote.wait_ready(models, timeout_s, lambda pending: self.say(
            f"waiting up to {timeout_s:g} s for the server at {ep.url} to make "
            f"{', '.join(pending)} ready"))
        try:
            sha = ep.remote.model_sha256(models[0])
        except Exception as exc:
            raise UserError(f"the server at {ep.url} is ready but does not say which model it serves "
                            f"({_reason(exc)})") from exc
        if sha != self.manifest.model.sha256:
            raise UserError(f"the server at {ep.url} serves another model (sha256 {sha[:12]}…, "
                            f"here {self.manifest.model.sha256[:12]}…); deploy the server bundle of this split dir")

    def _mark_down(self, ep: Endpoint) -> None:
        ep.down_until = time.monotonic() + ep.backoff_s
        ep.backoff_s = min(ep.backoff_s * 2, self.max_backoff_s)

    def close(self) -> None:
        """Close every server connection and deactivate the head runners."""
        for ep in self.endpoints:
            ep.remote.close()
        for r in [*self._heads.values(), self._whole]:
            r.close()

    def warm_up(self, batch: int) -> None:
        """Load and run every head and the whole model once at ``batch`` (first runs are slow)."""
        from dsc_export.ort import random_array

        x = random_array([batch] + list(self.manifest.model.input.shape[1:]),
                         np.dtype(self.manifest.model.input.dtype), np.random.default_rng(0))
        for r in [*self._heads.values(), self._whole, *self._encoders.values()]:
            r.run({self._in: x})

    def __enter__(self) -> DynamicSplitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def server_state(self, ep: Endpoint | None = None) -> tuple[float, float]:
        """(q in ms, s): a server's (default: the first's) expected wait and slowdown the choice
        uses (0 and 1 when load-blind)."""
        est = ep.estimate if ep is not None else self.server
        return (est.q_ms, est.s) if self.load_aware else (0.0, 1.0)

    def refresh_load(self) -> None:
        """Ask the load of each server that is up and not heard of for ``load_probe_s`` (a stock
        Triton: read its statistics every ``load_probe_s``); load-aware clients only. A failed
        query changes nothing: the next request tells."""
        if not self.load_aware:
            return
        now = time.monotonic()
        for ep in self.endpoints:
            last = ep.asked if not getattr(ep.remote, "has_server_ms", True) else ep.estimate.heard
            if not ep.up(now) or now - last < self.load_probe_s:
                continue
            ep.asked = now
            try:
                load = ep.remote.load()
            except Exception:
                continue
            if load is not None:
                ep.estimate.observe_load(load)

    def _states(self, skip: set[int], rate: float | None = None) -> list[tuple[float, float, float] | None]:
        """Per server: (rate, q, s) for the choice, None for one down or in ``skip``."""
        now = time.monotonic()
        return [None if i in skip or not ep.up(now) else (rate or ep.estimate.rate.value, *self.server_state(ep))
                for i, ep in enumerate(self.endpoints)]

    def choose(self, batch: int, skip: set[int] = frozenset()) -> tuple[int | None, str, float]:
        """Server and split for a batch of this size now (:func:`best_server`): (server index or
        None for here, split, predicted ms). ``skip``: servers that failed this batch."""
        exclude = {s.id for s in self.manifest.splits if s.kind == "offload"} if self.privacy else set()
        if self.static is not None:
            exclude = set(self.plan.candidates) - {self.static}
        states = self._states(skip)
        i, split, t = best_server(self.plan, batch, states, current=self._current, exclude=exclude)
        if self.static is None and self._local_streak >= self.probe_every and self._link_matters(batch, exclude, skip):
            probe = self._probe(batch, exclude, states)
            if probe and probe[1] != split and self._budget >= probe[2] - t:
                self._budget = 0.0
                i, split, t = probe
        return i, split, t

    def _link_matters(self, batch: int, exclude: set[str], skip: set[int]) -> bool:
        """Whether a better rate estimate could move the choice: False while the servers' wait
        and slowdown keep the batch here even over a perfect link (the load query, not a probe
        of the link, says when that ends)."""
        return best_server(self.plan, batch, self._states(skip, rate=1e9), exclude=exclude)[0] is not None

    def _probe(self, batch: int, exclude: set[str], states) -> tuple[int, str, float] | None:
        """The cheapest (by the plan, at the current estimates) server and candidate that sends
        enough bytes to measure the link; small transfers are latency-bound and would read low."""
        best = None
        for i, st in enumerate(states):
            if st is None:
                continue
            est = self.endpoints[i].estimate.rate
            senders = {s.id for s in self.manifest.splits
                       if s.kind != "local" and s.bytes * batch >= est.min_bytes} - exclude
            if senders:
                split, t = self.plan.choose(batch, st[0], None, exclude=set(self.plan.candidates) - senders,
                                            q_ms=st[1], s=st[2])
                if best is None or t < best[2]:
                    best = (i, split, t)
        return best

    def _constant_values(self) -> dict[str, np.ndarray]:
        """The constant outputs (served by no server), computed once with the whole model here."""
        if self._constants is None:
            from dsc_export.ort import random_array

            consts = [c for c in self.contract if c.kind == "constant"]
            x = random_array([1] + list(self.manifest.model.input.shape[1:]),
                             np.dtype(self.manifest.model.input.dtype), np.random.default_rng(0))
            values = self._whole.onnx_session().run([c.name for c in consts], {self._in: x}) if consts else []
            self._constants = {c.wire_name: v for c, v in zip(consts, values)}
        return self._constants

    def _from_server(self, res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs from a server's answer: batch moved back where the model has it,
        constants added."""
        out = {}
        for c in self.contract:  # keyed by the model's own output names, as the local path
            if c.kind == "constant":
                out[c.name] = self._constant_values()[c.wire_name]
            elif c.kind == "batched" and c.batch_axis:
                out[c.name] = np.moveaxis(res[c.wire_name], 0, c.batch_axis)
            else:
                out[c.name] = res[c.wire_name]
        return out

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (the model's input, batch first) and return the model's outputs by name.

        Raises:
            UserError: a batch size other than the model's fixed batch size.
        """
        batch = int(x.shape[0])
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise UserError(f"the model runs at batch size {self.fixed_batch} only; this batch has {batch}")
        self.refresh_load()
        i, split, predicted = self.choose(batch)
        planned, first = split, self.endpoints[i] if i is not None else (self.endpoints[0] if self.endpoints else None)
        est = (first.estimate if first else self.server).rate.value
        q_est, s_est = self.server_state(first)
        t0 = time.perf_counter()
        head_ms = wire_ms = server_ms = queue_ms = 0.0
        sent, measured_rate, reasons, ran, url = 0, None, [], "local", None
        cut: dict[str, np.ndarray] = {}  # the heads run for this batch (a retry may reuse one)
        failed: set[int] = set()
        out = None
        while i is not None:
            ep, s = self.endpoints[i], self.manifest.split(split)
            t1 = time.perf_counter()
            if split not in cut:
                if s.kind == "offload":  # the raw pixels, or encoded by the form's codec
                    cut[split] = self._encoders[split].run({self._in: x})[0] if s.encodes else x
                else:
                    cut[split] = self._heads[split].run({self._in: x}, [s.wire_tensor])[0]
            z = cut[split]
            head_ms += (time.perf_counter() - t1) * 1e3
            try:
                t1 = time.perf_counter()
                res = ep.remote.infer(split, z, self._sent)
                round_trip_ms = (time.perf_counter() - t1) * 1e3
                server_ms = float(res.pop(proto.SERVER_MS).ravel()[0])
                queue_ms = float(res.pop(proto.QUEUE_MS).ravel()[0])
                sent = payload_bytes(z)  # a codec's: the encoded images' bytes
                if not self.load_aware:  # today's client: the wait counts as time on the wire
                    queue_ms = 0.0
                wire_ms = max(round_trip_ms - queue_ms - server_ms, 1e-3)
                # the plan's rtt is the per-request overhead (an extra term of eq4_ms): not bytes on the wire
                measured_rate = ep.estimate.observe(
                    sent, round_trip_ms=round_trip_ms, queue_ms=queue_ms, server_ms=server_ms,
                    rtt_ms=self.plan.rtt_ms, tail_ms=self.plan.parts_ms(split, batch)[1],
                    stale=self._local_streak >= 2 * self.probe_every)
                out = self._from_server(res)
                ep.backoff_s = self.backoff_s
                ran, url = split, ep.url
                self._current = (i, split)
                break
            except Exception as exc:  # unreachable, deadline, 5xx, protocol error: the next server, or here
                reasons.append(f"{ep.url}: {_reason(exc)}" if len(self.endpoints) > 1 else _reason(exc))
                self._mark_down(ep)
                failed.add(i)
                i, split, _ = self.choose(batch, skip=failed)
        if out is None:
            outs = self._whole.run({self._in: x})
            out = dict(zip([c.name for c in self.contract], outs))
            if not reasons:
                self._current = (None, "local")
        if measured_rate is not None:
            self._local_streak, self._budget = 0, 0.0
        else:  # a batch without news of the link: it earns a share of its time for a probe
            self._local_streak += 1
            self._budget += self.probe_budget * predicted
        measured = (time.perf_counter() - t0) * 1e3
        self.log(BatchLog(self._count, batch, ran, planned, sent, est, measured_rate, predicted, measured,
                          head_ms, wire_ms, server_ms, "; ".join(reasons) or None, queue_ms, q_est, s_est,
                          url, len(failed)))
        self._count += 1
        return out


def _slow_down(runner, factor: float) -> None:
    """Make a device-side runner take ``factor`` times as long (labelled emulation)."""
    real = runner.run

    def run(feeds, outputs=None):
        t = time.perf_counter()
        out = real(feeds, outputs)
        time.sleep((factor - 1) * (time.perf_counter() - t))
        return out

    runner.run = run


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)[:160]}"


def batch_log_dict(b: BatchLog) -> dict[str, Any]:
    """A batch's log record as a JSON-ready dict (``run --json`` prints one per batch)."""
    return asdict(b)
