"""Benchmark: the plan's run-time lookup and grid build, and the plan of real B0 profiles.

- ``Plan.choose(batch, rate)`` per call, at random batch sizes and rates (off the grid), median
  over many calls (target: under 20 us in Python on this machine), and the same with a server
  state (``q_ms``, ``s``: the extended Eq. 4 the load-aware client uses);
- building the full default grid (batch 1-64 x 64 rates, 1-128 MB/s) for 5 candidates + local:
  median over repeats (target: under 100 ms);
- with the profiles written by bench_profiles.py (if present): the plan, both heatmaps and the
  mean gains, written under benchmarks/out/plan/.

Usage: python benchmarks/bench_plan.py [--model efficientnet_b0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import OUT, write


def synthetic(n_splits: int = 4):
    from dsc_export.artifacts import Manifest, ModelRef, Profile, Split, TensorSig, Timing

    rng = np.random.default_rng(0)
    sha = "00" * 32
    ids = [f"cut{k:03d}" for k in range(n_splits)]
    splits = ([Split(id="offload", kind="offload", tensor=None, head=None, tail="model.onnx", bytes=150528,
                     max_abs_diff=0.0)]
              + [Split(id=i, kind="split", tensor=f"t{i}", head="h", tail="t", bytes=int(rng.integers(5000, 120000)),
                       max_abs_diff=0.0) for i in ids]
              + [Split(id="local", kind="local", tensor=None, head="model.onnx", tail=None, bytes=0, max_abs_diff=0.0)])
    sig = TensorSig(name="image", shape=["N", 224, 224, 3], dtype="uint8")
    man = Manifest(ModelRef(path="model.onnx", sha256=sha, input=sig, output=sig, input_bytes=150528), "float32", [],
                   splits)
    batches = [1, 2, 4, 8, 16, 32, 64]
    dev = [Timing(split="local", part="head", batch=b, median_ms=12.0 * b, p10_ms=0, p90_ms=0, runs=5) for b in batches]
    srv = [Timing(split="offload", part="tail", batch=b, median_ms=3.0 * b, p10_ms=0, p90_ms=0, runs=5)
           for b in batches]
    for k, i in enumerate(ids):
        f = (k + 1) / (n_splits + 1)
        dev += [Timing(split=i, part="head", batch=b, median_ms=12.0 * b * f, p10_ms=0, p90_ms=0, runs=5)
                for b in batches]
        srv += [Timing(split=i, part="tail", batch=b, median_ms=3.0 * b * (1 - f), p10_ms=0, p90_ms=0, runs=5)
                for b in batches]
    return (man, Profile("device", "onnxruntime", {}, None, sha, dev),
            Profile("server", "onnxruntime", {}, None, sha, srv))


def report(plan, stem, title: str, label: str) -> dict:
    """Both heatmaps of ``plan`` beside ``stem``; print and return cells per split and mean gains."""
    from dsc_export.planning import best_static
    from dsc_export.plots import choice_heatmap, gain_heatmap

    static = best_static(plan)
    choice_heatmap(plan, f"{stem}-best-split.png", title)
    gain_heatmap(plan, static, f"{stem}-gain-over-{static}.png")
    gains = {b: g["mean"] for b, g in plan.gain.items()}
    counts = {c: sum(row.count(c) for row in plan.choice) for c in plan.candidates}
    print(f"{label}: cells per split {counts}; mean gain " +
          ", ".join(f"{b} {v * 100:.1f}%" for b, v in gains.items()) + f"; best static {static}")
    return {"cells_per_split": counts, "mean_gain": gains, "best_static": static}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    args = ap.parse_args()
    from dsc_export.planning import make_plan

    man, dev, srv = synthetic(4)  # offload + 4 splits + local
    builds = []
    for _ in range(15):
        t = time.perf_counter()
        plan = make_plan(man, dev, srv)
        builds.append((time.perf_counter() - t) * 1e3)
    grid = (len(plan.batch_sizes), len(plan.rates_MBps), len(plan.candidates))
    rng = np.random.default_rng(1)
    queries = [(int(b), float(r))
               for b, r in zip(rng.integers(1, 65, 20000), np.exp(rng.uniform(0, np.log(128), 20000)))]
    plan.choose(1, 1.0)  # the per-batch table is prepared on first use
    per_call = []
    for k in range(0, len(queries), 1000):
        chunk = queries[k:k + 1000]
        t = time.perf_counter()
        for b, r in chunk:
            plan.choose(b, r)
        per_call.append((time.perf_counter() - t) / len(chunk) * 1e6)
    loaded = []
    for k in range(0, len(queries), 1000):
        chunk = queries[k:k + 1000]
        t = time.perf_counter()
        for b, r in chunk:
            plan.choose(b, r, "cut001", q_ms=12.5, s=1.7)
        loaded.append((time.perf_counter() - t) / len(chunk) * 1e6)
    choose_us, build_ms = statistics.median(per_call), statistics.median(builds)
    loaded_us = statistics.median(loaded)
    print(f"Plan.choose: {choose_us:.2f} us per call (median of {len(per_call)} x 1000 calls; target < 20 us)")
    print(f"Plan.choose with a server state (q, s) and a current split: {loaded_us:.2f} us per call (target < 20 us)")
    print(f"make_plan, grid {grid[0]} batch sizes x {grid[1]} rates x {grid[2]} candidates: "
          f"{build_ms:.1f} ms (median of {len(builds)}; target < 100 ms)")
    result = {"choose_us": choose_us, "choose_with_server_state_us": loaded_us, "build_ms": build_ms, "grid": grid,
              "met": {"choose_under_20us": max(choose_us, loaded_us) < 20, "build_under_100ms": build_ms < 100}}

    prof = OUT / "profiles"
    dev_p, srv_p = prof / f"{args.model}-device.json", prof / f"{args.model}-server.json"
    if dev_p.is_file() and srv_p.is_file():

        from dsc_export.artifacts import read_manifest, read_profile, sha256_file

        root = OUT / "models" / args.model / "split"
        dev, srv = read_profile(dev_p), read_profile(srv_p)
        real = make_plan(read_manifest(root), dev, srv, profile_hashes=(sha256_file(dev_p), sha256_file(srv_p)))
        out = OUT / "plan"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.model}.json").write_text(real.to_json())
        result["real_plan"] = {"model": args.model, **report(
            real, out / args.model, f"{args.model}: best split (device 1 thread, server 2 threads, this machine)",
            f"{args.model} plan")}
        # the same with the device standing for one 4x slower (as the paper's 300 MHz GPU), labelled
        slow = dev.scaled(4.0)
        result["real_plan_device_x4"] = report(
            make_plan(read_manifest(root), slow, srv), out / f"{args.model}-slow4",
            f"{args.model}: best split, device emulated 4x slower (1 thread x 4), server 2 threads",
            f"{args.model} plan, device x4")
    write("plan.json", result)


if __name__ == "__main__":
    main()
