"""Benchmark: export, analyze and split (with verification) of EfficientNet exports.

Each step runs in a fresh Python process that reports its own wall time and peak resident
memory, so one step's memory never counts against another. Writes
``benchmarks/out/split.json`` and prints a table.

Targets (issue 3), on the 2-core project machine: analyze under 2 s for every model; split with
verification of all compressive bottlenecks under 60 s for V2-L and peak memory under 3x the
model file's size.

Usage: python benchmarks/bench_split.py [--models efficientnet_b0,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ["efficientnet_b0", "efficientnet_b4", "efficientnetv2_s", "efficientnetv2_l"]

STEP = r"""
import json, resource, sys, time
t = time.perf_counter()
step, model, arg = sys.argv[1], sys.argv[2], sys.argv[3]
if step == "baseline":  # the fixed cost: interpreter, numpy, onnx, onnxruntime, our modules
    import onnxruntime, dsc_export.splitting  # noqa: F401
    extra = {}
elif step == "export":
    from dsc_export.export import export_model
    export_model(model, arg)
    extra = {}
elif step == "analyze":
    from dsc_export.splitting import analyze_file
    an = analyze_file(model)
    extra = {"cut_points": len(an.cut_points), "natural": len(an.natural),
             "compressive": len(an.compressive)}
else:
    from dsc_export.splitting import split_model
    man = split_model(model, arg)
    extra = {"splits": sum(1 for s in man.splits if s.kind == "split"),
             "max_rel_diff": max((s.max_rel_diff or 0) for s in man.splits)}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - t, "peak_bytes": peak, **extra}))
"""


def step(name: str, model: str, arg: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, name, model, arg], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} {model} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    baseline = step("baseline", "-", "-")["peak_bytes"]
    print(f"baseline process peak: {baseline / 1e6:.0f} MB", flush=True)
    for name in args.models.split(","):
        onnx_path = out / "models" / f"{name}.onnx"
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {name}", flush=True)
        exp = step("export", name, str(onnx_path))
        size = onnx_path.stat().st_size
        ana = step("analyze", str(onnx_path), "-")
        spl = step("split", str(onnx_path), str(out / "splits" / name))
        row = {
            "model": name, "file_MB": size / 1e6,
            "export_s": exp["seconds"], "analyze_s": ana["seconds"], "analyze_peak_MB": ana["peak_bytes"] / 1e6,
            "split_s": spl["seconds"], "split_peak_MB": spl["peak_bytes"] / 1e6,
            "split_peak_x_file": spl["peak_bytes"] / size,
            "split_peak_above_baseline_x_file": (spl["peak_bytes"] - baseline) / size,
            "cut_points": ana["cut_points"], "natural": ana["natural"], "compressive": ana["compressive"],
            "max_rel_diff": spl["max_rel_diff"],
        }
        rows.append(row)
        print("   " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    result = {
        "benchmark": "split", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "targets": {"analyze_s": 2.0, "split_s_v2_l": 60.0, "split_peak_x_file": 3.0},
        "baseline_peak_MB": baseline / 1e6,
        "rows": rows,
    }
    (out / "split.json").write_text(json.dumps(result, indent=2) + "\n")
    hdr = (f"{'model':18} {'MB':>7} {'export s':>9} {'analyze s':>9} {'split s':>8} {'peak MB':>8} "
           f"{'peak/file':>9} {'(-base)':>8} {'cuts':>5} {'nat':>4} {'comp':>4}")
    print(hdr)
    for r in rows:
        print(f"{r['model']:18} {r['file_MB']:7.1f} {r['export_s']:9.1f} {r['analyze_s']:9.2f} "
              f"{r['split_s']:8.1f} {r['split_peak_MB']:8.0f} {r['split_peak_x_file']:9.2f} "
              f"{r['split_peak_above_baseline_x_file']:8.2f} "
              f"{r['cut_points']:5d} {r['natural']:4d} {r['compressive']:4d}")
    print(f"wrote {out / 'split.json'}")


if __name__ == "__main__":
    main()
