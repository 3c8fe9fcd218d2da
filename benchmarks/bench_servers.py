"""Benchmark: N = 8 emulated devices against one and against two tails servers.

Each server is ``dsc-export serve`` with one CPU thread per tail (one batch at a time, dynamic
batching on, ``--instances`` = N / servers request handlers per model, at most ``--instances``
(4): more make PyTriton's per-instance handshakes fail to start on a busy 2-core machine; a
request beyond them waits in Triton's queue, unmeasured, and counts as wire time), on loopback
(no link shaping: the servers' load, not the link, is what this measures). The devices are
separate processes running the load-aware :class:`~dsc_export.serving.client.DynamicSplitClient`,
closed loop (each sends its next batch once the last one is answered), given one URL or both:
with two, each batch goes to the server and split predicted fastest from that server's (rate, q, s).

**Device emulation (labelled in the results).** As bench_fleet.py (the helpers in common.py): a
device's compute is *replayed* from its profile — it sleeps for the profiled head time (1 thread)
x ``--device-slowdown`` — and sends the real cut tensors (each split's head run once per input
beforehand); every answer is checked against the whole model's output for that input.

Reported per number of servers: mean and p95 latency per batch, samples/s, the share of each split
and of each server, fallbacks. The machine this runs on may be shared: the servers, the devices
and anything else on it compete for its cores (said in the JSON and in the printout).

Profiles: benchmarks/out/profiles/MODEL-{device,server}.json when bench_profiles.py wrote them
with the batch size, else quick ones taken here (batch ``--batch`` only, 1 thread each).

Usage: python benchmarks/bench_servers.py [--quick] [--model efficientnet_b0] [--batch 4]
       [--devices 8] [--seconds 30] [--device-slowdown 4] [--instances 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, OUT, new_result, run_devices, split_dir, stop, summarize, workspace, write

RESULTS = HERE / "results"


def start_servers(root: Path, n: int, instances: int, log_dir: Path,
                  tries: int = 3) -> tuple[list[subprocess.Popen], list[str]]:
    """``n`` × ``dsc-export serve --threads 1`` on free loopback ports, one after the other, each
    ready (dsc_load); a start that fails (PyTriton's handshakes on a busy machine) is retried."""
    procs, urls = [], []
    try:
        for k in range(n):
            for attempt in range(tries):
                proc, url = _start_one(root, instances, log_dir, k)
                if proc is not None:
                    break
                print(f"server {k} did not start (attempt {attempt + 1}); see {log_dir / f'server-{k}.err'}",
                      flush=True)
                time.sleep(5.0)
            else:
                raise SystemExit(f"server {k} did not start; see {log_dir / f'server-{k}.err'}")
            procs.append(proc)
            urls.append(url)
    except BaseException:
        stop_servers(procs)
        raise
    return procs, urls


def _start_one(root: Path, instances: int, log_dir: Path, k: int) -> tuple[subprocess.Popen | None, str]:
    import tritonclient.http as th

    from dsc_export.serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsc_export", "serve", str(root), "--threads", "1", "--instances", str(instances),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--triton-log", str(log_dir / f"triton-{k}.log")],
        cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(log_dir / f"server-{k}.err", "w"))
    url = f"127.0.0.1:{http}"
    c = th.InferenceServerClient(url)
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                if c.is_server_ready() and c.is_model_ready("dsc_load"):
                    return proc, url
            except Exception:
                pass
            time.sleep(0.5)
    finally:
        c.close()
    stop_servers([proc])
    return None, url


def stop_servers(procs: list[subprocess.Popen]) -> None:
    """Stop each server (SIGTERM), then kill what is left of its process group: the Python-backend
    stubs PyTriton started, which outlive it otherwise."""
    for p in procs:
        stop(p)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def profiles(root: Path, model: str, batch: int):
    """(device, server) profiles that cover ``batch``: bench_profiles.py's, else quick ones."""
    from dsc_export.artifacts import read_profile
    from dsc_export.engines import build_engines
    from dsc_export.profiling import profile_split_dir

    prof = OUT / "profiles"
    paths = [prof / f"{model}-{role}.json" for role in ("device", "server")]
    if all(p.is_file() for p in paths):
        dev, srv = (read_profile(p) for p in paths)
        if all(any(t.batch == batch for t in p.timings) for p in (dev, srv)):
            return dev, srv
    print(f"quick profiles of {model} at batch {batch} (1 thread each) ...", flush=True)
    build_engines(root, "onnxruntime", [batch], "all")
    dev = profile_split_dir(root, "device", batch_sizes=[batch], repeats=5, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", batch_sizes=[batch], repeats=5, warmup=1, threads=1)
    return dev, srv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 s per phase")
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="per number of servers")
    ap.add_argument("--device-slowdown", type=float, default=4.0)
    ap.add_argument("--instances", type=int, default=4,
                    help="most request handlers per model and server (at most N / servers are used)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 10.0
    signal.signal(signal.SIGTERM, lambda *a: sys.exit("terminated"))  # stop the servers on the way out

    from dsc_export.artifacts import read_manifest
    from dsc_export.planning import make_plan

    root = split_dir(args.model)
    man = read_manifest(root)
    dev, srv = profiles(root, args.model, args.batch)
    k = args.device_slowdown
    log_dir, tmp, cache = workspace("servers", root, man, args.batch)
    results, plan = {}, None
    for n_servers in (1, 2):
        instances = min(args.instances, -(-args.devices // n_servers))  # PyTriton's stubs race beyond a few
        procs, urls = start_servers(root, n_servers, instances, tmp)
        try:
            if plan is None:
                from bench_e2e import measure_rtt_ms

                rtt = measure_rtt_ms(urls[0])
                plan = make_plan(man, dev.scaled(k), srv, batch_sizes=[args.batch], rtt_ms=rtt)
                (tmp / "plan.json").write_text(plan.to_json())
                print(f"rtt {rtt:.2f} ms (loopback); device replayed at {k:g}x its 1-thread profile; idle-server "
                      f"plan at batch {args.batch}: {plan.choose(args.batch, 1000.0)[0]}", flush=True)
            base = {"root": str(root), "url": ",".join(urls), "plan": str(tmp / "plan.json"), "cache": str(cache),
                    "inputs": 2, "initial_rate": 1000.0, "static": None}
            t0 = time.time() + 3.0  # every device has loaded its client by then
            window = [(t0, t0 + args.seconds)]
            print(f"{args.devices} devices, {n_servers} server(s), {args.seconds:g} s ...", flush=True)
            per_device, _ = run_devices(base, tmp, f"s{n_servers}", ["aware"] * args.devices,
                                        [window] * args.devices)
        finally:
            stop_servers(procs)
        records = [r for d in per_device for r in d]
        summ = summarize(records, plan, args.seconds, args.batch)
        shares = {}
        for r in records:
            key = r["server"] or "here"
            shares[key] = shares.get(key, 0) + 1
        summ["server_share"] = {("here" if u == "here" else f"server {urls.index(u)}"): c / len(records)
                                for u, c in sorted(shares.items())}
        summ["retried"] = sum(1 for r in records if r["tries"])
        summ["instances_per_server"] = instances
        results[str(n_servers)] = summ
        print(f"  {summ['batches']} batches: mean {summ['mean_ms']:.1f} ms, p95 {summ['p95_ms']:.1f} ms, "
              f"{summ['samples_per_s']:.1f} samples/s; splits {summ['share']}; servers {summ['server_share']}",
              flush=True)
    print(f"\n{args.devices} devices, batch {args.batch}, {args.model} (device replayed at {k:g}x)")
    print("servers  batches  mean ms  p95 ms  samples/s  here   max |diff|")
    for n, s in results.items():
        print(f"{n:>7}  {s['batches']:7d}  {s['mean_ms']:7.1f}  {s['p95_ms']:6.1f}  {s['samples_per_s']:9.1f}  "
              f"{s['server_share'].get('here', 0.0):4.0%}  {s['max_abs_diff']:.2e}")
    cores = os.cpu_count()
    note = (f"{cores} CPU cores shared by the servers, the {args.devices} device processes and anything else "
            "running on the machine: the figures are noisy and say how one server's load spreads over two, "
            "not what two machines would give")
    print(note)
    payload = {"model": args.model, "batch": args.batch, "devices": args.devices, "seconds": args.seconds,
               "device_slowdown": k, "emulation": "device compute replayed from its 1-thread profile x slowdown",
               "servers": "dsc-export serve --threads 1 --instances min(--instances, ceil(N / servers)) (loopback)",
               "note": note,
               "plan_rtt_ms": plan.rtt_ms, "results": results}
    path = write("servers.json", payload)
    dest = new_result(RESULTS, f"servers-cpu-{cores}core-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}")
    dest.write_text(path.read_text())
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
