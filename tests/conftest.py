import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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
        return cache[key]

    return get
