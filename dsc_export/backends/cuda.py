"""Device memory, streams and event timing through cuda-python (``cuda.bindings``).

This is what NVIDIA's own TensorRT samples use now in place of pycuda. Imported lazily: only
the TensorRT backend and GPU profiling need it; a machine without it gets a one-line message
naming the ``tensorrt`` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsc_export.errors import UserError


def cudart():
    """The CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise UserError("cuda-python is not installed; install the 'tensorrt' extra: "
                            "pip install 'dsc-export[tensorrt]'") from exc
    return runtime


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; a CUDA error becomes a one-line UserError."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, text = rt.cudaGetErrorString(err)
        msg = text.decode() if isinstance(text, bytes) else str(text)
        if int(err) == int(rt.cudaError_t.cudaErrorMemoryAllocation):
            raise OutOfDeviceMemory(f"{what}: {msg}")
        raise UserError(f"{what} failed: {msg} ({err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class OutOfDeviceMemory(UserError):
    """A device allocation failed."""


def device_count() -> int:
    """Number of CUDA devices (0 when the driver or the bindings are missing)."""
    try:
        return check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")
    except UserError:
        return 0


def device_info(index: int = 0) -> dict[str, Any]:
    """Name, compute capability and memory of CUDA device ``index``."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"device": name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_mb": int(props.totalGlobalMem) // 2**20}


class Stream:
    """A CUDA stream (created on enter, destroyed on close)."""

    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceBuffer:
    """``nbytes`` of device memory with host<->device copies on a stream."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes)")

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        host = np.ascontiguousarray(host)
        if host.nbytes != self.nbytes:
            raise ValueError(f"host array has {host.nbytes} bytes, buffer {self.nbytes}")
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "cudaMemcpyAsync H2D")

    def download(self, host: np.ndarray, stream: Stream) -> np.ndarray:
        if host.nbytes != self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous and the buffer's size")
        rt = cudart()
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle), "cudaMemcpyAsync D2H")
        return host

    def free(self) -> None:
        if self.ptr is not None:
            cudart().cudaFree(self.ptr)
            self.ptr = None

    def __int__(self) -> int:
        return int(self.ptr)


class EventTimer:
    """Device-side elapsed time between two events recorded on a stream (what GPU profiling uses)."""

    def __init__(self):
        rt = cudart()
        self.start = check(rt.cudaEventCreate(), "cudaEventCreate")
        self.end = check(rt.cudaEventCreate(), "cudaEventCreate")

    def record_start(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.start, stream.handle), "cudaEventRecord")

    def record_end(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.end, stream.handle), "cudaEventRecord")

    def elapsed_ms(self) -> float:
        rt = cudart()
        check(rt.cudaEventSynchronize(self.end), "cudaEventSynchronize")
        return float(check(rt.cudaEventElapsedTime(self.start, self.end), "cudaEventElapsedTime"))

    def close(self) -> None:
        rt = cudart()
        for ev in (self.start, self.end):
            if ev is not None:
                rt.cudaEventDestroy(ev)
        self.start = self.end = None
