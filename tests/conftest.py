import gc
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _freeze_heap() -> None:
    """Collect, then move every object alive now into the collector's permanent generation.

    ``split_model`` calls ``gc.collect()`` about ten times per split (``release_freed_memory``);
    a full collection walks every tracked object, and once torch, timm and the servers' clients
    are imported that is ~0.1-0.5 s each: the synthetic-graph splits took 2-8 s instead of 0.2 s
    after any test that imported torch. Frozen objects are skipped by later collections; what a
    test creates is still collected, and ``_thaw_heap`` at each module's end collects the rest.
    """
    gc.collect()
    gc.freeze()


def _freezes(item) -> bool:
    """A module sets ``FREEZE_HEAP = False`` where freezing was seen to break it (test_server_load:
    after test_real_models a PyTriton model's handshake was refused with the heap frozen)."""
    return item is not None and getattr(item.module, "FREEZE_HEAP", True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if _freezes(item):
        _freeze_heap()  # what imports and fixtures left: the test's own collections skip it
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        if nextitem is None or nextitem.module is not item.module:  # module fixtures are gone
            gc.unfreeze()
            gc.collect()
            if _freezes(nextitem):
                gc.freeze()


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("DSC_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or DSC_SLOW=1")
    skip_trt = pytest.mark.skip(reason="TensorRT Python package not installed (extra 'tensorrt')")
    skip_gpu = pytest.mark.skip(reason="no NVIDIA GPU visible (nvidia-smi / CUDA)")
    has_gpu = Path("/dev/nvidiactl").exists()
    netns_why = None
    if any("netns" in item.keywords for item in items):
        from dsc_export.serving.bandwidth import permitted

        netns_why = permitted()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "tensorrt" in item.keywords and not _has("tensorrt"):
            item.add_marker(skip_trt)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "netns" in item.keywords and netns_why:
            item.add_marker(pytest.mark.skip(reason=netns_why))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export a catalogue model once per test session (needs the 'export' extra)."""
    pytest.importorskip("timm", reason="the 'export' extra (torch, timm) is not installed")
    from dsc_export.export import export_model

    cache = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            cache[key] = export_model(name, out, **kw)
            _freeze_heap()  # torch and timm are in now; a fixture that splits next skips them
        return cache[key]

    return get
