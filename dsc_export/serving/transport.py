"""The client's connection to one server: ``tritonclient`` over HTTP or gRPC, with a deadline.

:class:`Transport` holds what both protocols share (the cut tensor out, the outputs and the
server's ``server_ms`` / ``queue_ms`` back, the load query, the wait for the server's models,
the served model's sha256, a stock Triton's statistics); :class:`HttpTransport` and
:class:`GrpcTransport` hold the few calls that differ. :func:`connect` picks one by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dsc_export.errors import UserError, lazy_import
from dsc_export.serving import protocol as proto


class Transport:
    """tritonclient over one protocol with a deadline (use :func:`connect`).

    Attributes:
        url: ``host:port``.
        timeout_s: the deadline of each request, seconds.
        has_server_ms: True for ``dsc-export serve`` (it reports ``server_ms`` and ``queue_ms``);
            False once a stock Triton is recognised (:meth:`model_sha256`).
        models: the tails it serves (set by :meth:`wait_ready`).
        per_model: stock Triton: model -> (recent queue ms, recent compute ms), from its
            statistics.
    """

    protocol = ""
    module = ""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self.has_server_ms = True  # dsc-export serve reports it; a stock Triton does not
        self.models: list[str] = []
        self._stats = None  # a stock Triton's last statistics read: (monotonic s, {model: stats})
        self.per_model: dict[str, tuple[float, float]] = {}
        self.mod = lazy_import(self.module, "serve")
        self.client = self._client()

    # --- what differs between the protocols ----------------------------------------------------

    def _client(self) -> Any:
        raise NotImplementedError

    def _send(self, model: str, inputs: list, outputs: list | None = None) -> Any:
        """One inference request with the deadline; returns tritonclient's result."""
        raise NotImplementedError

    def _input(self, name: str, x: np.ndarray, dtype: str) -> Any:
        raise NotImplementedError

    def _output(self, name: str) -> Any:
        raise NotImplementedError

    def _config(self, model: str) -> dict:
        """A model's Triton config as a dict."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def infer(self, model: str, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """Send ``x`` (the cut tensor, batch first) to ``model`` and return the named outputs
        with :data:`proto.SERVER_MS` and :data:`proto.QUEUE_MS` (ms; a stock Triton: its
        statistics' recent means for this model, 0 before any).

        Raises:
            tritonclient's InferenceServerException or a socket error: the caller's retry
            and back-off handle them.
        """
        from tritonclient.utils import np_to_triton_dtype

        inp = self._input(proto.INPUT, x, np_to_triton_dtype(x.dtype))
        names = outputs + ([proto.SERVER_MS, proto.QUEUE_MS] if self.has_server_ms else [])
        res = self._send(model, [inp], [self._output(o) for o in names])
        out = {o: res.as_numpy(o) for o in names}
        if not self.has_server_ms:
            q_ms, compute_ms = self.per_model.get(model, (0.0, 0.0))
            out[proto.SERVER_MS] = np.full((x.shape[0], 1), compute_ms, np.float32)
            out[proto.QUEUE_MS] = np.full((x.shape[0], 1), q_ms, np.float32)
        return out

    def load(self) -> proto.ServerLoad | None:
        """The server's load: its load query (:data:`proto.LOAD`) on ``dsc-export serve``; on a
        stock Triton, estimated from its statistics since the previous call
        (:func:`~dsc_export.serving.tritonserver.stats_load`; None on the first call, which only
        reads them)."""
        if not self.has_server_ms:
            return self._stats_load()
        ping = self._input(proto.PING, np.zeros((1,), np.int32), "INT32")
        res = self._send(proto.LOAD, [ping])
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

    def wait_ready(self, models: list[str], timeout_s: float,
                   on_wait: Callable[[list[str]], None]) -> None:
        """Wait until the server answers and ``models`` are ready, then for its ``dsc_meta`` too
        unless it is a stock Triton serving a bundle's repository (whose configs carry the
        model's sha256): a ``dsc-export serve`` still loading is never taken for another server.

        Raises:
            UserError: not reachable, or a model not ready, within ``timeout_s``.
        """
        t0 = time.monotonic()
        self.models = list(models)
        proto.wait_ready(self.client, models, timeout_s, self.url, on_wait)
        try:
            if self.client.is_model_ready(proto.META) or \
                    self._config(models[0]).get("parameters", {}).get(proto.MODEL_SHA256_PARAMETER):
                return
        except Exception:
            pass
        left = max(0.0, timeout_s - (time.monotonic() - t0))
        proto.wait_ready(self.client, [proto.META], left, self.url, on_wait)

    def model_sha256(self, any_model: str) -> str:
        """The served model's sha256: from ``dsc_meta`` (dsc-export serve) or, on a stock Triton
        serving a bundle's repository, from the ``dsc_model_sha256`` parameter of a model's
        config (and then ``has_server_ms`` turns False)."""
        ping = self._input("ping", np.zeros((1, 1), np.int32), "INT32")
        try:
            res = self._send(proto.META, [ping])
        except Exception as exc:
            if "unknown model" not in str(exc).lower() and "not found" not in str(exc).lower():
                raise
            self.has_server_ms = False
            params = self._config(any_model).get("parameters", {})
            return params.get(proto.MODEL_SHA256_PARAMETER, {}).get("string_value", "")
        v = res.as_numpy(proto.MODEL_SHA256).ravel()[0]
        return v.decode() if isinstance(v, bytes) else str(v)

    def close(self) -> None:
        """Close the connection (errors on close are ignored: the server may be gone)."""
        try:
            self.client.close()
        except Exception:
            pass


class HttpTransport(Transport):
    """Over HTTP (KServe v2 with binary tensor data)."""

    protocol, module = "http", "tritonclient.http"

    def _client(self) -> Any:
        return self.mod.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                              network_timeout=self.timeout_s)

    def _send(self, model: str, inputs: list, outputs: list | None = None) -> Any:
        return self.client.infer(model, inputs, outputs=outputs, timeout=int(self.timeout_s * 1e6))

    def _input(self, name: str, x: np.ndarray, dtype: str) -> Any:
        inp = self.mod.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x, binary_data=True)
        return inp

    def _output(self, name: str) -> Any:
        return self.mod.InferRequestedOutput(name, binary_data=True)

    def _config(self, model: str) -> dict:
        return self.client.get_model_config(model)


class GrpcTransport(Transport):
    """Over gRPC."""

    protocol, module = "grpc", "tritonclient.grpc"

    def _client(self) -> Any:
        return self.mod.InferenceServerClient(self.url)

    def _send(self, model: str, inputs: list, outputs: list | None = None) -> Any:
        return self.client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)

    def _input(self, name: str, x: np.ndarray, dtype: str) -> Any:
        inp = self.mod.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        return inp

    def _output(self, name: str) -> Any:
        return self.mod.InferRequestedOutput(name)

    def _config(self, model: str) -> dict:
        return self.client.get_model_config(model, as_json=True)["config"]


TRANSPORTS: dict[str, type[Transport]] = {"http": HttpTransport, "grpc": GrpcTransport}


def connect(url: str, protocol: str, timeout_s: float) -> Transport:
    """The connection to ``url`` over ``protocol`` (``http`` or ``grpc``).

    Raises:
        UserError: another protocol.
    """
    if protocol not in TRANSPORTS:
        raise UserError(f"--protocol must be http or grpc, not '{protocol}'")
    return TRANSPORTS[protocol](url, timeout_s)
