"""Serve every tail (and the whole model, for ``offload``) behind Triton's inference protocol.

PyTriton runs the real Triton server core (KServe v2 over HTTP and gRPC) and calls our backend
in Python. One Triton model per split, named by the split id, with one input ``input`` (the cut
tensor, or the raw image for ``offload``) and the model's outputs, plus ``server_ms``: the time
the tail took on this batch, so a client can take it out of its data-rate estimate. A model
``dsc_meta`` returns the served model's sha256, so a client can refuse a server that runs another
model. Triton checks shapes and dtypes against each model's config and answers a wrong tensor
with the protocol's error.

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

import os
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsc_export.artifacts import read_manifest, verify_files
from dsc_export.errors import UserError, lazy_import

# INPUT, META, SERVER_MS and output_names live in protocol (both ends use them); importable from here too
from dsc_export.serving.protocol import (  # noqa: F401
    INPUT,
    META,
    SERVER_MS,
    OutputContract,
    fixed_batch,
    mergeable,
    output_names,
    served_outputs,
    wait_ready,
    why_not_mergeable,
)


@dataclass
class Stats:
    """Per-split request counts and server-side compute time."""

    requests: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    compute_ms: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, split: str, batch: int, ms: float) -> None:
        with self.lock:
            self.requests[split] = self.requests.get(split, 0) + 1
            self.samples[split] = self.samples.get(split, 0) + batch
            self.compute_ms[split] = self.compute_ms.get(split, 0.0) + ms

    def table(self) -> list[tuple[str, str, str, str]]:
        rows = [("split", "batches", "samples", "compute ms (mean per batch)")]
        for s in sorted(self.requests):
            rows.append((s, str(self.requests[s]), str(self.samples[s]), f"{self.compute_ms[s] / self.requests[s]:.2f}"))
        return rows


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


class TailServer:
    """The tails of a split dir behind PyTriton. Use :meth:`start` / :meth:`stop` or ``with``."""

    def __init__(self, split_dir: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, threads: int | None = None,
                 max_batch_size: int = 64, dynamic_batching: bool | None = None, max_queue_delay_us: int = 2000,
                 instances: int = 1, log: Callable[[str], None] = lambda s: None,
                 log_file: str | os.PathLike | None = None, ready_timeout_s: float = 120.0):
        self.root = Path(split_dir)
        self.manifest = read_manifest(self.root)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.threads, self.max_batch_size = threads, max_batch_size
        self.dynamic_batching, self.max_queue_delay_us, self.instances = dynamic_batching, max_queue_delay_us, instances
        self.log = log
        self.log_file = Path(log_file) if log_file else None  # Triton's own log (None: on stderr)
        self.ready_timeout_s = ready_timeout_s
        self.stats = Stats()
        self._triton = None
        self._sessions = {}

    def __enter__(self) -> TailServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _infer_fn(self, split_id: str, runner, in_name: str, contract: list[OutputContract], merge: bool):
        """The PyTriton callable of one split: a list of requests in, a list of answers out.

        ``merge``: the requests Triton's dynamic batcher merged run as one batch; otherwise each
        request runs alone as it came (a batch-dependent or fixed-batch model).
        """
        sent = [c for c in contract if c.kind != "constant"]
        names = [c.name for c in sent]
        whole = any(c.kind == "whole" for c in sent)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            t = time.perf_counter()
            results = runner.run({in_name: x}, names)
            ms = (time.perf_counter() - t) * 1e3
            self.stats.add(split_id, len(x), ms)
            out = {}
            for c, r in zip(sent, results):
                if c.kind == "batched":
                    if r.ndim <= c.batch_axis or r.shape[c.batch_axis] != len(x):
                        raise ValueError(f"output '{c.name}' has shape {list(r.shape)} for a batch of {len(x)}: "
                                         f"its batch is not on axis {c.batch_axis}")
                    r = np.ascontiguousarray(np.moveaxis(r, c.batch_axis, 0)) if c.batch_axis else r
                out[c.wire_name] = r
            out[SERVER_MS] = np.full((1,) if whole else (len(x), 1), ms, dtype=np.float32)
            return out

        def infer(requests):
            if not merge or whole or len(requests) == 1:
                return [run(r[INPUT]) for r in requests]
            sizes = [len(r[INPUT]) for r in requests]
            out = run(np.concatenate([r[INPUT] for r in requests]))
            answers, start = [], 0
            for n in sizes:
                answers.append({k: v[start:start + n] for k, v in out.items()})
                start += n
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

        from dsc_export.engines import PartRunner
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
                           grpc_port=self.grpc_port, metrics_address=self.host, metrics_port=self.metrics_port,
                           allow_metrics=False, exit_on_error=True, log_verbose=0, exit_timeout_secs=5,
                           log_file=self.log_file)
        triton = Triton(config=cfg)
        try:
            for s in tails:
                self.log(f"loading {s.tail} for {s.id}")
                runner = PartRunner(self.root, man, s.id, "tail", threads=self.threads)
                sess = runner.onnx_session()  # its signature; it runs the batch sizes without an engine
                self._sessions[s.id] = runner
                inp = sess.get_inputs()[0]
                in_dims = [d if isinstance(d, int) and d > 0 else -1 for d in inp.shape]
                in_dtype = ORT_DTYPES.get(inp.type, np.float32)
                outs = [Tensor(name=c.wire_name, dtype=np.dtype(c.dtype).type, shape=c.dims)
                        for c in contract if c.kind != "constant"]
                if fixed is not None:  # one batch size: no batching, Triton checks the full shape
                    inputs = [Tensor(name=INPUT, dtype=in_dtype, shape=tuple([fixed] + in_dims[1:]))]
                    outs.append(Tensor(name=SERVER_MS, dtype=np.float32, shape=(1,)))
                    config = ModelConfig(batching=False, batcher=None)
                else:
                    inputs = [Tensor(name=INPUT, dtype=in_dtype, shape=tuple(in_dims[1:]))]
                    outs.append(Tensor(name=SERVER_MS, dtype=np.float32, shape=(1,)))
                    # batcher None: no dynamic_batching block, each request runs as it came
                    batcher = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us) if dynamic else None
                    config = ModelConfig(max_batch_size=self.max_batch_size, batching=True, batcher=batcher)
                triton.bind(model_name=s.id, infer_func=[self._infer_fn(s.id, runner, inp.name, contract, dynamic)]
                            * self.instances, inputs=inputs, outputs=outs, config=config, strict=True)
            sha = man.model.sha256.encode()

            def meta(**inputs):
                n = len(next(iter(inputs.values())))
                return {"model_sha256": np.array([[sha]] * n, dtype=np.object_)}

            from pytriton.decorators import batch

            triton.bind(model_name=META, infer_func=batch(meta),
                        inputs=[Tensor(name="ping", dtype=np.int32, shape=(1,))],
                        outputs=[Tensor(name="model_sha256", dtype=np.bytes_, shape=(1,))],
                        config=ModelConfig(max_batch_size=8))
            if self.log_file is not None:  # Triton prints to what it inherits: keep that to its log file
                sys.stdout.flush()
                sys.stderr.flush()
                saved = [os.dup(1), os.dup(2)]
                sink = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(sink, 1)
                os.dup2(sink, 2)
                try:
                    triton.run()
                finally:
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    for fd in (*saved, sink):
                        os.close(fd)
            else:
                triton.run()
            self._triton = triton
            self._wait_ready([s.id for s in tails] + [META])
        except BaseException:
            self._triton = None
            triton.stop()
            raise

    def _wait_ready(self, models: list[str]) -> None:
        """Return once Triton says every model is ready (PyTriton's own wait only logs a warning)."""
        import tritonclient.http as th

        url = f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.http_port}"
        client = th.InferenceServerClient(url)
        try:
            wait_ready(client, models, self.ready_timeout_s, url)
        finally:
            client.close()

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None

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
        return {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}"}


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
