"""Device memory, streams and event timing through cuda-python (``cuda.bindings``).

This is what NVIDIA's own TensorRT samples use now in place of pycuda. Imported lazily: only
the TensorRT backend and GPU profiling need it; a machine without it gets a one-line message
naming the ``tensorrt`` extra.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import numpy as np

from dsc_export.errors import BackendError, BackendUnavailable, UserError

CU12_HINT = ("no NVIDIA driver, or one older than this CUDA runtime: the 'tensorrt' extra's CUDA 13 wheels "
             "need driver 580 or newer; on a CUDA 12 machine or a Jetson install 'dsc-export[tensorrt-cu12]'")


def cudart():
    """The CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6).

    Raises:
        BackendUnavailable: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed; install the 'tensorrt' extra: "
                            "pip install 'dsc-export[tensorrt]'") from exc
    return runtime


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; a CUDA error becomes a one-line BackendError.

    Raises:
        OutOfDeviceMemory: a CUDA allocation failed.
        BackendError: any other CUDA error.
    """
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, text = rt.cudaGetErrorString(err)
        msg = text.decode() if isinstance(text, bytes) else str(text)
        if int(err) == int(rt.cudaError_t.cudaErrorMemoryAllocation):
            raise OutOfDeviceMemory(f"{what}: {msg}")
        raise BackendError(f"{what} failed: {msg} ({err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class OutOfDeviceMemory(BackendError):
    """A device allocation failed."""


def device_count() -> int:
    """Number of CUDA devices (0 when the driver or the bindings are missing)."""
    try:
        return 0 if no_device_reason() else check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")
    except UserError:
        return 0


def no_device_reason() -> str | None:
    """None when CUDA sees a device, else one line with CUDA's own error string.

    ``cudaGetDeviceCount`` tells a missing GPU (``cudaErrorNoDevice``) from a driver older than
    the runtime (``cudaErrorInsufficientDriver``: cuda-python 13 on a CUDA 12 driver); the
    latter gets the hint to install the CUDA 12 extra.

    Raises:
        BackendUnavailable: cuda-python is not installed.
    """
    rt = cudart()
    err, *rest = rt.cudaGetDeviceCount()
    if int(err) == 0:
        return None if rest and int(rest[0]) > 0 else "CUDA sees no GPU (cudaGetDeviceCount: 0 devices)"
    _, text = rt.cudaGetErrorString(err)
    msg = text.decode() if isinstance(text, bytes) else str(text)
    hint = f"; {CU12_HINT}" if int(err) == int(rt.cudaError_t.cudaErrorInsufficientDriver) else ""
    return f"CUDA reports: {msg} ({getattr(err, 'name', err)}){hint}"


def device_info(index: int = 0) -> dict[str, Any]:
    """Name, compute capability and memory of CUDA device ``index``, as an engine's target
    records them (``device``, ``compute_capability``, ``memory_mb``): :func:`gpu_facts` with
    the CUDA runtime's answer.

    Raises:
        BackendUnavailable: cuda-python is missing.
        BackendError: the CUDA runtime cannot read the device.
    """
    facts = _runtime_facts(index)
    return {"device": facts["name"], "compute_capability": facts["compute_capability"],
            "memory_mb": facts["memory_mb"]}


def gpu_facts(index: int = 0, *, runtime: bool = False) -> dict[str, Any] | None:
    """The package's one reader of GPU facts, with one set of keys.

    Keys (those the sources answer): ``name``, ``compute_capability``, ``memory_mb``,
    ``driver``, ``sm_clock_mhz``, ``mem_clock_mhz``, ``max_sm_clock_mhz`` (MHz, current and
    the SM's maximum). NVML (nvidia-ml-py) answers, else ``nvidia-smi``.

    Args:
        index: the GPU's index.
        runtime: also ask the CUDA runtime (cuda-python), whose name, compute capability and
            memory then win (the device CUDA binds to); its errors propagate.

    Returns:
        The facts; None when nothing answers (no GPU, no NVML, no nvidia-smi).
    """
    try:
        import pynvml
    except ImportError:
        pynvml = None
    facts = (_nvml_facts(pynvml, index) if pynvml is not None else _smi_facts(index)) or {}
    if runtime:
        facts.update(_runtime_facts(index))
    return facts or None


def _runtime_facts(index: int) -> dict[str, Any]:
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_mb": int(props.totalGlobalMem) // 2**20}


def _nvml_facts(pynvml, index: int) -> dict[str, Any] | None:
    """GPU ``index``'s name, clocks and driver through NVML; None when NVML does not answer."""
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = {"name": text(pynvml.nvmlDeviceGetName(h)),
                "sm_clock_mhz": int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                "mem_clock_mhz": int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                "max_sm_clock_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
                "driver": text(pynvml.nvmlSystemGetDriverVersion())}
        with contextlib.suppress(Exception):
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            info["compute_capability"] = f"{major}.{minor}"
        return info
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def text(v) -> str:
    """An NVML string (bytes in older bindings) as text."""
    return v.decode() if isinstance(v, bytes) else str(v)


def _smi_facts(index: int) -> dict[str, Any] | None:
    """GPU ``index``'s name, clocks and driver from ``nvidia-smi``; None when it does not answer."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}",
                              "--query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, sm, mem, smax, drv = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")]
    return {"name": name, "sm_clock_mhz": int(sm), "mem_clock_mhz": int(mem), "max_sm_clock_mhz": int(smax),
            "driver": drv}


class Stream:
    """A CUDA stream (created on enter, destroyed on close).

    Host memory that an asynchronous copy reads or writes must outlive the copy: :meth:`keep`
    holds a reference until the next :meth:`synchronize`.
    """

    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self._in_flight: list[Any] = []

    def keep(self, obj: Any) -> None:
        """Hold ``obj`` (a host array an enqueued copy uses) until the stream synchronizes."""
        self._in_flight.append(obj)

    def synchronize(self) -> None:
        """Wait until every operation queued on the stream is done, then drop the kept host arrays.

        Raises:
            BackendError: a CUDA error.
        """
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")
        self._in_flight.clear()

    def close(self) -> None:
        """Destroy the stream (idempotent)."""
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
        """Queue a copy of ``host`` (exactly the buffer's size) to the device on ``stream``.

        Raises:
            ValueError: ``host`` has another size in bytes.
            BackendError: a CUDA error.
        """
        host = np.ascontiguousarray(host)
        if host.nbytes != self.nbytes:
            raise ValueError(f"host array has {host.nbytes} bytes, buffer {self.nbytes}")
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "cudaMemcpyAsync H2D")
        stream.keep(host)  # may be a temporary copy: it must live until the copy has run

    def download(self, host: np.ndarray, stream: Stream) -> np.ndarray:
        """Queue a copy of the buffer into ``host`` (C-contiguous, the buffer's size) on ``stream``;
        returns ``host``, valid after the stream's next :meth:`Stream.synchronize`.

        Raises:
            ValueError: ``host`` has another size or is not C-contiguous.
            BackendError: a CUDA error.
        """
        if host.nbytes != self.nbytes or not host.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous and the buffer's size")
        rt = cudart()
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle), "cudaMemcpyAsync D2H")
        stream.keep(host)
        return host

    def free(self) -> None:
        """Free the device memory (idempotent)."""
        if self.ptr is not None:
            cudart().cudaFree(self.ptr)
            self.ptr = None

    def __int__(self) -> int:
        return int(self.ptr)


class PinnedArray:
    """A numpy array in page-locked host memory (``cudaMallocHost``), freed by :meth:`free`.

    Copies between pinned memory and the device run truly asynchronously and at full bus
    speed; NVIDIA's samples (``common_runtime.py``, ``HostDeviceMem``) stage every input and
    output through such a buffer.

    Raises:
        OutOfDeviceMemory / BackendError: ``cudaMallocHost`` failed.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.ptr = check(cudart().cudaMallocHost(max(nbytes, 1)), f"cudaMallocHost({nbytes} bytes)")
        raw = (ctypes.c_ubyte * max(nbytes, 1)).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, np.uint8, count=nbytes).view(dtype).reshape(shape)

    def free(self) -> None:
        """Drop the array and free its page-locked host memory (idempotent)."""
        if self.ptr is not None:
            self.array = None
            cudart().cudaFreeHost(self.ptr)
            self.ptr = None


class EventTimer:
    """Device-side elapsed time between two events recorded on a stream (what GPU profiling uses)."""

    def __init__(self):
        rt = cudart()
        self.start = check(rt.cudaEventCreate(), "cudaEventCreate")
        try:
            self.end = check(rt.cudaEventCreate(), "cudaEventCreate")
        except UserError:
            rt.cudaEventDestroy(self.start)
            raise

    def record_start(self, stream: Stream) -> None:
        """Record the start event on ``stream``.

        Raises:
            BackendError: a CUDA error.
        """
        check(cudart().cudaEventRecord(self.start, stream.handle), "cudaEventRecord")

    def record_end(self, stream: Stream) -> None:
        """Record the end event on ``stream``.

        Raises:
            BackendError: a CUDA error.
        """
        check(cudart().cudaEventRecord(self.end, stream.handle), "cudaEventRecord")

    def elapsed_ms(self) -> float:
        """Milliseconds between the start and end events, waiting for the end event.

        Raises:
            BackendError: a CUDA error.
        """
        rt = cudart()
        check(rt.cudaEventSynchronize(self.end), "cudaEventSynchronize")
        return float(check(rt.cudaEventElapsedTime(self.start, self.end), "cudaEventElapsedTime"))

    def close(self) -> None:
        """Destroy both events (idempotent)."""
        rt = cudart()
        for ev in (self.start, self.end):
            if ev is not None:
                rt.cudaEventDestroy(ev)
        self.start = self.end = None
