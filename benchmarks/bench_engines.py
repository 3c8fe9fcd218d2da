"""Benchmark: onnxruntime engines against the same ONNX run as it is, and the cost of cutting.

For EfficientNet-B0, at every batch size: the median time of each head and tail engine (batch
fixed, optimisations saved) against the same ONNX with its dynamic batch dimension; and at each
compressive bottleneck the ratio (head + tail) / whole model, both as engines. Runs are
interleaved (whole, then every head and tail, repeated) so slow drift of a noisy machine hits
every figure alike. Then the thread-pool spinning effect: three sessions in one process.

Target (issue 4): the ratio at most 1.05 at every cut and batch size on the 2-core machine.

Usage: python benchmarks/bench_engines.py [--model efficientnet_b0] [--batch-sizes 1,2,4,...]
       [--threads 2] [--min-time 1.0]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import split_dir, timed, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of runs per figure (at least 7 runs)")
    args = ap.parse_args()

    from dsc_export.artifacts import read_manifest
    from dsc_export.engines import build_engines, load_engine, parse_batch_sizes
    from dsc_export.graph.wire import wire_elem_dtype
    from dsc_export.ort import make_session, random_array

    root = split_dir(args.model)
    batches = parse_batch_sizes(args.batch_sizes)
    print(f"building onnxruntime engines for {batches} ...", flush=True)
    build_engines(root, "onnxruntime", batch_sizes=batches, parts="all")
    man = read_manifest(root)
    splits = [s for s in man.splits if s.kind == "split"]
    cps = {c.tensor: c for c in man.cut_points}
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        x = random_array([b] + man.model.input.shape[1:], np.dtype(man.model.input.dtype), rng)
        runs = {}  # name -> (callable)
        whole_e = load_engine(root, man.engine("local", "head", "onnxruntime", b), args.threads)
        whole_e.activate()
        whole_o = make_session(root / man.model.path, args.threads)
        runs["whole/engine"] = lambda r=whole_e: r.infer({man.model.input.name: x})
        runs["whole/onnx"] = lambda s=whole_o: s.run(None, {man.model.input.name: x})
        keep = [whole_e]
        for s in splits:
            cp = cps[s.tensor]  # the tail reads its wire form's dtype (float16, int8)
            wire = np.dtype(wire_elem_dtype(cp.dtype, s.wire or man.wire_dtype))
            z = random_array([b] + cp.shape, wire, rng)
            for part, src, feed in (("head", s.head, {man.model.input.name: x}), ("tail", s.tail, {s.wire_tensor: z})):
                eng = load_engine(root, man.engine(s.id, part, "onnxruntime", b), args.threads)
                eng.activate()
                keep.append(eng)
                sess = make_session(root / src, args.threads)
                runs[f"{s.id}/{part}/engine"] = lambda r=eng, f=feed: r.infer(f)
                runs[f"{s.id}/{part}/onnx"] = lambda q=sess, f=feed: q.run(None, f)
        for fn in runs.values():  # warm-up
            fn()
            fn()
        samples = {k: [] for k in runs}
        one_round = sum(timed(fn) for fn in runs.values()) / 1e3
        rounds = max(7, int(args.min_time / max(one_round / len(runs), 1e-6)))
        rounds = min(rounds, max(7, int(60 / max(one_round, 1e-6))))  # at most about a minute per batch size
        for _ in range(rounds):
            for k, fn in runs.items():
                samples[k].append(timed(fn))
        med = {k: float(np.median(v)) for k, v in samples.items()}
        for r in keep:
            r.deactivate()
        for s in splits:
            he, te = med[f"{s.id}/head/engine"], med[f"{s.id}/tail/engine"]
            ho, to = med[f"{s.id}/head/onnx"], med[f"{s.id}/tail/onnx"]
            rows.append({"batch": b, "split": s.id, "rounds": rounds,
                         "head_engine_ms": he, "head_onnx_ms": ho, "tail_engine_ms": te, "tail_onnx_ms": to,
                         "whole_engine_ms": med["whole/engine"], "whole_onnx_ms": med["whole/onnx"],
                         "cut_ratio": (he + te) / med["whole/engine"]})
        print(f"batch {b:3d}: whole engine {med['whole/engine']:8.2f} ms, onnx {med['whole/onnx']:8.2f} ms "
              f"({rounds} rounds)", flush=True)

    print()
    print(f"{'batch':>5} {'split':>7} {'head eng':>9} {'head onnx':>9} {'tail eng':>9} {'tail onnx':>9} "
          f"{'whole eng':>9} {'(h+t)/whole':>11}")
    for r in rows:
        print(f"{r['batch']:5d} {r['split']:>7} {r['head_engine_ms']:9.2f} {r['head_onnx_ms']:9.2f} "
              f"{r['tail_engine_ms']:9.2f} {r['tail_onnx_ms']:9.2f} {r['whole_engine_ms']:9.2f} {r['cut_ratio']:11.3f}")
    worst = max(rows, key=lambda r: r["cut_ratio"])
    met = worst["cut_ratio"] <= 1.05
    print(f"worst (head+tail)/whole: {worst['cut_ratio']:.3f} at {worst['split']} batch {worst['batch']} "
          f"(target <= 1.05: {'met' if met else 'NOT met'})")
    eng_vs_onnx = [r["whole_engine_ms"] / r["whole_onnx_ms"] for r in rows[:: max(1, len(splits))]]
    print("whole-model engine / ONNX per batch size: " + ", ".join(f"{v:.2f}" for v in eng_vs_onnx))

    spin = spinning(root, man, args.threads)
    write("engines.json", {"model": args.model, "threads": args.threads, "rows": rows,
                           "worst_cut_ratio": worst["cut_ratio"], "target_cut_ratio": 1.05, "met": met,
                           "spinning": spin})


def spinning(root, man, threads: int) -> dict:
    """Three sessions in one process (a head, a tail and the whole model, run in turn, as a client
    with local fallback does): the whole model's batch-1 time with idle threads spinning or not."""
    from dsc_export.ort import make_session, random_array

    s = next(s for s in man.splits if s.kind == "split")
    x = random_array([1] + man.model.input.shape[1:], np.dtype(man.model.input.dtype), np.random.default_rng(1))
    out = {}
    for spinning_on in (True, False):
        whole = make_session(root / man.model.path, threads, spinning=spinning_on)
        head = make_session(root / s.head, threads, spinning=spinning_on)
        tail = make_session(root / s.tail, threads, spinning=spinning_on)
        alone = make_session(root / man.model.path, threads, spinning=spinning_on)
        z = head.run(None, {man.model.input.name: x})[0]
        for _ in range(3):
            whole.run(None, {man.model.input.name: x})
        t_whole = []
        for _ in range(30):
            head.run(None, {man.model.input.name: x})
            tail.run(None, {s.wire_tensor: z})
            t_whole.append(timed(lambda: whole.run(None, {man.model.input.name: x})))
        whole = head = tail = None  # release their thread pools before timing the lone session
        t_alone = [timed(lambda: alone.run(None, {man.model.input.name: x})) for _ in range(30)]
        key = "spinning" if spinning_on else "no_spinning"
        out[key] = {"whole_after_other_sessions_ms": float(np.median(t_whole)),
                    "whole_alone_ms": float(np.median(t_alone))}
        print(f"{key:12s}: whole model batch 1 after a head and a tail ran: {np.median(t_whole):.2f} ms; "
              f"alone: {np.median(t_alone):.2f} ms", flush=True)
    out["slowdown_spinning_vs_not"] = (out["spinning"]["whole_after_other_sessions_ms"]
                                       / out["no_spinning"]["whole_after_other_sessions_ms"])
    print(f"spinning costs {out['slowdown_spinning_vs_not']:.2f}x (allow_spinning=0 is what dsc-export uses)")
    return out


if __name__ == "__main__":
    main()
