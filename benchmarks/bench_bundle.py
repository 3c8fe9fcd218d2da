"""Benchmark: what a bundle weighs and what loading a part from it costs (issue 18).

For each model: split (cached under benchmarks/out/models/), build onnxruntime engines for batch
sizes 1, 2, 4, 8, 16 (engines that are not faster than their ONNX by 5 % dropped, as `build`
does), then report what the engines add to the split dir (their graphs and the blobs no part reads),
write the device and the server bundle and report their bytes against the model,
against the side's distinct source weights and against all its distinct weights files (source
and optimised engine weights). Then the load time of a part from the unpacked bundle: median of
fresh sessions (engine of the whole model at batch 1 and the ONNX of the largest head), the
weights in the shared store; the figure to hold is "within 10 % of the same file with its
weights inside the graph" (today's layout), which is measured side by side.

Targets: bundle --device <= 2x the device side's distinct weights, bundle --server <= 2.5x the
server side's, no engine kept that is not faster than its ONNX by the margin, load within 10 %.

Usage: python benchmarks/bench_bundle.py [--models efficientnet_b0,efficientnetv2_s]
       [--batch-sizes 1,2,4,8,16] [--loads 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import split_dir, write


def _load_ms(path: Path, loads: int) -> float:
    from dsc_export.ort import make_session

    times = []
    for _ in range(loads):
        t = time.perf_counter()
        make_session(path, optimization="none")
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _inline_copy(path: Path, dst: Path) -> Path:
    """The same ONNX file with its weights inside the graph (the layout before issue 18)."""
    import onnx

    model = onnx.load(path)  # reads the external data
    onnx.save_model(model, dst)
    return dst


def measure(name: str, batch_sizes: list[int], loads: int) -> dict:
    from dsc_export.artifacts import read_manifest
    from dsc_export.bundle import make_bundle, open_bundle
    from dsc_export.engines import build_engines

    root = split_dir(name)
    t = time.perf_counter()
    rep = build_engines(root, "onnxruntime", batch_sizes=batch_sizes, parts="all")
    build_s = time.perf_counter() - t
    man = read_manifest(root)
    kept = [e for e in man.engines if e.speed]
    wrongly_kept = [e.path for e in kept if not e.speed["engine_ms"] < e.speed["onnx_ms"] * (1 - e.speed["margin"])]
    from dsc_export.weight_store import tree_bytes

    source_blobs = {d for ds in man.data.values() for d in ds}
    engine_files = sorted({e.path for e in man.engines} | {d for e in man.engines for d in e.data} - source_blobs)
    engines_bytes = tree_bytes([root / f for f in engine_files])  # what the engines add to the split dir
    model_bytes = tree_bytes([root / f for f in man.files_of(man.model.path)])
    print(f"{name} split dir engines: {engines_bytes / 1e6:.1f} MB = {engines_bytes / model_bytes:.2f}x the model",
          flush=True)
    out = {"model": name, "batch_sizes": batch_sizes, "build_s": round(build_s, 1),
           "split_dir_engines": {"bytes": engines_bytes, "x_model": round(engines_bytes / model_bytes, 3),
                                 "files": len(engine_files)},
           "engines_kept": len({e.path for e in man.engines}), "engines_dropped": len({e.path for e in man.dropped}),
           "kept_not_faster_by_margin": wrongly_kept, "failed": len(rep.failed)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = tmp / "plan.json"
        from dsc_export.planning import Plan

        # sizes only: a stand-in plan of this model (a real plan is kilobytes)
        plan.write_text(Plan(batch_sizes=batch_sizes, rates_MBps=[], rtt_ms=0.0, privacy=False, margin=0.0,
                             candidates=[], choice=[], latency_ms={}, gain={}, times={},
                             model_sha256=man.model.sha256, device_profile={}, server_profile={}).to_json())
        for side in ("device", "server"):
            index = make_bundle(root, side, tmp / f"{side}.tar", plan=plan if side == "device" else None)
            sizes = index["sizes"]
            tar_bytes = (tmp / f"{side}.tar").stat().st_size
            out[side] = {**sizes, "tar_bytes": tar_bytes, "tar_x_model": round(tar_bytes / sizes["model"], 3),
                         "tar_x_weights": round(tar_bytes / sizes["weights"], 3),
                         "target_x_weights": 2.0 if side == "device" else 2.5}
            out[side]["met"] = tar_bytes <= out[side]["target_x_weights"] * sizes["weights"]
            print(f"{name} {side}: {tar_bytes / 1e6:.1f} MB = {tar_bytes / sizes['model']:.2f}x the model, "
                  f"{tar_bytes / sizes['weights']:.2f}x the side's distinct weights", flush=True)
        open_bundle(tmp / "device.tar", tmp / "dev", check_backends=False)
        dman = read_manifest(tmp / "dev")
        loads_out = {}
        def weight_bytes(files):
            return sum((tmp / "dev" / d).stat().st_size for d in files)

        # the whole model's engine at batch 1 where it was kept, else the device engine reading the most weights
        engine = dman.engine("local", "head", "onnxruntime", 1) or max(
            dman.engines, key=lambda e: (weight_bytes(e.data), -e.batch), default=None)
        largest_head = max((s.head for s in dman.splits if s.kind == "split"),
                           key=lambda h: weight_bytes(dman.data.get(h, [])))
        engine_label = "engine model b1" if engine and (engine.split, engine.batch) == ("local", 1) else \
            f"engine {engine.split} {engine.part} b{engine.batch}" if engine else ""
        for label, rel in ((engine_label, engine.path if engine else None), ("largest head onnx", largest_head)):
            if rel is None:
                continue
            shared = _load_ms(tmp / "dev" / rel, loads)
            inline = _load_ms(_inline_copy(tmp / "dev" / rel, tmp / "inline.onnx"), loads)
            loads_out[label] = {"shared_ms": round(shared, 1), "inline_ms": round(inline, 1),
                                "ratio": round(shared / inline, 3), "met": shared <= 1.10 * inline}
            print(f"{name} load {label}: {shared:.1f} ms shared weights, {inline:.1f} ms inline "
                  f"({shared / inline:.2f}x)", flush=True)
        out["load"] = loads_out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_b0,efficientnetv2_s")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--loads", type=int, default=5)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = [measure(m, batches, args.loads) for m in args.models.split(",")]
    write("bundle.json", {"rows": rows})  # run_all's summary reads it; copy to results/ to keep a run


if __name__ == "__main__":
    main()
