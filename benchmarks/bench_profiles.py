"""Benchmark: device and server profiles of EfficientNet-B0 and V2-B0 on this machine, twice.

The device side runs with 1 thread (recorded as emulation: fewer threads than cores), the
server side with 2. Each profile is taken twice, one after the other, to measure run-to-run
spread. Writes the profiles to benchmarks/out/profiles/ (the plan benchmark reads them) and a
summary to benchmarks/out/profiles.json.

Target (issue 5): the medians of the same profile taken twice within 10% of each other.

Usage: python benchmarks/bench_profiles.py [--models efficientnet_b0,efficientnetv2_b0]
       [--batch-sizes 1,2,4,8,16,32,64] [--min-time 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import OUT, split_dir, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_b0,efficientnetv2_b0")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--min-time", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="onnxruntime", help="engines to build and time (tensorrt on a GPU)")
    args = ap.parse_args()

    from dsc_export.engines import build_engines, parse_batch_sizes
    from dsc_export.profiling import noisy, profile_split_dir

    batches = parse_batch_sizes(args.batch_sizes)
    summary = {}
    for name in args.models.split(","):
        root = split_dir(name)
        build_engines(root, args.backend, batch_sizes=batches, parts="all")
        out = OUT / "profiles"
        out.mkdir(parents=True, exist_ok=True)
        entry = {}
        for role, threads in (("device", 1), ("server", 2)):
            runs = []
            for k in range(2):
                print(f"{name}: {role} profile, {threads} thread(s), run {k + 1}/2 ...", flush=True)
                p = profile_split_dir(root, role, backend_name=args.backend, batch_sizes=batches,
                                      threads=threads if args.backend == "onnxruntime" else None,
                                      warmup=2, repeats=None, min_time_s=args.min_time, rounds=args.rounds)
                (out / f"{name}-{role}{'' if k == 0 else '-rerun'}.json").write_text(p.to_json())
                runs.append(p)
            a, b = runs
            ratios = [b.time_of(t.split, t.part, t.batch).median_ms / t.median_ms for t in a.timings]
            dev = [abs(r - 1) for r in ratios]
            entry[role] = {
                "threads": threads, "emulation": a.emulation,
                "medians_ms": {f"{t.split}/{t.part}/b{t.batch}": round(t.median_ms, 3) for t in a.timings},
                "rerun_max_rel_change": max(dev), "rerun_median_rel_change": float(np.median(dev)),
                "within_10pct": sum(d <= 0.10 for d in dev), "figures": len(dev),
                "noisy": len(noisy(a)),
            }
            print(f"  rerun: median change {np.median(dev) * 100:.1f}%, max {max(dev) * 100:.1f}%, "
                  f"{entry[role]['within_10pct']}/{len(dev)} figures within 10%", flush=True)
        summary[name] = entry
        _table(name, entry)
    met = all(e[r]["within_10pct"] == e[r]["figures"] for e in summary.values() for r in e)
    print(f"target (every median within 10% on the rerun): {'met' if met else 'NOT met'}")
    write("profiles.json", {"backend": args.backend, "rounds": args.rounds, "batch_sizes": batches,
                            "min_time_s": args.min_time, "models": summary, "met": met})


def _table(name: str, entry: dict) -> None:
    dev, srv = entry["device"]["medians_ms"], entry["server"]["medians_ms"]
    splits = sorted({k.split("/")[0] for k in dev} | {k.split("/")[0] for k in srv},
                    key=lambda s: (s != "offload", s == "local", s))
    batches = sorted({int(k.rsplit("/b", 1)[1]) for k in dev})
    print(f"\n{name}: median ms, head on the device (1 thread) | tail on the server (2 threads)")
    print("batch  " + "  ".join(f"{s:>17}" for s in splits))
    for b in batches:
        cells = []
        for s in splits:
            h, t = dev.get(f"{s}/head/b{b}"), srv.get(f"{s}/tail/b{b}")
            cells.append(f"{'-' if h is None else f'{h:.1f}':>8}|{'-' if t is None else f'{t:.1f}':<8}")
        print(f"{b:5d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
