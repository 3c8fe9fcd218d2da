"""The device side of dynamic split computing: estimate the rate, choose the split, run the head,
send the cut tensor, get the result — and finish locally when the server does not answer.

This module is the orchestration; its parts live beside it:
:mod:`~dsc_export.serving.transport` (tritonclient over HTTP or gRPC),
:mod:`~dsc_export.serving.estimation` (what the client knows of a server) and
:mod:`~dsc_export.serving.policy` (which server and split a batch takes). Its settings are one
:class:`ClientOptions`.

Per batch (paper Section 3, with the run-time details the paper leaves open):

1. the client keeps a :class:`~dsc_export.serving.estimation.ServerEstimate` of the server it
   talks to: the data rate of the link, from this client's own recent transfers (bytes sent over
   the time on the wire: the request's round trip minus the server's reported wait
   ``queue_ms``, its compute ``server_ms`` and the plan's per-request overhead ``rtt``), and the
   server's expected wait q and slowdown s (from the same answers, and from the load query when
   it has sent nothing for a while), each smoothed with an exponential moving average. A busy
   server so never reads as a slow link;
2. the plan gives the split for (batch size, rate, q, s) —
   :func:`~dsc_export.planning.eq4_ms` on the profiled times, not the nearest grid cell —
   keeping the split in use unless another wins by the plan's margin; a candidate that sends is
   compared at its predicted time plus the price of the delays it adds to other clients'
   requests (``wait_price``: :func:`~dsc_export.serving.policy.priced_state`), so that devices
   sharing a server take the fleet's best share of it, not each its own;
3. the head runs here; the cut tensor goes to the server with ``tritonclient`` as binary tensor
   data (HTTP or gRPC); the server's tail returns the outputs.

Before the first batch the client waits (``ready_timeout_s``) until the server has every model
of the split dir ready, and refuses one that does not get ready or serves another model: it
never runs locally because the server was still loading. The server's outputs are taken back
into the model's form by the output contract (:mod:`dsc_export.serving.protocol`: batch moved
back to its axis, constant outputs from the client's own copy of the model).

With several servers (all serving the same model: the sha256 is checked per URL), the client
keeps one estimate per server and chooses split and server together: per server that is up,
the plan's best split for that server's (rate, q, s); the pair with the lowest predicted time
wins (:func:`~dsc_export.serving.policy.best_server`), the server in use kept unless another is
faster by the plan's margin.

Once running, if a server is unreachable, slower than the deadline or answers with an error, it
is marked down until its back-off ends (``backoff_s`` = 1 s, doubling per failure in a row up to
``max_backoff_s`` = 30 s, reset by an answer) and the batch is retried on the next best server
that is up, or finished here with the whole model: no batch is ever lost. In privacy mode the
raw input never leaves the device (no candidate of kind ``offload`` is chosen). While ``local``
is chosen nothing is sent and the rate estimate would go stale. Probing is paid for from a
budget: every batch without a measurement adds ``probe_budget`` (default 5 %) of its predicted
time, and when the budget covers the extra predicted cost of the cheapest split that sends
enough bytes to measure the link, that batch goes there. Probing thus costs at most about 5 %
over staying local, cheap probes come often and expensive ones (a slow link) rarely; none go to
a server whose load alone keeps the batch here (not even a perfect link would win); at least
``probe_every`` batches lie between probes. Transfers under 64 KB are not used for the
estimate: they are bound by latency and TCP's slow start, and read low.

The rate estimate is robust to one outlier (a cold start, one slow request) and follows a step
of the link (:class:`~dsc_export.serving.estimation.RateEstimator`): it is the median of the last
three measurements once there are three; a first measurement more than 2x off the assumed rate
is provisional and the next replaces it; later, one measurement more than 2x below the estimate
is believed at once for the next batch (a step down; one slow request thus sets one batch's plan
low, and the next measurement takes it back), one more than 2x above only once a second agrees
(a step up). While an estimate is provisional, the next probe comes after ``probe_every`` local
batches, whatever the budget.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.artifacts import read_manifest, verify_files
from dsc_export.codecs import payload_bytes
from dsc_export.errors import UserError, first_line
from dsc_export.offload import Encoder, layout_of
from dsc_export.planning import Plan, read_plan
from dsc_export.serving import protocol as proto  # "protocol" is the http/grpc parameter
from dsc_export.serving.estimation import ServerEstimate
from dsc_export.serving.policy import best_server, damped, priced_ms, server_urls
from dsc_export.serving.transport import connect


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
    fallback: str | None = None  # why a server failed it (retried on the next server, or here)
    queue_ms: float = 0.0  # this request's wait at the server
    q_ms: float = 0.0  # the server's expected wait the choice was made with
    s: float = 1.0  # the server's slowdown the choice was made with
    server: str | None = None  # the URL that answered (None: run here)
    tries: int = 0  # servers that failed this batch before it was answered or run here


@dataclass
class Endpoint:
    """One server as the client sees it: how to reach it, what it knows of it, and its back-off.

    Attributes:
        url: ``host:port``.
        remote: the connection (a :class:`~dsc_export.serving.transport.Transport`, or
            anything with ``infer``, ``load``, ``close`` and ``has_server_ms``).
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


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """The client's settings (keyword-only, in the style of PyTriton's ``TritonConfig``).

    Attributes:
        protocol: ``http`` or ``grpc``.
        privacy: never send the raw input (no ``offload`` candidate).
        threads: CPU threads for the heads and the whole model here.
        deadline_s: a request slower than this is abandoned and the batch retried on the next
            server or finished locally, seconds.
        initial_rate_MBps: the rate assumed before the first transfer [default: the middle of
            the plan's rate range on a log scale].
        backoff_s, max_backoff_s: a failed server is retried after ``backoff_s`` seconds (1 s),
            doubling with each failure in a row up to ``max_backoff_s`` (30 s); an answer
            resets it.
        probe_every: the fewest batches between two probes of the link.
        alpha: weight of a new observation in the estimates (0-1).
        probe_budget: the share of each unmeasured batch's predicted time that may be spent on
            probing (see the module docstring).
        static: always use this split (a static baseline for comparisons); the local fallback
            still applies.
        device_slowdown: make the heads and the whole model take K times as long here — the
            run-time side of a device profile taken with ``bench --slowdown K`` (labelled
            emulation, for what-if runs on a machine faster than the device).
        ready_timeout_s: wait this long for each server and every model it must serve to be
            ready (Triton's model-ready API) before the first batch (0: check once).
        load_aware: use the servers' reported wait and slowdown (q, s) in the choice and keep
            them out of the rate estimate; False is the load-blind client (the round trip less
            the compute counts as time on the wire, q = 0, s = 1), a baseline for comparisons.
        load_probe_s: ask a server's load when nothing was heard of it for this long (a stock
            Triton: read its statistics this often), seconds.
        switch_p: move from the server and split in use to a better pair only with this
            probability per batch (:func:`~dsc_export.serving.policy.damped`, against herding
            when many devices share a server); 1: at once.
        seed: the seed of that draw (None: fresh per client).
        wait_price: charge a request to a server the delays it adds to other devices' requests
            too, this weight times the delays it meets (the server's wait q, its tail's time beyond
            the server's uncontended slowdown, and on a shared link its time beyond the link's
            uncongested rate: :func:`~dsc_export.serving.policy.priced_state`); 0 lets each
            device choose for itself alone. 1 charges the mean delay a request adds; the marginal
            one is larger on a busy server, and 3 (the default) is where the queueing model's
            worst equilibria lie closest to the fleet's best (``benchmarks/fleet_price.py``).
    """

    protocol: str = "http"
    privacy: bool = False
    threads: int | None = 1
    deadline_s: float = 5.0
    initial_rate_MBps: float | None = None
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    probe_every: int = 3
    alpha: float = 0.5
    probe_budget: float = 0.05
    static: str | None = None
    device_slowdown: float = 1.0
    ready_timeout_s: float = 60.0
    load_aware: bool = True
    load_probe_s: float = 1.0
    switch_p: float = 1.0
    seed: int | None = None
    wait_price: float = 3.0


class DynamicSplitClient:
    """Runs batches with dynamic split computing against one or more tails servers.

    Args:
        split_dir: the split dir (or an unpacked device bundle) with the heads and the whole
            model.
        server_url: ``host:port`` of the server (HTTP port for ``http``, gRPC port for
            ``grpc``); several servers as a list or comma-separated (every one must serve this
            model). Each batch goes to the server (and split) with the lowest predicted time
            (:func:`~dsc_export.serving.policy.best_server`).
        plan: the plan (default: ``split_dir/plan.json``).
        options: the settings (:class:`ClientOptions`; default: its defaults).
        log: called with each :class:`BatchLog`.
        say: one-line messages (waiting for the server).

    Raises:
        UserError: no plan or another model's plan, an output no server can answer, the same
            URL twice, or a server that is not ready within ``ready_timeout_s`` or serves
            another model (the message names its URL).
    """

    def __init__(self, split_dir: str | os.PathLike, server_url: str | list[str] | None,
                 plan: Plan | None = None, *, options: ClientOptions | None = None,
                 log: Callable[[BatchLog], None] = lambda b: None,
                 say: Callable[[str], None] = lambda s: None):
        from dsc_export.engines.runtime import PartRunner

        opt = self.options = options or ClientOptions()
        self.root = Path(split_dir)
        self.manifest = read_manifest(self.root)
        if plan is None:
            path = self.root / "plan.json"
            if not path.is_file():
                raise UserError(f"no plan in '{self.root}'; make one with dsc-export plan "
                                "or pass --plan")
            plan = read_plan(path)
        if plan.model_sha256 != self.manifest.model.sha256:
            raise UserError("the plan was made for another model than this split dir's "
                            "(model sha256 differs)")
        self.plan = plan
        self.privacy = opt.privacy or plan.privacy
        # candidates that send the raw input (privacy mode never chooses them), by kind, not id
        self._raw = {s.id for s in self.manifest.splits if s.kind == "offload"}
        static = opt.static
        if static is not None and static not in plan.candidates:
            raise UserError(f"unknown split '{static}'; the plan's candidates: "
                            f"{', '.join(plan.candidates)}")
        if static in self._raw and self.privacy:
            raise UserError("privacy mode never sends the raw input: "
                            f"{static} cannot be the static split")
        self.static = static
        urls = server_urls(server_url)
        heads = [s for s in self.manifest.splits if s.head]
        verify_files(self.manifest, self.root, sorted({s.head for s in heads}))
        self._heads = {s.id: PartRunner(self.root, self.manifest, s.id, "head", threads=opt.threads)
                       for s in heads if s.kind == "split"}
        self._whole = PartRunner(self.root, self.manifest, "local", "head", threads=opt.threads)
        self._encoders = {s.id: Encoder(s.wire, layout_of(self.manifest), self.manifest.model.input.name)
                          for s in self.manifest.splits if s.encodes}
        self.contract = proto.served_outputs(self.root, self.manifest)
        self._sent = {s.id: [c.wire_name for c in proto.tail_contract(self.contract, self.manifest, s)]
                      for s in self.manifest.splits if s.tail}  # per split: what its server sends
        self._constants: dict[str, np.ndarray] | None = None
        self.fixed_batch = proto.fixed_batch(self.manifest)
        self.say, self.log = say, log
        self._in = self.manifest.model.input.name
        lo, hi = min(plan.rates_MBps), max(plan.rates_MBps)
        self.initial_rate_MBps = opt.initial_rate_MBps or math.sqrt(lo * hi)
        self.load_aware = opt.load_aware
        self._budget = 0.0
        self._rng = random.Random(opt.seed)
        if not 0 < opt.switch_p <= 1:
            raise UserError("switch_p must be in (0, 1]")
        if not 0 <= opt.wait_price <= 10:
            raise UserError("wait_price must be in [0, 10]")
        if opt.device_slowdown < 1:
            raise UserError("device_slowdown must be at least 1")
        if opt.device_slowdown > 1:
            for r in [*self._heads.values(), self._whole, *self._encoders.values()]:
                _slow_down(r, opt.device_slowdown)
        self._current: tuple[int | None, str] | None = None
        self._local_streak = 0
        self._count = 0
        self.endpoints: list[Endpoint] = []
        # what the log shows as the estimate while no server is given
        self._spare = ServerEstimate(self.initial_rate_MBps, alpha=opt.alpha)
        try:
            for url in urls:
                remote = connect(url, opt.protocol, opt.deadline_s)
                self.endpoints.append(self._endpoint(url, remote))
                self._check_server(self.endpoints[-1], opt.ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _endpoint(self, url: str, remote) -> Endpoint:
        est = ServerEstimate(self.initial_rate_MBps, alpha=self.options.alpha)
        return Endpoint(url, remote, est, backoff_s=self.options.backoff_s)

    def _check_server(self, ep: Endpoint, timeout_s: float) -> None:
        """Wait for the server's models, then refuse one that serves another model."""
        models = [s.id for s in self.manifest.splits if s.tail]
        ep.remote.wait_ready(models, timeout_s, lambda pending: self.say(
            f"waiting up to {timeout_s:g} s for the server at {ep.url} to make "
            f"{', '.join(pending)} ready"))
        try:
            sha = ep.remote.model_sha256(models[0])
        except Exception as exc:
            raise UserError(f"the server at {ep.url} is ready but does not say which model it "
                            f"serves ({_reason(exc)})") from exc
        if sha != self.manifest.model.sha256:
            raise UserError(f"the server at {ep.url} serves another model (sha256 {sha[:12]}…, "
                            f"here {self.manifest.model.sha256[:12]}…); deploy the server bundle "
                            "of this split dir")

    def _mark_down(self, ep: Endpoint) -> None:
        ep.down_until = time.monotonic() + ep.backoff_s
        ep.backoff_s = min(ep.backoff_s * 2, self.options.max_backoff_s)

    def close(self) -> None:
        """Close every server connection and deactivate the head runners."""
        for ep in self.endpoints:
            ep.remote.close()
        for r in [*self._heads.values(), self._whole]:
            r.close()

    def warm_up(self, batch: int) -> None:
        """Load and run every head and the whole model once at ``batch`` (first runs are slow), on
        the model's sample inputs (:mod:`dsc_export.feeds`: random within the graph's ranges)."""
        from dsc_export.feeds import part_feeds

        feeds = part_feeds(self.root, self.manifest, "local", "head").feeds(batch)
        for r in [*self._heads.values(), self._whole, *self._encoders.values()]:
            r.run(feeds)

    def __enter__(self) -> DynamicSplitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def server_state(self, ep: Endpoint | None = None) -> tuple[float, float]:
        """(q in ms, s): a server's (default: the first's) expected wait and slowdown the choice
        uses (0 and 1 when load-blind)."""
        if ep is None:
            ep = self.endpoints[0] if self.endpoints else None
        est = ep.estimate if ep is not None else self._spare
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
            if not ep.up(now) or now - last < self.options.load_probe_s:
                continue
            ep.asked = now
            try:
                load = ep.remote.load()
            except Exception:
                continue
            if load is not None:
                ep.estimate.observe_load(load)

    def _states(self, skip: set[int], rate: float | None = None
                ) -> list[tuple[float, float, float, float, float, float] | None]:
        """Per server: (rate, q, s, the link's uncongested rate, the server's uncontended s,
        others' share of its requests) for the choice
        (:func:`~dsc_export.serving.policy.best_server`), None for one down or in ``skip``.
        ``rate``: this rate instead of the estimates (both)."""
        now = time.monotonic()
        return [None if i in skip or not ep.up(now)
                else (rate or ep.estimate.planning_MBps(), *self.server_state(ep),
                      rate or ep.estimate.uncongested_planning_MBps(),
                      ep.estimate.uncontended_s() if self.load_aware else 1.0, ep.estimate.others_share)
                for i, ep in enumerate(self.endpoints)]

    def choose(self, batch: int, skip: set[int] = frozenset()) -> tuple[int | None, str, float]:
        """Server and split for a batch of this size now (:func:`best_server`): (server index or
        None for here, split, predicted ms). ``skip``: servers that failed this batch."""
        exclude = set(self._raw) if self.privacy else set()
        if self.static is not None:
            exclude = set(self.plan.candidates) - {self.static}
        states = self._states(skip)
        price = self.options.wait_price if self.load_aware else 0.0
        i, split, t = best_server(self.plan, batch, states, current=self._current, exclude=exclude,
                                  wait_price=price)
        if self.options.switch_p < 1 and self._current is not None and not skip:
            i, split, t = damped((i, split, t), self._kept(batch, states, exclude),
                                 self.options.switch_p, self._rng.random())
        if self.static is None and self._local_streak >= self.options.probe_every \
                and self._link_matters(batch, exclude, skip):
            probe = self._probe(batch, exclude, states, price)
            # a provisional estimate (one reading far off: a cold start or a step) is re-probed at once
            unsure = probe is not None and self.endpoints[probe[0]].estimate.rate.provisional
            # the probe's extra cost, as the choice counts costs (priced: a probe adds to others' waits too)
            cost = t if i is None else priced_ms(self.plan, batch, states[i], split, price)
            if probe and probe[1] != split and (unsure or self._budget >= probe[3] - cost):
                self._budget = 0.0
                i, split, t = probe[:3]
        return i, split, t

    def _kept(self, batch: int, states, exclude: set[str]) -> tuple[int | None, str, float] | None:
        """The pair in use with its predicted time now (None: its server is down, or it is
        excluded)."""
        i, split = self._current
        if split in exclude or (i is not None and (i >= len(states) or states[i] is None)):
            return None
        rate, q, s = states[i][:3] if i is not None else (1.0, 0.0, 1.0)
        others = set(self.plan.candidates) - {split}
        return i, split, self.plan.choose(batch, rate, None, exclude=others, q_ms=q, s=s)[1]

    def _link_matters(self, batch: int, exclude: set[str], skip: set[int]) -> bool:
        """Whether a better rate estimate could move the choice: False while the servers' wait
        and slowdown keep the batch here even over a perfect link (the load query, not a probe
        of the link, says when that ends)."""
        perfect = self._states(skip, rate=1e9)
        price = self.options.wait_price if self.load_aware else 0.0
        return best_server(self.plan, batch, perfect, exclude=exclude, wait_price=price)[0] is not None

    def _probe(self, batch: int, exclude: set[str], states, price: float
               ) -> tuple[int, str, float, float] | None:
        """The cheapest (by the plan, at the current estimates, priced as the choice prices)
        server and candidate that sends enough bytes to measure the link; small transfers are
        latency-bound and would read low. (server index, split, predicted ms, priced ms)."""
        best = None
        for i, st in enumerate(states):
            if st is None:
                continue
            est = self.endpoints[i].estimate.rate
            senders = {s.id for s in self.manifest.splits
                       if s.kind != "local" and s.bytes * batch >= est.min_bytes} - exclude
            if senders:
                costs = {c: priced_ms(self.plan, batch, st, c, price) for c in sorted(senders)}
                split = min(costs, key=costs.get)
                if best is None or costs[split] < best[3]:
                    t = costs[split] if not price else priced_ms(self.plan, batch, st, split, 0.0)
                    best = (i, split, t, costs[split])
        return best

    def _constant_values(self) -> dict[str, np.ndarray]:
        """The constant outputs (served by no server), computed once with the whole model here."""
        if self._constants is None:
            from dsc_export.feeds import part_feeds

            consts = [c for c in self.contract if c.kind == "constant"]
            feeds = part_feeds(self.root, self.manifest, "local", "head").feeds(1) if consts else {}
            values = self._whole.onnx_session().run([c.name for c in consts], feeds) if consts else []
            self._constants = {c.wire_name: v for c, v in zip(consts, values)}
        return self._constants

    def _from_server(self, res: dict[str, np.ndarray], kept: dict[str, np.ndarray] | None = None
                     ) -> dict[str, np.ndarray]:
        """The model's outputs from a server's answer: batch moved back where the model has it,
        constants added, and ``kept``: the outputs the head returned (by the model's names)."""
        out = {}
        for c in self.contract:  # keyed by the model's own output names, as the local path
            if kept and c.name in kept:
                out[c.name] = kept[c.name]
            elif c.kind == "constant":
                out[c.name] = self._constant_values()[c.wire_name]
            elif c.kind == "batched" and c.batch_axis:
                out[c.name] = np.moveaxis(res[c.wire_name], 0, c.batch_axis)
            else:
                out[c.name] = res[c.wire_name]
        return out

    def _head(self, split, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the head of ``split`` on ``x``: (the tensor it sends, the model outputs it returns
        itself (:func:`protocol.head_outputs`), by name)."""
        kept = proto.head_outputs(self.manifest, split)
        names = list(dict.fromkeys([split.wire_tensor, *kept]))
        got = dict(zip(names, self._heads[split.id].run({self._in: x}, names)))
        return got[split.wire_tensor], {k: got[k] for k in kept}

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (the model's input, batch first) and return the model's outputs by name.

        Raises:
            UserError: a batch size other than the model's fixed batch size.
        """
        batch = int(x.shape[0])
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise UserError(f"the model runs at batch size {self.fixed_batch} only; "
                            f"this batch has {batch}")
        self.refresh_load()
        i, split, predicted = self.choose(batch)
        first = self.endpoints[i] if i is not None else \
            (self.endpoints[0] if self.endpoints else None)
        planned, est = split, (first.estimate if first else self._spare).rate.value
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
            if split not in cut:  # (what is sent, the outputs the head keeps)
                if s.kind == "offload":  # the raw pixels, or encoded by the form's codec
                    cut[split] = (self._encoders[split].run({self._in: x})[0] if s.encodes else x, {})
                else:
                    cut[split] = self._head(s, x)
            z, kept = cut[split]
            head_ms += (time.perf_counter() - t1) * 1e3
            try:
                t1 = time.perf_counter()
                res = ep.remote.infer(split, z, self._sent[split])
                round_trip_ms = (time.perf_counter() - t1) * 1e3
                server_ms = float(res.pop(proto.SERVER_MS).ravel()[0])
                queue_ms = float(res.pop(proto.QUEUE_MS).ravel()[0])
                sent = payload_bytes(z)  # a codec's: the encoded images' bytes
                if not self.load_aware:  # today's client: the wait counts as time on the wire
                    queue_ms = 0.0
                wire_ms = max(round_trip_ms - queue_ms - server_ms - ep.estimate.handover_ms(sent), 1e-3)
                # the plan's rtt is the per-request overhead (eq4_ms's term), not wire time
                measured_rate = ep.estimate.observe(
                    sent, round_trip_ms=round_trip_ms, queue_ms=queue_ms, server_ms=server_ms,
                    rtt_ms=self.plan.rtt_ms, tail_ms=self.plan.parts_ms(split, batch)[1],
                    stale=self._local_streak >= 2 * self.options.probe_every)
                out = self._from_server(res, kept)
                ep.backoff_s = self.options.backoff_s
                ran, url = split, ep.url
                self._current = (i, split)
                break
            except Exception as exc:  # unreachable, deadline, 5xx, protocol error: next, or here
                many = len(self.endpoints) > 1
                reasons.append(f"{ep.url}: {_reason(exc)}" if many else _reason(exc))
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
            self._budget += self.options.probe_budget * predicted
        measured = (time.perf_counter() - t0) * 1e3
        self.log(BatchLog(self._count, batch, ran, planned, sent, est, measured_rate, predicted,
                          measured, head_ms, wire_ms, server_ms, "; ".join(reasons) or None,
                          queue_ms, q_est, s_est, url, len(failed)))
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

