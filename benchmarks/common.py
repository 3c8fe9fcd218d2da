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

import numpy as np

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
    """Terminate a server process (it shuts down cleanly on SIGTERM); kill it if it hangs; then
    kill any Python-backend stub it left (they ignore SIGTERM and outlive a killed server)."""
    from dsc_export.serving.processes import kill_stubs

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    kill_stubs(proc.pid)


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


def new_result(folder: Path, stem: str) -> Path:
    """``folder/stem.json``, or ``stem-2.json``, ``-3``, ... if taken: a run never overwrites the
    results of an earlier one (the docs cite them)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, k = folder / f"{stem}.json", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.json", k + 1
    return path


# --- emulated devices (bench_fleet.py, bench_servers.py) ------------------------------------------

def worker(cfg_path: str) -> None:
    """One device: a DynamicSplitClient with replayed device compute, closed loop, between the
    given wall-clock times; writes one JSON line per batch."""
    from dataclasses import asdict

    from dsc_export.planning import Plan
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    cfg = json.loads(Path(cfg_path).read_text())
    plan = Plan.from_dict(json.loads(Path(cfg["plan"]).read_text()))
    cache = dict(np.load(cfg["cache"]))
    inputs = [cache[f"x{i}"] for i in range(cfg["inputs"])]
    policy = cfg["policy"]
    kw = {"load_aware": policy != "blind", "privacy": bool(cfg.get("privacy"))}
    if policy in ("aware", "selfish"):  # against herding: move to a better pair with probability 0.3 per batch
        kw["switch_p"] = float(os.environ.get("DSC_SWITCH_P", "0.3"))
        # aware: charged the delays its requests add to other devices' (ClientOptions' default, or
        # DSC_WAIT_PRICE); selfish: not
        if policy == "selfish" or os.environ.get("DSC_WAIT_PRICE"):
            kw["wait_price"] = float(os.environ["DSC_WAIT_PRICE"]) if policy == "aware" else 0.0
    # oracle: pinned by a schedule [(from time, split)], one split per rate of the link
    pinned = cfg.get("pin_schedule")
    if pinned:
        kw["static"] = pinned[0][1]
    elif policy not in ("aware", "selfish", "blind"):
        kw["static"] = cfg["static"] if policy == "static" else policy
    if cfg.get("pin"):
        kw["static"] = cfg["pin"]
    logs = []
    options = ClientOptions(threads=1, deadline_s=30, initial_rate_MBps=cfg["initial_rate"],
                            ready_timeout_s=120, **kw)
    client = DynamicSplitClient(cfg["root"], cfg["url"], plan, options=options, log=logs.append)
    in_name = client.manifest.model.input.name

    def replay(split):  # the plan's head times are the device profile x the slowdown already
        def run(feeds, outputs=None):
            i = next(j for j, a in enumerate(inputs) if a is feeds[in_name])
            time.sleep(plan.parts_ms(split, len(inputs[i]))[0] / 1e3)
            return [cache[f"{split}_{i}"]]
        return run

    for sid, runner in client._heads.items():
        runner.run = replay(sid)
    client._whole.run = replay("local")
    out = open(cfg["log"], "w")
    for t0, t1 in cfg["windows"]:
        while time.time() < t0:
            time.sleep(0.005)
        n = 0
        while time.time() < t1:
            if pinned:
                now = time.time()
                client.static = next((sp for t, sp in reversed(pinned) if t <= now), pinned[0][1])
            i = n % len(inputs)
            got = client.infer(inputs[i])
            ref = cache[f"local_{i}"]
            y = got[client.contract[0].name]
            diff = float(np.abs(y - ref).max())
            rec = asdict(logs[-1])
            rec.update(t=time.time(), diff=diff, same_top1=bool((y.argmax(-1) == ref.argmax(-1)).all()))
            out.write(json.dumps(rec) + "\n")
            n += 1
        out.flush()
    out.close()
    client.close()


def prepare_cache(root: Path, man, batch: int, n_inputs: int, path: Path) -> None:
    """Real inputs, each split's real cut tensor for them, and the whole model's outputs."""
    from dsc_export.ort import make_session, random_array

    rng = np.random.default_rng(0)
    arrays = {}
    whole = make_session(root / man.model.path)
    for i in range(n_inputs):
        x = random_array([batch] + list(man.model.input.shape[1:]), np.dtype(man.model.input.dtype), rng)
        arrays[f"x{i}"] = x
        arrays[f"local_{i}"] = whole.run(None, {man.model.input.name: x})[0]
        for s in man.splits:
            if s.kind == "split":
                head = make_session(root / s.head)
                arrays[f"{s.id}_{i}"] = head.run([s.wire_tensor], {man.model.input.name: x})[0]
    np.savez(path, **arrays)


def workspace(name: str, root: Path, man, batch: int) -> tuple[Path, Path, Path]:
    """benchmarks/out/NAME/ and a fresh run folder in it holding ``cache.npz``
    (:func:`prepare_cache`, 2 inputs): (log dir, run folder, cache)."""
    import tempfile

    log_dir = OUT / name
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=log_dir))
    cache = tmp / "cache.npz"
    print(f"preparing real inputs, cut tensors and reference outputs (batch {batch}) ...", flush=True)
    prepare_cache(root, man, batch, 2, cache)
    return log_dir, tmp, cache


def run_devices(base: dict, tmp: Path, tag: str, policies: list[str], windows: list[list[tuple[float, float]]],
                link=None, schedule=None, url: str | None = None,
                extra: list[dict] | None = None) -> tuple[list[list[dict]], list]:
    """Start one process per device (``policies[d]``, active in ``windows[d]``, with ``extra[d]`` in
    its settings: an oracle's ``pin_schedule``), change the link's
    rate by ``schedule`` [(time, rate)], ask the server's load every second while they run (with
    ``url``), and return each device's batch records and the load answers [(time, ServerLoad)]."""
    procs, logs = [], []
    for d, (pol, win) in enumerate(zip(policies, windows)):
        cfg = {**base, **(extra[d] if extra else {}), "policy": pol, "windows": win,
               "log": str(tmp / f"{tag}-{d}.jsonl")}
        (tmp / f"{tag}-{d}.json").write_text(json.dumps(cfg))
        logs.append(Path(cfg["log"]))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from common import worker; worker(sys.argv[1])",
             str(tmp / f"{tag}-{d}.json")], cwd=HERE, stderr=open(tmp / f"{tag}-{d}.err", "w")))
    loads, todo = [], list(schedule or [])
    next_poll = time.time() + 1.0
    while any(p.poll() is None for p in procs):
        now = time.time()
        if todo and now >= todo[0][0]:
            link.set_rate(todo.pop(0)[1])
        if url and now >= next_poll:
            next_poll = now + 1.0
            try:
                loads.append((now, server_load(url)))
            except Exception:
                pass
        time.sleep(0.01)
    for d, p in enumerate(procs):
        if p.returncode != 0:
            raise SystemExit(f"device {d} of {tag} failed: {(tmp / f'{tag}-{d}.err').read_text()[-1500:]}")
    return [[json.loads(line) for line in p.read_text().splitlines()] for p in logs], loads


def server_load(url: str):
    from dsc_export.serving.transport import connect

    r = connect(url, "http", 5.0)
    try:
        return r.load()
    finally:
        r.close()


def summarize(records: list[dict], plan, seconds: float, batch: int) -> dict:
    """Latency, throughput, split shares, predicted against measured per component."""
    lat = sorted(r["measured_ms"] for r in records)
    if not lat:
        return {"batches": 0}
    shares = {}
    for r in records:
        shares[r["split"]] = shares.get(r["split"], 0) + 1

    def predicted(r):
        if r["split"] == "local":
            return {"head": plan.parts_ms("local", r["batch"])[0], "wire": 0.0, "queue": 0.0, "tail": 0.0}
        h, t = plan.parts_ms(r["split"], r["batch"])
        nbytes = plan.times[r["split"]]["bytes"] * r["batch"]
        return {"head": h, "wire": nbytes / (r["rate_MBps"] * 1e3) + plan.rtt_ms, "queue": r["q_ms"],
                "tail": r["s"] * t}

    comp_pred = {c: statistics.mean(predicted(r)[c] for r in records) for c in ("head", "wire", "queue", "tail")}
    comp_meas = {"head": statistics.mean(r["head_ms"] if r["split"] != "local" else r["measured_ms"] for r in records),
                 "wire": statistics.mean(r["wire_ms"] for r in records),
                 "queue": statistics.mean(r["queue_ms"] for r in records),
                 "tail": statistics.mean(r["server_ms"] for r in records)}
    pred = statistics.mean(r["predicted_ms"] for r in records)
    return {"batches": len(records), "mean_ms": statistics.mean(lat), "p95_ms": lat[int(0.95 * (len(lat) - 1))],
            "samples_per_s": len(records) * batch / seconds, "predicted_mean_ms": pred,
            "error": statistics.mean(lat) / pred - 1, "share": {s: n / len(records) for s, n in sorted(shares.items())},
            "component_predicted_ms": comp_pred, "component_measured_ms": comp_meas,
            "outputs_checked": len(records), "outputs_top1_agree": sum(r["same_top1"] for r in records),
            "max_abs_diff": max(r["diff"] for r in records),
            "fallbacks": sum(1 for r in records if r["fallback"])}
