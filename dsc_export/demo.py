"""``dsc-export demo``: the whole offline pipeline and a short run-time session on one machine.

export -> analyze (+ chart) -> split (verified) -> engines (onnxruntime, batch 1-16) -> profiles
(device: 1 thread and a labelled slowdown standing for a weak device; server: every core) ->
plan (+ the paper's two heatmaps) -> the tails served on loopback and a short dynamic session
at changing simulated data rates -> a summary of where everything is and what the plan says.

The model: EfficientNet-Lite0 with trained ImageNet weights when the ``weights`` extra is
installed, and then the session runs the real sample photos (:func:`dsc_export.images.sample_photos`)
and reports, per photo, the label through each split it ran on next to the whole model's label;
otherwise EfficientNet-B0 with random weights on random inputs. An explicit model gets its trained
weights when the catalogue names an installed weights package.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsc_export.artifacts import read_manifest, sha256_file, write_json_atomic
from dsc_export.bundle import describe_sizes, side_sizes_of_split
from dsc_export.engines.build import build_engines
from dsc_export.errors import UserError, lazy_import
from dsc_export.export import export_model
from dsc_export.images import top_k
from dsc_export.ort import make_session
from dsc_export.planning import best_static, make_plan
from dsc_export.plots import bottleneck_chart, choice_heatmap, gain_heatmap
from dsc_export.profiling import BenchOptions, profile_split_dir
from dsc_export.serving.bandwidth import SimulatedLink
from dsc_export.serving.client import ClientOptions, DynamicSplitClient
from dsc_export.serving.server import ServeOptions, TailServer, free_ports
from dsc_export.session import Labels, image_feed, random_feed, run_batches
from dsc_export.splitting import analyze_file, split_model
from dsc_export.weights import has_pretrained
from dsc_export.zoo import lookup

DEMO_RATES = (2.0, 20.0, 100.0, 5.0)
DEMO_WIRES = ("float32", "float16", "int8")  # the cut forms split makes
DEMO_OFFLOAD = ("raw", "jpeg95")  # the offload forms: the raw frame, and the JPEG a user would send
DEMO_FLOOR = 0.95  # plan --min-agreement: the lossy forms (int8, JPEG) race only above it
PHOTO_VIEWS = 8  # views (crops, mirror images) of each sample photo: split's sample inputs
TRAINED_MODEL, RANDOM_MODEL = "efficientnet_lite0", "efficientnet_b0"


@dataclass
class DemoReport:
    """What ``run_demo`` did: its output dir, the files it wrote, the plan's summary, the
    simulated session, seconds per step and notes.
    """

    out: Path
    files: dict[str, str] = field(default_factory=dict)
    plan_summary: dict[str, Any] = field(default_factory=dict)
    session: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    weights: str = ""
    labels: list[dict[str, Any]] = field(default_factory=list)  # per photo: whole model's and per split
    # per candidate: wire form, bytes per sample, top-1 agreement on the held-out inputs
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # the plan's share of the grid per candidate without a floor (lossless forms and float16)
    # and with --min-agreement DEMO_FLOOR, and the split share of each
    floors: dict[str, Any] = field(default_factory=dict)

    def wire_lines(self) -> list[str]:
        """What the wire forms did, for the summary (pure)."""
        if not self.candidates:
            return []
        held = next((c["samples"] for c in self.candidates if c["samples"]), 0)
        lines = [f"wire forms (top-1 agreement with the whole model on {held} held-out input(s)):"]
        for c in self.candidates:
            agree = "-" if c["agreement"] is None else f"{c['agreement'] * 100:.1f} %"
            lines.append(f"  {c['id']:16s} {c['wire'] or '-':8s} {c['bytes']:>9,} B/sample  agreement {agree}")
        for name, f in self.floors.items():
            wins = ", ".join(f"{k} {v * 100:.0f} %" for k, v in f["share"].items())
            lines.append(f"plan {name}: a split wins {f['split_share'] * 100:.0f} % of the grid ({wins})")
        return lines


def run_demo(model: str | None = None, out: str | os.PathLike = "engines/demo", *, batch_sizes=(1, 2, 4, 8, 16),
             slowdown: float = 4.0, repeats: int = 5, session_batches: int = 10, serve: bool = True,
             step: Callable[[str], None] = lambda s: None, log: Callable[[str], None] = lambda s: None,
             resolution: int | None = None) -> DemoReport:
    """Run the demo into ``out``; see the module docstring. Returns what was made and concluded.

    ``model`` None: the trained EfficientNet-Lite0 when its weights are installed, else B0 (random).

    Raises:
        UserError: an engine fails to build, or any step's user error (export, split, bench, plan).
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = DemoReport(out)
    if model is None and not has_pretrained(lookup(TRAINED_MODEL)):
        rep.notes.append(f"the trained weights of {TRAINED_MODEL} are not installed (pip install "
                         f"'dsc-export[weights]'); ran {RANDOM_MODEL} with random weights on random inputs")
    entry = lookup(model or (TRAINED_MODEL if has_pretrained(lookup(TRAINED_MODEL)) else RANDOM_MODEL))
    trained = has_pretrained(entry)
    rep.model, rep.weights = entry.name, "trained" if trained else "random"
    onnx_path = out / f"{entry.name}.onnx"
    t = time.perf_counter()

    def done(name: str) -> None:
        nonlocal t
        rep.steps[name] = time.perf_counter() - t
        t = time.perf_counter()

    how = "trained ImageNet weights" if trained else "random weights, BatchNorm re-estimated"
    step(f"1/8 export {entry.name} ({how})")
    if not onnx_path.is_file() or _is_trained(onnx_path) != trained:

        export_model(entry.name, onnx_path, resolution=resolution, log=log, pretrained=trained)
    else:
        log(f"{onnx_path} exists; using it")
    rep.files["model"] = str(onnx_path)
    done("export")

    step("2/8 analyze: cut points, natural and compressive bottlenecks")
    an = analyze_file(onnx_path, log=log)
    rep.files["bottleneck chart"] = str(bottleneck_chart(an, out / "bottlenecks.png"))
    log(an.summary())
    done("analyze")

    step(f"3/8 split at every compressive bottleneck in the wire forms {','.join(DEMO_WIRES)}, with the "
         f"offload forms {','.join(DEMO_OFFLOAD)}, verified against the whole model"
         + (" on the sample photos" if trained else ""))
    split = out / "split"
    photos_dir = _photo_folder(out / "photos", onnx_path) if trained else None
    man = split_model(onnx_path, split, log=log, wires=list(DEMO_WIRES), offload=list(DEMO_OFFLOAD),
                      inputs=photos_dir)
    rep.candidates = [{"id": s.id, "wire": s.wire, "bytes": s.bytes,
                       "agreement": (s.fidelity or {}).get("top1_agreement"),
                       "samples": (s.fidelity or {}).get("samples")} for s in man.splits]
    rep.files["split dir"] = str(split)
    done("split")

    step(f"4/8 build onnxruntime engines for batch sizes {','.join(map(str, batch_sizes))}")
    b = build_engines(split, "onnxruntime", batch_sizes=list(batch_sizes), parts="all", log=log)
    if b.failed:
        raise UserError(f"{len(b.failed)} engine(s) failed to build: {b.failed[0][1]}")

    for side, sizes in side_sizes_of_split(split).items():
        log(describe_sizes(side, sizes))
    done("build")

    step(f"5/8 profile the device side (1 thread, then x{slowdown:g} labelled slowdown for a weak device) "
         "and the server side (every core); the slowest step")
    prof = split / "profiles"
    prof.mkdir(exist_ok=True)
    timing = BenchOptions(batch_sizes=list(batch_sizes), repeats=repeats, warmup=1)
    dev = profile_split_dir(split, "device", replace(timing, threads=1, slowdown=slowdown))
    srv = profile_split_dir(split, "server", timing)
    write_json_atomic(prof / "device.json", dev.to_json())
    write_json_atomic(prof / "server.json", srv.to_json())
    rep.files["device profile"], rep.files["server profile"] = str(prof / "device.json"), str(prof / "server.json")
    done("profile")

    step("6/8 plan: the best split per batch size and data rate, gains, heatmaps")
    hashes = (sha256_file(prof / "device.json"), sha256_file(prof / "server.json"))
    lossless = make_plan(read_manifest(split), dev, srv, profile_hashes=hashes)
    plan = make_plan(read_manifest(split), dev, srv, profile_hashes=hashes, min_agreement=DEMO_FLOOR)
    rep.floors = {"without a floor (lossless forms, float16)": _shares(lossless, man),
                  f"with --min-agreement {DEMO_FLOOR:g}": _shares(plan, man)}
    write_json_atomic(split / "plan.json", plan.to_json())  # the session runs the floored plan
    static = best_static(plan) or "local"
    rep.files["plan"] = str(split / "plan.json")
    rep.files["best-split heatmap (Fig. 2)"] = str(choice_heatmap(plan, out / "best-split.png"))
    rep.files["gain heatmap (Fig. 3)"] = str(gain_heatmap(plan, static, out / f"gain-over-{static}.png"))
    cells = {c: sum(row.count(c) for row in plan.choice) for c in plan.candidates}
    total = sum(cells.values())
    rep.plan_summary = {
        "share_of_cells": {c: n / total for c, n in cells.items() if n},
        "mean_gain": {k: v["mean"] for k, v in plan.gain.items()}, "best_static": static,
        "where": _where(plan),
    }
    done("plan")

    if serve:
        step("7/8 serve the tails on loopback (PyTriton) and run a short dynamic session at changing "
             "simulated rates; starting Triton takes about 10-20 s")
        try:
            rep.session, rep.labels = _session(split, plan, session_batches, log, slowdown, photos=trained)
        except UserError as exc:
            rep.notes.append(f"run-time session skipped: {exc}")
        done("session")
    else:
        rep.notes.append("run-time session skipped (--no-serve)")
    step("8/8 summary")
    write_json_atomic(out / "summary.json", json.dumps({
        "model": entry.name, "weights": rep.weights, "labels": rep.labels, "files": rep.files, "plan": rep.plan_summary,
        "candidates": rep.candidates, "floors": rep.floors, "session": rep.session,
        "seconds": rep.steps, "notes": rep.notes, "device_emulation": dev.emulation}, indent=1) + "\n")
    rep.files["summary"] = str(out / "summary.json")
    return rep


def session_by_rate(rows: list[dict[str, Any]], jump: float = 2.0) -> list[dict[str, Any]]:
    """Per simulated rate of the session (pure): the splits run, the mean measured and predicted
    times, and how many batches at its start were planned at a rate estimate from before the
    change (``stale``: more than ``jump`` times off the median of the rates measured at this rate,
    the client's own readings), with the means over the rest (None when none are left)."""
    out = []
    for rate in dict.fromkeys(r["rate_MBps"] for r in rows):
        run = [r for r in rows if r["rate_MBps"] == rate]
        read = sorted(r["measured_rate_MBps"] for r in run if r.get("measured_rate_MBps"))
        here = read[len(read) // 2] if read else rate
        stale = 0
        while stale < len(run) and not here / jump <= run[stale]["rate_estimate_MBps"] <= here * jump:
            stale += 1
        rest = run[stale:]

        def mean(key, rs):
            return sum(r[key] for r in rs) / len(rs) if rs else None

        out.append({"rate_MBps": rate, "splits": list(dict.fromkeys(r["split"] for r in run)),
                    "measured_ms": mean("measured_ms", run), "predicted_ms": mean("predicted_ms", run),
                    "stale": stale, "rest_measured_ms": mean("measured_ms", rest),
                    "rest_predicted_ms": mean("predicted_ms", rest)})
    return out


def _shares(plan, man) -> dict[str, Any]:
    """The share of the plan's grid each candidate wins, and the share real splits win (pure)."""
    cells = [c for row in plan.choice for c in row]
    share = {c: cells.count(c) / len(cells) for c in plan.candidates if c in cells}
    kinds = {s.id: s.kind for s in man.splits}
    return {"share": share, "split_share": sum(v for c, v in share.items() if kinds[c] == "split")}


def _photo_folder(folder: Path, onnx_path: Path) -> Path:
    """The sample photos, ``PHOTO_VIEWS`` views (crops, mirror images) each, preprocessed for the
    model, as PNG files (lossless) in ``folder``: split's sample inputs, sorted by name, so the
    first half (other photos than the rest) calibrates int8 and the rest measures agreement."""
    import onnx
    from PIL import Image

    from dsc_export.images import Preprocess, sample_photos, variants

    folder.mkdir(parents=True, exist_ok=True)
    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    pre = Preprocess.for_onnx(onnx_path, int(dims[1].dim_value))  # uint8 [N, H, W, 3]: H
    for photo, img in sample_photos():
        views = variants(img)
        for suffix, v in views[::max(1, len(views) // PHOTO_VIEWS)][:PHOTO_VIEWS]:
            Image.fromarray(pre(v)).save(folder / f"{photo}{suffix or '-whole'}.png")
    return folder


def _where(plan) -> dict[str, str]:
    """For each split that wins somewhere: the batch sizes and rates where it wins (ranges)."""
    out = {}
    for c in plan.candidates:
        bs = [b for i, b in enumerate(plan.batch_sizes) if c in plan.choice[i]]
        rs = [r for j, r in enumerate(plan.rates_MBps) if any(row[j] == c for row in plan.choice)]
        if bs:
            out[c] = f"batch {min(bs)}-{max(bs)}, {min(rs):.3g}-{max(rs):.3g} MB/s"
    return out


def _is_trained(onnx_path: Path) -> bool:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return meta.get("dsc_export.weights", "").startswith("trained")


def _session(split: Path, plan, batches_per_rate: int, log, slowdown: float = 1.0,
             photos: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:

    import numpy as np


    lazy_import("pytriton", "serve")
    ports = free_ports(3)
    rows: list[dict[str, Any]] = []
    with TailServer(split, ServeOptions(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                                        log_file=split.parent / "triton.log")) as srv:
        link = SimulatedLink(DEMO_RATES[0])
        batch = 8 if 8 in plan.batch_sizes else plan.batch_sizes[len(plan.batch_sizes) // 2]
        logs = []
        options = ClientOptions(threads=1, initial_rate_MBps=DEMO_RATES[0], device_slowdown=slowdown)
        with DynamicSplitClient(split, srv.urls()["http"], plan, options=options,
                                log=logs.append) as client:
            if not client.endpoints:
                raise UserError("the client could not reach the demo server")
            link.attach(client.endpoints[0].remote)
            client.warm_up(batch)
            shape = [batch] + list(client.manifest.model.input.shape[1:])
            dtype = np.dtype(client.manifest.model.input.dtype)
            feed = image_feed(split / client.manifest.model.path, shape, dtype, max_batches=1) \
                if photos else random_feed(shape, dtype)
            labels = Labels(feed, client.manifest.model.output.name, k=1)

            def set_rate(k: int) -> None:
                link.rate_MBps = DEMO_RATES[k // batches_per_rate]

            count = len(DEMO_RATES) * batches_per_rate
            for k, y in run_batches(client, feed, count, before=set_rate):
                b, rate = logs[-1], DEMO_RATES[k // batches_per_rate]
                got = b.measured_rate_MBps  # this transfer's rate (None: nothing sent)
                if photos:
                    labels.add(k, b.split, y)
                rows.append({"rate_MBps": rate, "batch": b.batch, "split": b.split,
                             "rate_estimate_MBps": round(b.rate_MBps, 2),
                             "measured_rate_MBps": None if got is None else round(got, 2),
                             "predicted_ms": round(b.predicted_ms, 1),
                             "measured_ms": round(b.measured_ms, 1), "fallback": b.fallback})
                log(f"{rate:g} MB/s: batch of {b.batch} -> {b.split} ({b.measured_ms:.0f} ms)")
    if not photos:
        return rows, []

    x = feed.batch(0)
    whole = make_session(split / "model.onnx").run(None, {client.manifest.model.input.name: x})[0]
    tops = top_k(whole[:len(feed.names)], 1)
    out = [{"photo": n, "whole": t[0].name} for n, t in zip(feed.names, tops)]
    for j, row in enumerate(out):
        row["splits"] = {s: top[0].name for s, top in labels.by_image.get(j, {}).items()}
    return rows, out
