"""Benchmark: server throughput and tail latency under load, dynamic batching on and off.

8 concurrent clients (threads, each with its own tritonclient HTTP connection) send batch-1
requests of one split's cut tensor to the tails server on loopback for a fixed time; reported:
throughput (samples/s), median and p99 latency, and the batch sizes the server saw. The server
is started twice, one after the other (PyTriton runs one server per machine at a time): with
dynamic batching (max queue delay 2 ms) and without.

Usage: python benchmarks/bench_load.py [--model efficientnet_b0] [--split cut050] [--clients 8]
       [--seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
from common import split_dir, write


def run_load(url: str, split: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    import tritonclient.http as th
    from tritonclient.utils import np_to_triton_dtype

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker():
        c = th.InferenceServerClient(url)
        inp = th.InferInput("input", list(x.shape), np_to_triton_dtype(x.dtype))
        inp.set_data_from_numpy(x, binary_data=True)
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                c.infer(split, [inp])
                mine.append((time.perf_counter() - t) * 1e3)
            except Exception:
                errors[0] += 1
        with lock:
            lat.extend(mine)
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors[0], "throughput_per_s": len(lat) * x.shape[0] / wall,
            "median_ms": statistics.median(lat), "p99_ms": lat[int(0.99 * (len(lat) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--split", default="cut050")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()

    from dsc_export.artifacts import read_manifest
    from dsc_export.ort import make_session, random_array
    from dsc_export.serving.server import ServeOptions, TailServer

    root = split_dir(args.model)
    man = read_manifest(root)
    s = man.split(args.split)
    img = random_array([1] + list(man.model.input.shape[1:]), np.dtype(man.model.input.dtype), np.random.default_rng(0))
    x = img if s.kind == "offload" else make_session(root / s.head).run([s.wire_tensor], {man.model.input.name: img})[0]
    results = {}
    for dyn in (True, False):
        srv = TailServer(root, ServeOptions(threads=2, dynamic_batching=dyn,
                                            log_file=root.parent / "triton-load.log"))
        with srv:
            run_load(srv.urls()["http"], args.split, x, args.clients, 2.0)  # warm-up
            srv.stats = type(srv.stats)()
            r = run_load(srv.urls()["http"], args.split, x, args.clients, args.seconds)
            n = srv.stats.requests.get(args.split, 0)
            r["server_batches"] = n
            r["mean_server_batch"] = srv.stats.samples.get(args.split, 0) / max(n, 1)
        key = "dynamic_batching" if dyn else "no_batching"
        results[key] = r
        print(f"{key:16s}: {r['throughput_per_s']:7.1f} samples/s, median {r['median_ms']:6.1f} ms, "
              f"p99 {r['p99_ms']:6.1f} ms, mean server batch {r['mean_server_batch']:.2f}, errors {r['errors']}",
              flush=True)
    gain = results["dynamic_batching"]["throughput_per_s"] / results["no_batching"]["throughput_per_s"]
    print(f"dynamic batching: {gain:.2f}x the throughput")
    write("load.json", {"model": args.model, "split": args.split, "clients": args.clients, "seconds": args.seconds,
                        "results": results, "throughput_ratio": gain})


if __name__ == "__main__":
    main()
