"""A strict double of the part of ``cuda.bindings.runtime`` (cuda-python 12.6+ / 13) that dsc-export uses.

Contract, read from cuda-python's ``cuda/bindings/runtime.pyx`` (the generated CUDA runtime
bindings; ``inspect.signature`` of the installed module gives the same parameter names) and
NVIDIA's ``samples/python/common_runtime.py`` (TensorRT release/10.0 and 11.1):

- every function returns a tuple ``(cudaError_t, *values)``; an error never raises;
- ``cudaMalloc(size)`` / ``cudaMallocHost(size)`` return an integer address; ``cudaFree(devPtr)`` /
  ``cudaFreeHost(ptr)`` release it (an unknown address: ``cudaErrorInvalidValue``);
- ``cudaMemcpyAsync(dst, src, count, kind, stream)`` and ``cudaEventRecord(event, stream)`` are
  enqueued on the stream and run only when the stream (``cudaStreamSynchronize``) or a later
  event (``cudaEventSynchronize``) is waited for, so host memory that an enqueued copy reads
  must still hold its data then;
- ``cudaGetErrorString(error)`` returns ``(cudaSuccess, bytes)``.

Strict: the module has only the names below (an unknown one raises AttributeError), the
functions have the real parameter names and counts (a wrong count raises TypeError), and
``tests/test_tensorrt_backend.py`` checks both against the real module where it imports.
"Device" memory is host memory here; copies really move bytes, so results can be checked.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import types
from dataclasses import dataclass, field


class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


ERROR_STRINGS = {
    cudaError_t.cudaSuccess: b"no error",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: b"out of memory",
    cudaError_t.cudaErrorInsufficientDriver: b"CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle",
}


@dataclass
class DeviceProps:
    """What ``cudaGetDeviceProperties`` returns (the fields dsc-export reads)."""

    name: bytes = b"Fake GPU"
    major: int = 8
    minor: int = 6
    totalGlobalMem: int = 24 * 2**30  # noqa: N815


class _EventMark:
    """An event record enqueued on a stream: sets the event's "time" (stream ops run so far) when it runs."""

    def __init__(self, double: CudaDouble, event: int):
        self.double, self.event = double, event

    def __call__(self) -> None:
        self.double.events[self.event] = float(self.double.ops_run)


@dataclass
class CudaDouble:
    """The state behind one fake ``cuda.bindings.runtime`` module (:attr:`module`).

    Attributes:
        devices: what ``cudaGetDeviceCount`` reports, or a ``cudaError_t`` it fails with.
        props: the device's properties.
        fail: function name -> (n, error): its n-th call (1-based) from now fails with error.
        device, pinned, streams, events: what is allocated / created and not yet released.
        pageable_copies: copies that read or wrote host memory that was not pinned.
    """

    devices: int | cudaError_t = 1
    props: DeviceProps = field(default_factory=DeviceProps)
    fail: dict[str, tuple[int, cudaError_t]] = field(default_factory=dict)
    device: dict[int, ctypes.Array] = field(default_factory=dict)
    pinned: dict[int, ctypes.Array] = field(default_factory=dict)
    streams: dict[int, list] = field(default_factory=dict)
    events: dict[int, float | None] = field(default_factory=dict)
    pageable_copies: int = 0
    ops_run: int = 0
    calls: list[str] = field(default_factory=list)
    _next: int = 1

    def live(self) -> dict[str, int]:
        """How many device buffers, pinned buffers, streams and events are not yet released."""
        return {"device": len(self.device), "pinned": len(self.pinned), "streams": len(self.streams),
                "events": len(self.events)}

    def _failed(self, name: str) -> cudaError_t | None:
        self.calls.append(name)
        if name in self.fail:
            n, err = self.fail[name]
            if n <= 1:
                del self.fail[name]
                return err
            self.fail[name] = (n - 1, err)
        return None

    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _alloc(self, table: dict, size: int, name: str):
        err = self._failed(name)
        if err is not None:
            return (err, None)
        buf = ctypes.create_string_buffer(int(size))
        table[ctypes.addressof(buf)] = buf
        return (cudaError_t.cudaSuccess, ctypes.addressof(buf))

    def _free(self, table: dict, ptr: int, name: str):
        self.calls.append(name)
        if table.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def _within(self, table: dict, ptr: int, count: int) -> bool:
        return any(a <= ptr and ptr + count <= a + ctypes.sizeof(b) for a, b in table.items())

    def _run(self, stream: int, upto=None) -> None:
        ops = self.streams[stream]
        while ops:
            op = ops.pop(0)
            op()
            self.ops_run += 1
            if upto is not None and op is upto:
                return

    def enqueue(self, stream: int, op) -> bool:
        """Put ``op`` (no arguments) on ``stream``; False for an unknown stream (what TensorRT uses)."""
        if int(stream) not in self.streams:
            return False
        self.streams[int(stream)].append(op)
        return True

    @functools.cached_property
    def module(self) -> types.ModuleType:
        """The fake ``cuda.bindings.runtime`` (one per double)."""
        d = self
        mod = types.ModuleType("cuda.bindings.runtime")
        mod.cudaError_t, mod.cudaMemcpyKind = cudaError_t, cudaMemcpyKind

        def cudaGetDeviceCount():
            d.calls.append("cudaGetDeviceCount")
            if isinstance(d.devices, cudaError_t):
                return (d.devices, 0)
            return (cudaError_t.cudaSuccess, d.devices)

        def cudaGetErrorString(error):
            return (cudaError_t.cudaSuccess, ERROR_STRINGS[cudaError_t(int(error))])

        def cudaGetDeviceProperties(device):
            d.calls.append("cudaGetDeviceProperties")
            return (cudaError_t.cudaSuccess, d.props) if int(device) == 0 else (cudaError_t.cudaErrorInvalidValue, None)

        def cudaMalloc(size):
            return d._alloc(d.device, size, "cudaMalloc")

        def cudaMallocHost(size):
            return d._alloc(d.pinned, size, "cudaMallocHost")

        def cudaFree(devPtr):  # noqa: N803
            return d._free(d.device, devPtr, "cudaFree")

        def cudaFreeHost(ptr):
            return d._free(d.pinned, ptr, "cudaFreeHost")

        def cudaMemcpyAsync(dst, src, count, kind, stream):
            err = d._failed("cudaMemcpyAsync")
            if err is not None:
                return (err,)
            dst, src, count = int(dst), int(src), int(count)
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                dev_ok, host = d._within(d.device, dst, count), src
            elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
                dev_ok, host = d._within(d.device, src, count), dst
            else:
                raise NotImplementedError(f"the double copies host<->device only, not {kind!r}")
            if not dev_ok or int(stream) not in d.streams:
                return (cudaError_t.cudaErrorInvalidValue,)
            if not d._within(d.pinned, host, count):
                d.pageable_copies += 1
            d.enqueue(stream, lambda: ctypes.memmove(dst, src, count))
            return (cudaError_t.cudaSuccess,)

        def cudaStreamCreate():
            err = d._failed("cudaStreamCreate")
            if err is not None:
                return (err, None)
            h = d._handle()
            d.streams[h] = []
            return (cudaError_t.cudaSuccess, h)

        def cudaStreamSynchronize(stream):
            d.calls.append("cudaStreamSynchronize")
            if int(stream) not in d.streams:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            d._run(int(stream))
            return (cudaError_t.cudaSuccess,)

        def cudaStreamDestroy(stream):
            d.calls.append("cudaStreamDestroy")
            return (cudaError_t.cudaSuccess,) if d.streams.pop(int(stream), None) is not None else (
                cudaError_t.cudaErrorInvalidResourceHandle,)

        def cudaEventCreate():
            err = d._failed("cudaEventCreate")
            if err is not None:
                return (err, None)
            h = d._handle()
            d.events[h] = None
            return (cudaError_t.cudaSuccess, h)

        def cudaEventRecord(event, stream):
            event, stream = int(event), int(stream)
            if event not in d.events or stream not in d.streams:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            d.events[event] = None
            d.enqueue(stream, _EventMark(d, event))
            return (cudaError_t.cudaSuccess,)

        def cudaEventSynchronize(event):
            for stream, ops in d.streams.items():
                mark = next((op for op in ops if isinstance(op, _EventMark) and op.event == int(event)), None)
                if mark is not None:
                    d._run(stream, upto=mark)
            if int(event) not in d.events:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            return (cudaError_t.cudaSuccess,)

        def cudaEventElapsedTime(start, end):
            t0, t1 = d.events.get(int(start)), d.events.get(int(end))
            if t0 is None or t1 is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle, 0.0)
            return (cudaError_t.cudaSuccess, (t1 - t0) * 0.01)

        def cudaEventDestroy(event):
            return (cudaError_t.cudaSuccess,) if d.events.pop(int(event), False) is not False else (
                cudaError_t.cudaErrorInvalidResourceHandle,)

        for fn in (cudaGetDeviceCount, cudaGetErrorString, cudaGetDeviceProperties, cudaMalloc, cudaMallocHost,
                   cudaFree, cudaFreeHost, cudaMemcpyAsync, cudaStreamCreate, cudaStreamSynchronize,
                   cudaStreamDestroy, cudaEventCreate, cudaEventRecord, cudaEventSynchronize,
                   cudaEventElapsedTime, cudaEventDestroy):
            setattr(mod, fn.__name__, fn)
        return mod
