"""Serve every tail (and the whole model, for ``offload``) behind Triton's inference protocol.

PyTriton runs the real Triton server core (KServe v2 over HTTP and gRPC) and calls our backend
in Python. One Triton model per split, named by the split id, with one input ``input`` (the cut
tensor, or the raw image for ``offload``) and the model's outputs, plus ``queue_ms`` (how long the
request waited for the server's compute) and ``server_ms`` (the tail's run on the batch it joined),
so a client can take both out of its data-rate estimate and track the server's load (where each
is measured: :mod:`dsc_export.serving.protocol`). A model ``dsc_meta`` returns the served model's
sha256, so a client can refuse a server that runs another model; a model ``dsc_load`` answers the
load query (:class:`~dsc_export.serving.protocol.ServerLoad`: queue depth, recent utilisation,
recent wait and slowdown) without touching the tails.

**One batch computes at a time** (:class:`Gate`): the tails share the server's threads. Triton
hands requests to ``instances`` handler threads per model; a request that finds the server busy
waits at the gate, and the requests of one split that waited together run as one batch (up to
``max_batch_size``) when the model may merge requests. So the wait is measured here, per
request, rather than hidden in Triton's queue: serve with ``instances`` at least the number of
requests in flight (devices) for the measurement to cover all of it. Triton checks shapes and
dtypes against each model's config and answers a wrong tensor with the protocol's error.

Outputs follow :func:`dsc_export.serving.protocol.output_contract`: batched outputs go back batch
first (an output whose batch is on another axis is moved to the front; the client moves it back),
constant outputs are not sent (the client has them), and a split dir with an output no server can
answer is refused before anything starts.

Dynamic batching (requests of several clients merged into one batch up to ``max_batch_size``)
is on for a model whose manifest says it may merge requests (``mergeable``); a model whose
samples depend on their batch-mates is served without it, each request run as it came, and a
model that runs at one batch size only (``fixed_batch``) is served without batching at all
(Triton ``max_batch_size: 0``; Triton refuses any other shape). A batch runs on the tail's engine
for its batch size where one was built (what the server profile measured), else on the tail's
ONNX; sessions have spinning off so the tails' thread pools do not spin against each other.
``start`` returns only once Triton reports every model ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsc_export import codecs
from dsc_export.artifacts import Profile, read_manifest, verify_files
from dsc_export.codecs import payload_bytes
from dsc_export.errors import UserError, lazy_import
from dsc_export.offload import DecodingRunner, form_of, layout_of
from dsc_export.serving.load import Gate, HandOver, LoadMeter, Stats, Waiting
from dsc_export.serving.processes import kill_stubs
from dsc_export.serving.protocol import (
    INPUT,
    LOAD,
    LOAD_OUTPUT,
    META,
    MODEL_SHA256,
    PING,
    QUEUE_MS,
    SERVER_MS,
    OutputContract,
    fixed_batch,
    mergeable,
    served_outputs,
    tail_contract,
    wait_ready,
    why_not_mergeable,
)


def _check_versions() -> None:
    """PyTriton before 0.7 installs beside numpy 2 but then answers with empty outputs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pt = version("nvidia-pytriton")
    except PackageNotFoundError:
        return
    major, minor = (int(x) for x in pt.split(".")[:2])
    if (major, minor) < (0, 7) and int(np.__version__.split(".")[0]) >= 2:
        raise UserError(f"nvidia-pytriton {pt} does not work with numpy {np.__version__} (its outputs come back "
                        "empty); install the 'serve' extra again: pip install 'nvidia-pytriton>=0.7' 'numpy<2'")


def _pytriton_env() -> None:
    """PyTriton's Triton process needs the interpreter's libpython on LD_LIBRARY_PATH."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    cur = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in cur.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{cur}" if cur else libdir


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """The server's settings (keyword-only, in the style of PyTriton's ``TritonConfig``).

    Attributes:
        host: the address to listen on.
        http_port, grpc_port, metrics_port: Triton's ports.
        threads: CPU threads per tail (None: onnxruntime's default).
        max_batch_size: the largest batch a model takes (merged requests included).
        dynamic_batching: merge requests of several devices (None: where the model may).
        max_queue_delay_us: how long Triton's batcher waits for requests to merge, microseconds.
        instances: request handlers per model: at least the number of devices, so that every
            request's wait is measured (``queue_ms``) rather than spent in Triton's queue.
        log_file: Triton's own log (None: on stderr).
        ready_timeout_s: how long :meth:`TailServer.start` waits for every model to be ready.
        load_window_s: how far back the load answer's "recent" reaches, seconds.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    threads: int | None = None
    max_batch_size: int = 64
    dynamic_batching: bool | None = None
    max_queue_delay_us: int = 2000
    instances: int = 1
    log_file: str | os.PathLike | None = None
    ready_timeout_s: float = 120.0
    load_window_s: float = 2.0


class TailServer:
    """The tails of a split dir behind PyTriton. Use :meth:`start` / :meth:`stop` or ``with``.

    Args:
        split_dir: the split dir (or an unpacked server bundle).
        options: the settings (:class:`ServeOptions`; default: its defaults).
        profile: the server profile; with it each answer reports the tail's slowdown s.
        log: one-line progress messages.
    """

    def __init__(self, split_dir: str | os.PathLike, options: ServeOptions | None = None, *,
                 profile: Profile | None = None, log: Callable[[str], None] = lambda s: None):
        opt = self.options = options or ServeOptions()
        self.root = Path(split_dir)
        self.manifest = read_manifest(self.root)
        self.host, self.http_port, self.grpc_port = opt.host, opt.http_port, opt.grpc_port
        self.threads, self.max_batch_size = opt.threads, opt.max_batch_size
        self.dynamic_batching, self.instances = opt.dynamic_batching, opt.instances
        self.log = log
        self.log_file = Path(opt.log_file) if opt.log_file else None  # None: on stderr
        if profile is not None and profile.model_sha256 != self.manifest.model.sha256:
            raise UserError("the server profile was taken for another model than this split dir's "
                            "(model sha256 differs)")
        if profile is not None and not any(t.part == "tail" for t in profile.timings):
            raise UserError("the profile has no tail timings; take the server's with "
                            "dsc-export bench --role server")
        self.stats = Stats()
        self.meter = LoadMeter(opt.load_window_s)
        self._gate = Gate(self.meter)
        self.handover = HandOver(opt.load_window_s)
        self._token: str | None = None  # PyTriton's access token to its (restricted) statistics
        self._stats_read = -1.0  # time.perf_counter() of the last read of Triton's statistics
        # the server profile's tail times, for each request's slowdown s (none: s is not reported)
        self._profiled: dict[str, tuple[list[int], list[float]]] = {}
        for t in sorted(profile.timings if profile else [], key=lambda t: t.batch):
            if t.part == "tail":
                b, ms = self._profiled.setdefault(t.split, ([], []))
                b.append(t.batch)
                ms.append(t.median_ms)
        self._triton = None
        self._sessions = {}

    def __enter__(self) -> TailServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _slowdown(self, split_id: str, batch: int, ms: float) -> float:
        """``ms`` over the profiled tail time for ``batch`` (NaN without a profile or in range)."""
        from dsc_export.planning import interpolate

        got = self._profiled.get(split_id)
        if not got or not got[0][0] <= batch <= got[0][-1]:
            return float("nan")
        return ms / interpolate(got[0], got[1], batch)

    def _infer_fn(self, split_id: str, runner, in_name: str, contract: list[OutputContract], merge: bool):
        """The PyTriton callable of one split: a list of requests in, a list of answers out.

        Every request passes the :class:`Gate`. ``merge``: the requests that waited together
        run as one batch; otherwise each request runs alone as it came (a batch-dependent or
        fixed-batch model).
        """
        sent = [c for c in contract if c.kind != "constant"]
        names = [c.name for c in sent]
        whole = any(c.kind == "whole" for c in sent)

        def run(x: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
            t = time.perf_counter()
            results = runner.run({in_name: x}, names)
            ms = (time.perf_counter() - t) * 1e3
            out = {}
            for c, r in zip(sent, results):
                if c.kind == "batched":
                    if r.ndim <= c.batch_axis or r.shape[c.batch_axis] != len(x):
                        raise ValueError(f"output '{c.name}' has shape {list(r.shape)} for a batch of {len(x)}: "
                                         f"its batch is not on axis {c.batch_axis}")
                    r = np.ascontiguousarray(np.moveaxis(r, c.batch_axis, 0)) if c.batch_axis else r
                out[c.wire_name] = r
            return out, ms

        def timing(n: int, ms: float, queue_ms: float) -> dict[str, np.ndarray]:
            shape = (1,) if whole else (n, 1)
            return {SERVER_MS: np.full(shape, ms, dtype=np.float32),
                    QUEUE_MS: np.full(shape, queue_ms, dtype=np.float32)}

        def run_items(items: list[Waiting], start: float) -> None:
            xs = [x for it in items for x in it.inputs]
            queues = [(start - it.arrived) * 1e3 for it in items for _ in it.inputs]
            if merge and not whole and len(xs) > 1:
                out, ms = run(np.concatenate(xs))
                answers, k = [], 0
                for x, q in zip(xs, queues):
                    answers.append({**{n: v[k:k + len(x)] for n, v in out.items()}, **timing(len(x), ms, q)})
                    k += len(x)
                self.stats.add(split_id, k, ms, queues)
                self.meter.add(start, time.perf_counter(), queues, [self._slowdown(split_id, len(x), ms) for x in xs])
            else:  # each request alone, as it came; a later one waits for the earlier ones too
                answers = []
                for x, q in zip(xs, queues):
                    t = time.perf_counter()
                    q += (t - start) * 1e3
                    out, ms = run(x)
                    answers.append({**out, **timing(len(x), ms, q)})
                    self.stats.add(split_id, len(x), ms, [q])
                    self.meter.add(t, time.perf_counter(), [q], [self._slowdown(split_id, len(x), ms)])
            k = 0
            for it in items:
                it.answers, k = answers[k:k + len(it.inputs)], k + len(it.inputs)

        def infer(requests):
            t = time.perf_counter()
            item = Waiting([r[INPUT] for r in requests])
            answers = self._gate.serve(split_id, item, run_items, merge, self.max_batch_size)
            self.handover.handled(split_id, len(requests), (time.perf_counter() - t) * 1e3,
                                  sum(payload_bytes(x) for x in item.inputs))
            return answers

        return infer

    def start(self) -> None:
        """Load every tail, bind one Triton model per split, start serving (non-blocking) and
        return once Triton reports every model ready.

        Raises:
            UserError: an output no server can answer (:func:`protocol.served_outputs`),
                dynamic batching asked for a model that must not merge requests, or a model
                that does not get ready.
        """
        lazy_import("pytriton", "serve")
        _check_versions()
        _pytriton_env()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        from dsc_export.engines.runtime import PartRunner
        from dsc_export.ort import ORT_DTYPES

        man = self.manifest
        contract = served_outputs(self.root, man)
        fixed, merge = fixed_batch(man), mergeable(man)
        if self.dynamic_batching and not merge:
            raise UserError(f"dynamic batching would merge requests of several devices into one batch, but "
                            f"{why_not_mergeable(man)}; serve it without --dynamic-batching")
        dynamic = merge if self.dynamic_batching is None else self.dynamic_batching
        tails = [s for s in man.splits if s.tail]
        verify_files(man, self.root, [s.tail for s in tails])
        cfg = TritonConfig(http_address=self.host, http_port=self.http_port, grpc_address=self.host,
                           grpc_port=self.grpc_port, metrics_address=self.host,
                           metrics_port=self.options.metrics_port,
                           allow_metrics=False, exit_on_error=True, log_verbose=0, exit_timeout_secs=5,
                           log_file=self.log_file)
        triton = Triton(config=cfg, **self._security())
        try:
            for s in tails:
                self.log(f"loading {s.tail} for {s.id}")
                runner = PartRunner(self.root, man, s.id, "tail", threads=self.threads)
                sess = runner.onnx_session()  # its signature; it runs the batch sizes without an engine
                self._sessions[s.id] = runner
                inp = sess.get_inputs()[0]
                in_dims = [d if isinstance(d, int) and d > 0 else -1 for d in inp.shape]
                in_dtype = ORT_DTYPES.get(inp.type, np.float32)
                if form_of(s):  # an offload codec form: one encoded image per sample, decoded here
                    runner = DecodingRunner(runner, form_of(s), layout_of(man), man.model.input.shape[1:])
                    in_dims, in_dtype = [-1, 1], np.bytes_
                sent = tail_contract(contract, man, s)  # not the constants, nor what the head keeps
                outs = [Tensor(name=c.wire_name, dtype=np.dtype(c.dtype).type, shape=c.dims) for c in sent]
                outs += [Tensor(name=SERVER_MS, dtype=np.float32, shape=(1,)),
                         Tensor(name=QUEUE_MS, dtype=np.float32, shape=(1,))]
                if fixed is not None:  # one batch size: no batching, Triton checks the full shape
                    inputs = [Tensor(name=INPUT, dtype=in_dtype, shape=tuple([fixed] + in_dims[1:]))]
                    config = ModelConfig(batching=False, batcher=None)
                else:
                    inputs = [Tensor(name=INPUT, dtype=in_dtype, shape=tuple(in_dims[1:]))]
                    # batcher None: no dynamic_batching block, each request runs as it came
                    delay = self.options.max_queue_delay_us
                    batcher = DynamicBatcher(max_queue_delay_microseconds=delay) if dynamic else None
                    config = ModelConfig(max_batch_size=self.max_batch_size, batching=True, batcher=batcher)
                triton.bind(model_name=s.id, infer_func=[self._infer_fn(s.id, runner, inp.name, sent, dynamic)]
                            * self.instances, inputs=inputs, outputs=outs, config=config, strict=True)
            sha = man.model.sha256.encode()

            def meta(**inputs):
                n = len(next(iter(inputs.values())))
                return {MODEL_SHA256: np.array([[sha]] * n, dtype=np.object_)}

            from pytriton.decorators import batch

            triton.bind(model_name=META, infer_func=batch(meta),
                        inputs=[Tensor(name=PING, dtype=np.int32, shape=(1,))],
                        outputs=[Tensor(name=MODEL_SHA256, dtype=np.bytes_, shape=(1,))],
                        config=ModelConfig(max_batch_size=8))

            def load(requests):
                self._read_stats([s.id for s in tails])
                a, b = self.handover.fit()
                now = dataclasses.replace(self.meter.load(), handover_ms=a, handover_ms_per_MB=b)
                return [{LOAD_OUTPUT: now.to_array()} for _ in requests]

            triton.bind(model_name=LOAD, infer_func=load, inputs=[Tensor(name=PING, dtype=np.int32, shape=(1,))],
                        outputs=[Tensor(name=LOAD_OUTPUT, dtype=np.float64, shape=(8,))],
                        config=ModelConfig(batching=False))
            with _into(self.log_file):
                triton.run()
            if self.log_file is not None:
                _quiet_echo(triton)
            self._triton = triton
            self._wait_ready([s.id for s in tails] + [META, LOAD])
            self._warm_up(tails)
        except BaseException:  # also a Ctrl-C or SIGTERM during start-up: nothing left running
            self._triton = None
            with _into(self.log_file):
                triton.stop()
            kill_stubs()
            raise

    def _warm_up(self, tails) -> None:
        """Send each tail one request per batch size it has an engine for (or its one batch
        size), through Triton, before :meth:`start` returns: a model's first run (and the Python
        backend's first hand-over) is slow, and a client's first answer must not read as a slow
        link or a slow server. The statistics and the load answer then start afresh."""
        import tritonclient.http as th
        from tritonclient.utils import np_to_triton_dtype

        from dsc_export.ort import ORT_DTYPES, random_array

        client = th.InferenceServerClient(self._local_url(), network_timeout=self.options.ready_timeout_s)
        fixed, rng = fixed_batch(self.manifest), np.random.default_rng(0)
        try:
            for s in tails:
                runner = self._sessions[s.id]
                inp = runner.onnx_session().get_inputs()[0]
                rest = list(inp.shape[1:])
                if not all(isinstance(d, int) and d > 0 for d in rest):
                    self.log(f"{s.id}: not warmed up (its input has free dimensions {rest})")
                    continue
                sizes = sorted({fixed} if fixed else set(runner.records) | {1})
                for b in [x for x in sizes if x <= self.max_batch_size or fixed]:
                    x = random_array([b, *rest], np.dtype(ORT_DTYPES.get(inp.type, np.float32)), rng)
                    if form_of(s):  # an offload codec form takes the encoded images
                        x = codecs.encode_batch(x, form_of(s), layout_of(self.manifest))
                    req = th.InferInput(INPUT, list(x.shape), np_to_triton_dtype(x.dtype))
                    req.set_data_from_numpy(x, binary_data=True)
                    client.infer(s.id, [req])
        finally:
            client.close()
        self.stats = Stats()
        self.meter = self._gate.meter = LoadMeter(self.options.load_window_s)
        self.handover = HandOver(self.options.load_window_s)
        self._read_stats([s.id for s in tails], every_s=0.0)  # the baseline

    def _security(self) -> dict:
        """``Triton``'s keyword for its security settings, with an access token this server knows
        (PyTriton restricts the statistics that :class:`HandOver` reads); none for a PyTriton
        without them (its statistics are open)."""
        try:
            from pytriton.triton import TritonSecurityConfig
        except ImportError:
            return {}
        sec = TritonSecurityConfig()
        self._token = sec.access_token
        return {"security_config": sec}

    def _read_stats(self, models: list[str], every_s: float = 0.25) -> None:
        """Feed Triton's per-model statistics to :attr:`handover`, at most every ``every_s``
        seconds; a failed read changes nothing."""
        import tritonclient.http as th

        from dsc_export.serving.tritonserver import model_stats

        if time.perf_counter() - self._stats_read < every_s:
            return
        self._stats_read = time.perf_counter()
        headers = {"triton-access-token": self._token} if self._token else None
        # a client per read: the reads come from two threads (the warm-up's, the load handler's),
        # and a tritonclient.http client works in the thread that made it only
        client = th.InferenceServerClient(self._local_url())
        try:
            read = {m: model_stats(client, m, headers) for m in models}
            self.handover.update({m: (st.requests, st.success_ms) for m, st in read.items()})
        except Exception:
            pass
        finally:
            client.close()

    def _local_url(self) -> str:
        """``host:port`` of this server's HTTP endpoint as this process reaches it."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.http_port}"

    def _wait_ready(self, models: list[str]) -> None:
        """Return once Triton says every model is ready (PyTriton's own wait only logs a warning)."""
        import tritonclient.http as th

        url = self._local_url()
        client = th.InferenceServerClient(url)
        try:
            wait_ready(client, models, self.options.ready_timeout_s, url)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop Triton (its last words, "Signal (2) received." and the stubs', go to the log
        file), then kill any of its Python-backend stubs still alive
        (:func:`~dsc_export.serving.processes.kill_stubs`)."""
        if self._triton is not None:
            echo = getattr(self._triton, "_triton_server", None)
            with _into(self.log_file):
                self._triton.stop()
            if self.log_file is not None and echo is not None and hasattr(echo, "logs"):
                with open(self.log_file, "a") as f:  # what tritonserver printed (see _quiet_echo)
                    f.write(echo.logs())
            self._triton = None
        kill_stubs()  # the Python-backend stubs tritonserver did not stop (they ignore SIGTERM)

    def batching(self) -> str:
        """How requests are batched, in words (for the ready message)."""
        fb = fixed_batch(self.manifest)
        if fb is not None:
            return f"batch size {fb} only, requests never merged"
        if self.dynamic_batching is False or not mergeable(self.manifest):
            why = why_not_mergeable(self.manifest)
            return "dynamic batching off" + (f": {why}" if why else "")
        return f"dynamic batching up to {self.max_batch_size}"

    def urls(self) -> dict[str, str]:
        """``host:port`` of the HTTP and gRPC endpoints (what ``run --server`` takes)."""
        return {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}"}


def _quiet_echo(triton) -> None:
    """Stop PyTriton echoing tritonserver's output to this process's stdout once it runs.

    PyTriton 0.7 reads tritonserver's stdout in a thread and ``print``s every line
    (``TritonServer(verbose=True)``, its default, not settable through ``Triton``). On Ctrl-C the
    terminal signals tritonserver too, which says "Signal (2) received." before this process has
    redirected its output for the stop: the line reached the terminal now and then. PyTriton
    still keeps the lines; :meth:`TailServer.stop` appends them to the log file. Where PyTriton
    has no such attribute (another version) this does nothing.
    """
    server = getattr(triton, "_triton_server", None)
    if server is not None and hasattr(server, "_verbose"):
        server._verbose = False


@contextlib.contextmanager
def _into(log_file: Path | None):
    """While starting and stopping Triton, this process's stdout and stderr go to ``log_file``:
    Triton, its stubs and PyTriton (which echoes Triton's terminal output with ``print`` and
    warns through ``logging``) print to what they inherit. None: left as they are."""
    if log_file is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)


def serve_forever(server: TailServer, on_ready: Callable[[], None] = lambda: None) -> None:
    """Start ``server`` and block until SIGTERM or Ctrl-C, then shut down cleanly."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        sys.stdout.flush()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` now (bound together, then released), for a
    server's HTTP, gRPC and metrics ports. Another process may take one before it is used: the
    server's start then fails on it and says so."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports
