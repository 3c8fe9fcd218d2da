"""GPU checks (marker ``gpu``): cuda-python memory, streams and event timing; NVML host info.

They run where an NVIDIA GPU is visible and skip elsewhere. Nothing here changes the GPU's
clocks, power or compute mode: clock locking is tested with a fake NVML in test_profiling.py.
"""

import re
import time

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (extra 'tensorrt')")
    from dsc_export.backends import cuda

    if cuda.device_count() == 0:
        pytest.skip("cuda-python sees no CUDA device")
    return cuda


def test_device_info_names_the_gpu(cuda):
    info = cuda.device_info()
    assert info["device"] and re.fullmatch(r"\d+\.\d+", info["compute_capability"])
    assert info["memory_mb"] > 1024


def test_host_device_round_trip_on_a_stream(cuda):
    rng = np.random.default_rng(0)
    for dtype, shape in ((np.float32, (64, 112, 112, 3)), (np.uint8, (3, 224, 224, 3)), (np.float16, (7, 1280))):
        host = (rng.standard_normal(shape) * 50).astype(dtype)
        back = np.zeros_like(host)
        buf = cuda.DeviceBuffer(host.nbytes)
        with cuda.Stream() as stream:
            buf.upload(host, stream)
            buf.download(back, stream)
            stream.synchronize()
        buf.free()
        assert np.array_equal(host, back)


def test_pinned_staging_round_trip_and_a_temporary_kept_until_sync(cuda):
    host = np.arange(2 * 3 * 224 * 224, dtype=np.float32).reshape(2, 3, 224, 224)
    pin_in, pin_out = cuda.PinnedArray(host.shape, host.dtype), cuda.PinnedArray(host.shape, host.dtype)
    buf = cuda.DeviceBuffer(host.nbytes)
    try:
        with cuda.Stream() as stream:
            np.copyto(pin_in.array, host)
            buf.upload(pin_in.array, stream)
            buf.download(pin_out.array, stream)
            stream.synchronize()
            assert np.array_equal(pin_out.array, host)
            buf.upload(host[:, ::-1], stream)  # not contiguous: a temporary the stream keeps
            buf.download(pin_out.array, stream)
            stream.synchronize()
            assert np.array_equal(pin_out.array, host[:, ::-1])
    finally:
        buf.free()
        pin_in.free()
        pin_out.free()


def test_event_timer_agrees_with_torch_events(cuda):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()

    class TorchStream:  # our EventTimer records on any stream handle
        handle = torch.cuda.current_stream().cuda_stream

    ours, theirs, walls = [], [], []
    timer = cuda.EventTimer()
    for _ in range(10):
        t0 = time.perf_counter()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        timer.record_start(TorchStream)
        s.record()
        for _ in range(5):
            a = (a @ a).clamp_(-1, 1)
        e.record()
        timer.record_end(TorchStream)
        ours.append(timer.elapsed_ms())
        torch.cuda.synchronize()
        theirs.append(s.elapsed_time(e))
        walls.append((time.perf_counter() - t0) * 1e3)
    timer.close()
    o, t = float(np.median(ours)), float(np.median(theirs))
    assert o > 0.05 and abs(o - t) / t < 0.05, (o, t)
    assert o <= float(np.median(walls)) * 1.01


def test_nvml_host_info_reads_name_and_clocks():
    from dsc_export.backends.cuda import gpu_facts as gpu_info
    from dsc_export.profiling import host_info

    info = gpu_info()
    if info is None:
        pytest.skip("neither NVML (nvidia-ml-py) nor nvidia-smi answers here")
    assert info["name"] and info["sm_clock_mhz"] > 0 and info["max_sm_clock_mhz"] >= info["sm_clock_mhz"]
    assert host_info(None, "tensorrt")["gpu"]["name"] == info["name"]
