"""A stock ``tritonserver`` process on a model repository, and Triton's per-model statistics.

PyTriton's wheel ships the Triton Inference Server binary with the Python backend only
(``pytriton/tritonserver/``). :class:`TritonServer` starts it the way PyTriton does
(``pytriton/triton.py`` ``_prepare_triton_inference_server`` and
``pytriton/server/triton_server.py`` ``_get_env``): the distribution copied to a work directory,
the Python-backend stub for this interpreter's version put into ``backends/python/``, the
interpreter's ``libpython`` and PyTriton's bundled libraries on ``LD_LIBRARY_PATH``, and this
environment's ``bin`` first on ``PATH`` (the stub runs ``model.py`` with this environment's
packages: numpy, onnxruntime). It serves a repository written by ``bundle --server
--triton-backend python`` (:mod:`dsc_export.triton_repository`); the ``onnxruntime_onnx`` and
``tensorrt_plan`` backends are not in the wheel.

:func:`model_stats` reads Triton's statistics extension (``GET v2/models/<name>/stats``): per
model the requests that completed and the time they spent queued and computing, which is what a
load-aware client reads from a stock Triton (``dsc-export serve`` reports ``server_ms`` per
request instead).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dsc_export.errors import UserError, lazy_import
from dsc_export.serving.protocol import ServerLoad, wait_ready


def distribution() -> tuple[Path, Path, Path]:
    """Where PyTriton's wheel keeps the server: its ``tritonserver`` directory, the Python-backend
    stub for this interpreter, and the directory of the libraries the binary links.

    Raises:
        UserError: PyTriton (the ``serve`` extra) is not installed, or has no stub for this
            Python version.
    """
    lazy_import("pytriton", "serve")
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = get_stub_path(version)
    if not stub.is_file():
        raise UserError(f"PyTriton's wheel has no Python-backend stub for Python {version} ({stub})")
    return get_root_module_path() / "tritonserver", stub, get_libs_path()


def server_env(base: dict[str, str], libs: Path) -> dict[str, str]:
    """The environment the binary and its Python-backend stub need (pure): libpython and
    PyTriton's libraries on ``LD_LIBRARY_PATH``, this interpreter's ``bin`` first on ``PATH``."""
    env = dict(base)
    paths = [p for p in (sysconfig.get_config_var("LIBDIR") or "", os.fspath(libs)) if p]
    env["LD_LIBRARY_PATH"] = ":".join(paths + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def server_argv(home: Path, repository: Path, *, host: str, http_port: int, grpc_port: int,
                metrics_port: int) -> list[str]:
    """The command line of ``tritonserver`` prepared in ``home`` serving ``repository`` (pure)."""
    return [os.fspath(home / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={home / 'backends'}", f"--cache-directory={home / 'caches'}",
            f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
            f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            "--exit-timeout-secs=5", "--strict-readiness=true"]


class TritonServer:
    """A stock ``tritonserver`` serving a model repository, as a child process in its own
    process group. Use :meth:`start` / :meth:`stop` or ``with``.

    Args:
        repository: a Triton model repository (a server bundle's ``triton/``).
        host: the address to bind (loopback unless told).
        http_port, grpc_port, metrics_port: the ports.
        log_file: where Triton's output goes [default: a file in its work directory, removed
            by :meth:`stop`].
        ready_timeout_s: how long :meth:`start` waits for every model of the repository.
    """

    def __init__(self, repository: str | os.PathLike, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_file: str | os.PathLike | None = None,
                 ready_timeout_s: float = 120.0):
        self.repository = Path(repository).resolve()
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_file = Path(log_file) if log_file else None
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self._home: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def models(self) -> list[str]:
        """The repository's models: its directories that hold a ``config.pbtxt``."""
        return sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt"))

    def start(self) -> None:
        """Prepare the binary, start it and return once every model of the repository is ready.

        Raises:
            UserError: the repository has no model, PyTriton is missing, or the server exits or
                does not make every model ready within ``ready_timeout_s`` (the message ends
                with the last line of Triton's log).
        """
        models = self.models()
        if not models:
            raise UserError(f"'{self.repository}' holds no Triton model (no */config.pbtxt)")
        dist, stub, libs = distribution()
        self._home = tempfile.TemporaryDirectory(prefix="dsc-tritonserver-")
        try:
            home = Path(self._home.name) / "tritonserver"
            shutil.copytree(dist, home, ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy2(stub, home / "backends" / "python" / "triton_python_backend_stub")
            argv = server_argv(home, self.repository, host=self.host, http_port=self.http_port,
                               grpc_port=self.grpc_port, metrics_port=self.metrics_port)
            self._log = self.log_file or Path(self._home.name) / "tritonserver.log"  # read for errors
            with open(self._log, "ab") as log:
                self.proc = subprocess.Popen(argv, env=server_env(os.environ, libs), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready(models)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, models: list[str]) -> None:
        """Poll until every model is ready; fail at once when the process has exited."""
        th = lazy_import("tritonclient.http", "serve")
        url = self.url()
        client = th.InferenceServerClient(url)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise UserError(f"tritonserver on '{self.repository}' exited before its models were ready"
                                    f"{self._log_tail()}")
                try:
                    wait_ready(client, models, 0, url)
                    return
                except UserError as exc:
                    if time.monotonic() >= deadline:
                        raise UserError(f"{exc}{self._log_tail()}") from exc
                time.sleep(0.25)
        finally:
            client.close()

    def _log_tail(self) -> str:
        """What Triton's log says went wrong, for a one-line message: the first model that
        failed to load (its message up to Triton's first escaped newline), else the last line."""
        if self._log is None or not self._log.is_file():
            return ""
        lines = [ln.strip() for ln in self._log.read_text(errors="replace").splitlines() if ln.strip()]
        failed = [ln for ln in lines if "failed to load '" in ln]
        if failed:
            why = failed[0].split('] "', 1)[-1].split("\\n", 1)[0].rstrip('"')
        else:
            why = lines[-1] if lines else ""
        return f" (Triton: {why[:300]})" if why else ""

    def url(self, protocol: str = "http") -> str:
        """``host:port`` to reach the server with ``protocol`` (``http`` or ``grpc``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.http_port if protocol == 'http' else self.grpc_port}"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s) and remove its work directory."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None


@dataclass(frozen=True)
class ModelStats:
    """One model's cumulative statistics from Triton's statistics extension.

    Attributes:
        requests: inference requests that completed successfully.
        executions: model executions (several requests merged by dynamic batching run as one).
        queue_ms: total time the requests waited in the scheduler's queue (ms).
        compute_ms: total time of their ``compute_infer`` step (ms), i.e. the model itself.
        success_ms: total duration of those requests in the server (``success``: from arrival
            to answer, ms).
    """

    requests: int
    executions: int
    queue_ms: float
    compute_ms: float
    success_ms: float = 0.0

    def minus(self, before: ModelStats) -> ModelStats:
        """The statistics of what happened since ``before`` (the totals only grow)."""
        return ModelStats(self.requests - before.requests, self.executions - before.executions,
                          self.queue_ms - before.queue_ms, self.compute_ms - before.compute_ms,
                          self.success_ms - before.success_ms)


def model_stats(client, model: str, headers: dict[str, str] | None = None) -> ModelStats:
    """Read one model's statistics (summed over its versions) from a Triton server.

    Args:
        client: a ``tritonclient.http`` or ``tritonclient.grpc`` ``InferenceServerClient``.
        model: the model's name.
        headers: extra request headers (PyTriton's access token: its statistics are restricted).

    Returns:
        :class:`ModelStats` from ``model_stats[].inference_stats.{success, queue,
        compute_infer}`` and ``execution_count`` (Triton's ``ModelStatistics``,
        ``grpc_service.proto``; durations there are in ns).

    Raises:
        tritonclient.utils.InferenceServerException: the server does not know the model.
    """
    got = client.get_inference_statistics(model, headers=headers)
    if not isinstance(got, dict):  # gRPC: a protobuf message
        from google.protobuf.json_format import MessageToDict

        got = MessageToDict(got, preserving_proto_field_name=True)
    req = exe = 0
    queue_ns = compute_ns = success_ns = 0.0
    for m in got.get("model_stats", []):
        st = m.get("inference_stats", {})
        req += int(st.get("success", {}).get("count", 0))
        success_ns += float(st.get("success", {}).get("ns", 0))
        queue_ns += float(st.get("queue", {}).get("ns", 0))
        compute_ns += float(st.get("compute_infer", {}).get("ns", 0))
        exe += int(m.get("execution_count", 0))
    return ModelStats(req, exe, queue_ns / 1e6, compute_ns / 1e6, success_ns / 1e6)


def stats_load(before: dict[str, ModelStats], after: dict[str, ModelStats],
               window_s: float) -> tuple[ServerLoad, dict[str, tuple[float, float]]]:
    """A stock Triton's load from two reads of its statistics (pure): what the ``dsc_load`` query
    answers on ``dsc-export serve``, estimated from Triton's own per-model totals.

    Args:
        before, after: model name -> :class:`ModelStats` (:func:`model_stats`), read ``window_s``
            seconds apart (models missing from ``before`` count from zero).
        window_s: seconds between the two reads.

    Returns:
        (:class:`~dsc_export.serving.protocol.ServerLoad` over all models: ``q_ms`` the mean queue
        time per request completed in the window (ms), ``requests`` their count, ``s`` NaN (a stock
        Triton has no profile: the client takes s from the compute time per request against its
        plan), ``queue_depth`` and ``utilization`` NaN (not in Triton's statistics);
        per model with requests in the window: (mean queue ms, mean compute ms) per request).
    """
    zero = ModelStats(0, 0, 0.0, 0.0)
    per_model, req, queue = {}, 0, 0.0
    for name, st in after.items():
        d = st.minus(before.get(name, zero))
        if d.requests > 0:
            per_model[name] = (max(0.0, d.queue_ms) / d.requests, max(0.0, d.compute_ms) / d.requests)
            req, queue = req + d.requests, queue + max(0.0, d.queue_ms)
    nan = float("nan")
    return ServerLoad(nan, nan, queue / req if req else 0.0, nan, window_s, req), per_model
