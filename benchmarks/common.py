"""Helpers shared by the benchmark scripts: models to measure, timing, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent))


def machine() -> dict:
    from dsc_export.ort import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def split_dir(name: str) -> Path:
    """Export ``name`` (random weights) and split it under benchmarks/out/models/, once."""
    from dsc_export.export import export_model
    from dsc_export.splitting import split_model

    root = OUT / "models" / name
    onnx_path = root / f"{name}.onnx"
    out = root / "split"
    if (out / "manifest.json").is_file():
        from dsc_export.artifacts import read_manifest
        from dsc_export.errors import UserError

        try:
            read_manifest(out)
        except UserError as exc:  # written by an older dsc-export: split again
            print(f"{out}: {exc}", flush=True)
            (out / "manifest.json").unlink()
    if not (out / "manifest.json").is_file():
        if not onnx_path.is_file():
            print(f"exporting {name} ...", flush=True)
            export_model(name, onnx_path)
        print(f"splitting {name} ...", flush=True)
        split_model(onnx_path, out)
    return out


def shaped_setup(model: str):
    """What the shaped-link benchmarks start from: None (having printed ``skipped: why``) where
    this machine does not permit network namespaces, else the split dir, its manifest and the
    device and server profiles bench_profiles.py wrote (paths and profiles).

    Raises:
        SystemExit: no profiles yet.
    """
    from dsc_export.artifacts import read_manifest, read_profile
    from dsc_export.serving.bandwidth import permitted

    why = permitted()
    if why:
        print(f"skipped: {why}")
        return None
    root = split_dir(model)
    prof = OUT / "profiles"
    dev_p, srv_p = prof / f"{model}-device.json", prof / f"{model}-server.json"
    if not (dev_p.is_file() and srv_p.is_file()):
        raise SystemExit(f"no profiles of {model} in {prof}: run benchmarks/bench_profiles.py first")
    return root, read_manifest(root), dev_p, srv_p, read_profile(dev_p), read_profile(srv_p)


def stop(proc, timeout: float = 60) -> None:
    """Terminate a server process (it shuts down cleanly on SIGTERM); kill it if it hangs."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def write(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
