"""Benchmark: dynamic split computing end to end over a real shaped link.

The server (tails, 2 threads) runs inside a network namespace; the device client (heads and
whole model, 1 thread) runs here and reaches it through a veth pair shaped with tc (tbf). The
link's rate steps through phases (default 2 -> 20 -> 100 -> 5 MB/s). In each phase the dynamic
client runs (after warm-up batches that let its rate estimate settle), then every static
choice (local, offload, each split) on the same link. For each phase: the dynamic client's
measured mean latency next to the plan's prediction (at the rate set on the link) and next to
what each static choice measured.

Targets (issue 7): measured within 15 % of predicted in each steady phase; dynamic at least as
fast as the best static choice overall.

Needs root (network namespaces) and the profiles of bench_profiles.py.

Usage: python benchmarks/bench_e2e.py [--model efficientnet_b0] [--batch 8] [--rates 2,20,100,5]
       [--batches 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from common import HERE, OUT, shaped_setup, stop, write


def wait_ready(url: str, proc, timeout: float = 180) -> None:
    import tritonclient.http as th

    c = th.InferenceServerClient(url)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if c.is_server_ready() and c.is_model_ready("dsc_meta"):
                c.close()
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def measure_rtt_ms(url: str) -> float:
    import tritonclient.http as th

    c = th.InferenceServerClient(url)
    ping = th.InferInput("ping", [1, 1], "INT32")
    ping.set_data_from_numpy(np.zeros((1, 1), np.int32))
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        c.infer("dsc_meta", [ping])
        ts.append((time.perf_counter() - t) * 1e3)
    c.close()
    return statistics.median(ts[5:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rates", default="2,20,100,5")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="batches of each phase before it counts as steady")
    ap.add_argument("--device-slowdown", type=float, default=4.0,
                    help="the device stands for a K-times slower one than this machine on 1 thread (labelled "
                         "emulation on both the profile and the client, as the paper's 300 MHz GPU)")
    args = ap.parse_args()

    from dsc_export.ort import random_array
    from dsc_export.planning import make_plan
    from dsc_export.serving.bandwidth import ShapedLink
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    setup = shaped_setup(args.model)
    if setup is None:
        return
    root, man, _, _, dev, srv = setup
    k = args.device_slowdown
    if k != 1:  # what bench --slowdown K records: every device time x K, labelled
        dev = dev.scaled(k)
    rates = [float(r) for r in args.rates.split(",")]
    log_dir = OUT / "e2e"
    log_dir.mkdir(parents=True, exist_ok=True)

    with ShapedLink(rates[0]) as link:
        proc = subprocess.Popen(link.exec_argv([sys.executable, "-m", "dsc_export", "serve", str(root), "--host",
                                                link.server_ip, "--threads", "2", "--triton-log",
                                                str(log_dir / "triton.log")]),
                                cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"{link.server_ip}:8000"
            wait_ready(url, proc)
            link.set_rate(1000.0)
            rtt = measure_rtt_ms(url)
            link.set_rate(rates[0])
            plan = make_plan(man, dev, srv, rtt_ms=rtt)
            print(f"request overhead (rtt) on the link: {rtt:.2f} ms; plan made with it; device emulated as "
                  f"{k:g}x slower than this machine on 1 thread", flush=True)
            cells = {c: sum(row.count(c) for row in plan.choice) for c in plan.candidates}
            print(f"plan at batch {args.batch}: " + ", ".join(
                f"{r:g} MB/s -> {plan.choose(args.batch, r * 0.96)[0]}" for r in rates) + f"; cells {cells}",
                flush=True)
            rng = np.random.default_rng(0)
            shape = [args.batch] + list(man.model.input.shape[1:])
            dtype = np.dtype(man.model.input.dtype)
            statics = [s.id for s in man.splits]
            logs: list = []
            dynamic = DynamicSplitClient(root, url, plan, options=ClientOptions(
                threads=1, deadline_s=30, initial_rate_MBps=rates[0], device_slowdown=k), log=logs.append)
            dynamic.warm_up(args.batch)
            static_clients = {}
            for s in statics:
                static_clients[s] = DynamicSplitClient(root, url, plan, options=ClientOptions(
                    threads=1, deadline_s=30, static=s, device_slowdown=k))
                static_clients[s].warm_up(args.batch)
            phases = []
            for rate in rates:
                link.set_rate(rate)
                start = len(logs)
                for _ in range(args.warmup + args.batches):
                    dynamic.infer(random_array(shape, dtype, rng))
                steady = logs[start + args.warmup:]
                measured = statistics.mean(b.measured_ms for b in steady)
                predicted_at_link = statistics.mean(plan.choose(args.batch, rate * 0.96, None,
                                                                exclude=set(plan.candidates) - {b.split})[1]
                                                    for b in steady)
                choices = {s: sum(1 for b in steady if b.split == s) for s in {b.split for b in steady}}
                static_ms = {}
                for s, client in static_clients.items():
                    slogs = []
                    client.log = slogs.append
                    for _ in range(1 + max(3, args.batches // 2)):
                        client.infer(random_array(shape, dtype, rng))
                    static_ms[s] = statistics.mean(b.measured_ms for b in slogs[1:])
                err = measured / predicted_at_link - 1
                phases.append({"rate_MBps": rate, "choices": choices, "measured_ms": measured,
                               "predicted_ms": predicted_at_link, "error": err, "static_ms": static_ms,
                               "rate_estimates": [round(b.rate_MBps, 2) for b in logs[start:]],
                               "batches": [b.__dict__ for b in logs[start:]]})
                print(f"{rate:6.1f} MB/s: dynamic {measured:7.1f} ms (predicted {predicted_at_link:7.1f}, "
                      f"{err * 100:+5.1f} %), chose {choices}; static: "
                      + ", ".join(f"{s} {v:.1f}" for s, v in static_ms.items()), flush=True)
            for c in [dynamic, *static_clients.values()]:
                c.close()
        finally:
            stop(proc)

    n = len(phases)
    dyn_total = sum(p["measured_ms"] for p in phases) / n
    static_total = {s: sum(p["static_ms"][s] for p in phases) / n for s in statics}
    best = min(static_total, key=static_total.get)
    within = all(abs(p["error"]) <= 0.15 for p in phases)
    beats = dyn_total <= static_total[best] * 1.0
    print(f"\nmean over phases: dynamic {dyn_total:.1f} ms; best static {best} {static_total[best]:.1f} ms; "
          + ", ".join(f"{s} {v:.1f}" for s, v in static_total.items()))
    print(f"targets: within 15% of predicted in every phase: {'met' if within else 'NOT met'}; "
          f"dynamic at least as fast as the best static: {'met' if beats else 'NOT met'}")
    write("e2e.json", {"model": args.model, "batch": args.batch, "rtt_ms": rtt, "device_slowdown": k, "phases": phases,
                       "dynamic_mean_ms": dyn_total, "static_mean_ms": static_total, "best_static": best,
                       "met": {"within_15pct": within, "dynamic_beats_best_static": beats}})
    (log_dir / "phases.json").write_text(json.dumps(phases, indent=1, default=str))


if __name__ == "__main__":
    main()
