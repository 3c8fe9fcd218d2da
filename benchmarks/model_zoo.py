"""Benchmark: the model zoo as a user sees it (issue 12).

torchvision and timm architectures (random weights, nothing downloaded), each exported with
both of torch's exporters (TorchScript, ``dynamo=False``; and ``dynamo=True``, torch's default
since 2.9), dynamic batch on axis 0, eval mode. For each export: ``analyze`` (median of 3,
in-process, target < 2 s on the 2-core project machine), ``split`` (with its own verification),
and an INDEPENDENT check of every split written: head then tail with onnxruntime, compared with
the whole model run by onnxruntime at batch sizes 1 and 2 on other random inputs
(:func:`dsc_export.compare.compare` with :func:`dsc_export.compare.tolerance`).

Robust and resumable:

- exports are cached in ``benchmarks/out/zoo/models/<model>.<exporter>/`` (an export that fails
  in torch is cached as ``<model>.<exporter>.failed.json``; ``--retry-failed`` tries again);
- each model/exporter runs in its own process (a crash is recorded, the run goes on) and writes
  ``benchmarks/out/zoo/rows/<model>.<exporter>.json``; ``--resume`` keeps rows already there;
- ``docs/models.md``, ``benchmarks/out/zoo.json`` and ``benchmarks/results/zoo-cpu-<n>core-<date>.json``
  are written from every row present, so a partial run (``--models``) updates its rows only.

A failure of analyze or split is recorded as its one line; an exception other than the tool's
own errors (UserError, VerificationError) is a bug and is recorded with its type (the traceback
goes to ``benchmarks/out/zoo/logs/``).

Usage: python benchmarks/model_zoo.py [--models a,b] [--exporters torchscript,dynamo] [--out DIR]
       [--only-analyze] [--resume] [--retry-failed] [--keep-splits] [--no-docs] [--compare JSON]

``--compare benchmarks/results/zoo-cpu-2core-<date>.json`` lists the exports whose cut points
(tensor, size, natural, compressive) changed since that run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

EXPORTERS = ("torchscript", "dynamo")
ANALYZE_RUNS = 3
ANALYZE_TARGET_S = 2.0
CHECK_BATCHES = (1, 2)
CHECK_SEED = 1234  # not the split's own seed (0): other inputs than its verification's
EXPORT_TIMEOUT_S = 1800
JOB_TIMEOUT_S = 3600
EXPORT_RTOL = 1e-3  # onnxruntime against torch, as dsc_export.export does


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the table: where it comes from and its usual input size."""

    name: str
    source: str  # "torchvision", "segmentation" (torchvision.models.segmentation) or "timm"
    resolution: int = 224


MODELS = [
    ZooModel("resnet50", "torchvision"),
    ZooModel("resnext50_32x4d", "torchvision"),
    ZooModel("mobilenet_v3_large", "torchvision"),
    ZooModel("mnasnet1_0", "torchvision"),
    ZooModel("shufflenet_v2_x1_0", "torchvision"),
    ZooModel("squeezenet1_1", "torchvision"),
    ZooModel("densenet121", "torchvision"),
    ZooModel("googlenet", "torchvision"),
    ZooModel("inception_v3", "torchvision", 299),
    ZooModel("regnet_y_400mf", "torchvision"),
    ZooModel("efficientnet_v2_s", "torchvision"),
    ZooModel("convnext_tiny", "torchvision"),
    ZooModel("vit_b_16", "torchvision"),
    ZooModel("swin_t", "torchvision"),
    ZooModel("maxvit_t", "torchvision"),
    # segmentation: 224 keeps them cheap (their usual 520 changes nothing about the graph's shape)
    ZooModel("lraspp_mobilenet_v3_large", "segmentation"),
    ZooModel("deeplabv3_mobilenet_v3_large", "segmentation"),
    ZooModel("fcn_resnet50", "segmentation"),
    ZooModel("efficientnet_b0", "timm"),
]
BY_NAME = {m.name: m for m in MODELS}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")


# ---------------------------------------------------------------- export (own process)


def export_one(name: str, exporter: str, dest: Path) -> dict:
    """Build ``name`` with random weights and export it to ``dest/model.onnx`` (run in a child process).

    Returns:
        Metadata (seconds, torch version, file size, onnxruntime-vs-torch difference).
    """
    import warnings

    import numpy as np
    import torch

    from dsc_export.compare import compare
    from dsc_export.export import recalibrate_batchnorm

    spec = BY_NAME[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    if spec.source == "timm":
        import timm

        net = timm.create_model(name, pretrained=False)
    elif spec.source == "segmentation":
        import torchvision

        net = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
    else:
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
    res = spec.resolution
    # random BatchNorm statistics make deep models blow up: re-estimate them (weights untouched)
    recalibrate_batchnorm(torch, net, lambda: torch.randn(2, 3, res, res, generator=gen), batches=2)

    class Tensor(torch.nn.Module):
        """The model with one tensor output (segmentation models return {"out": ..., "aux": ...})."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            y = self.net(image)
            return y["out"] if isinstance(y, dict) else y

    model = Tensor(net).eval()
    example = torch.randn(2, 3, res, res, generator=gen)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = tmp / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(input_names=["image"], output_names=["out"],
                  dynamic_axes={"image": {0: "N"}, "out": {0: "N"}})
        if exporter == "torchscript":
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=False, opset_version=17, **kw)
        else:
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, **kw)
    seconds = time.perf_counter() - t0
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in CHECK_BATCHES:
        x = torch.randn(b, 3, res, res, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        c = compare([ref], sess.run(None, {"image": x.numpy().astype(np.float32)}), what="onnxruntime")
        if c.problem or c.max_rel > EXPORT_RTOL:
            raise RuntimeError(f"onnxruntime disagrees with torch at batch {b}: {c.describe(EXPORT_RTOL)}")
        worst = max(worst, c.max_rel)
    del sess
    meta = {"model": name, "exporter": exporter, "resolution": res, "torch": torch.__version__,
            "export_s": seconds, "file_MB": sum(f.stat().st_size for f in tmp.iterdir()) / 1e6,
            "ort_vs_torch_max_rel": worst}
    (tmp / "export.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return meta


def ensure_export(zoo: Path, name: str, exporter: str, retry_failed: bool) -> tuple[Path | None, str | None]:
    """The cached export's path, exporting it first in a child process; or (None, why it failed)."""
    dest = zoo / "models" / f"{name}.{exporter}"
    failed = zoo / "models" / f"{name}.{exporter}.failed.json"
    if (dest / "export.json").is_file():
        return dest / "model.onnx", None
    if failed.is_file() and not retry_failed:
        return None, json.loads(failed.read_text())["error"]
    print(f"  exporting {name} with the {exporter} exporter ...", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, os.fspath(Path(__file__).resolve()), "--export-one", name, exporter, os.fspath(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
        ok, out = proc.returncode == 0, proc.stdout.strip().splitlines()
        err = out[-1] if out and out[-1].startswith("EXPORT FAILED") else \
            f"exit status {proc.returncode}: {' '.join(proc.stderr.split())[-300:]}"
    except subprocess.TimeoutExpired:
        ok, err = False, f"timed out after {EXPORT_TIMEOUT_S} s"
    for stale in dest.parent.glob(f"{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if ok and (dest / "export.json").is_file():
        failed.unlink(missing_ok=True)
        return dest / "model.onnx", None
    err = err.removeprefix("EXPORT FAILED: ")
    failed.write_text(json.dumps({"model": name, "exporter": exporter, "error": err}) + "\n")
    print(f"  export failed: {err}", flush=True)
    return None, err


# ---------------------------------------------------------------- one model (own process)


def _feeds(session, batch: int, rng) -> dict:
    import numpy as np

    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if k == 0 else d for k, d in enumerate(inp.shape)]
        if inp.type != "tensor(float)":
            raise RuntimeError(f"input '{inp.name}' is {inp.type}; the zoo's models take float32")
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_split(split_dir: Path, manifest) -> list[dict]:
    """Run every split's head then tail with onnxruntime and compare with the whole model.

    Independent of the tool's verification: default onnxruntime sessions, other random inputs,
    the head's outputs fed to the tail by name. Also checks the size the manifest gives the cut
    point: what the head sends at batch b is [b, *cut point shape].
    """
    import numpy as np
    import onnxruntime as ort

    from dsc_export.compare import compare, tolerance

    def session(rel: str):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(os.fspath(split_dir / rel), opts, providers=["CPUExecutionProvider"])

    whole = session(manifest.model.path)
    out_names = [o.name for o in whole.get_outputs()]
    rng = np.random.default_rng(CHECK_SEED)
    feeds = [_feeds(whole, b, rng) for b in CHECK_BATCHES]
    refs = [whole.run(None, f) for f in feeds]
    out_dtypes = [r.dtype for r in refs[0]]
    del whole
    results = []
    shape_of = {c.tensor: list(c.shape) for c in manifest.cut_points}
    for s in manifest.splits:
        if s.kind != "split":
            continue
        head, tail = session(s.head), session(s.tail)
        head_names = [o.name for o in head.get_outputs()]
        tail_inputs = [i.name for i in tail.get_inputs()]
        tol = tolerance(*out_dtypes, manifest.wire_dtype)
        row = {"id": s.id, "tensor": s.tensor, "tolerance": tol, "max_rel": 0.0, "ok": True, "problem": None}
        if sorted(head_names) != sorted(tail_inputs):
            row.update(ok=False, problem=f"head outputs {head_names} are not the tail's inputs {tail_inputs}")
            results.append(row)
            continue
        for b, f, ref in zip(CHECK_BATCHES, feeds, refs):
            sent = dict(zip(head_names, head.run(None, f)))
            shapes = [list(v.shape) for v in sent.values()]
            if s.tensor in shape_of and shapes != [[b, *shape_of[s.tensor]]]:
                row.update(ok=False, problem=f"the head sends {shapes} at batch {b}; the manifest says "
                                             f"[{b}, {', '.join(map(str, shape_of[s.tensor]))}]")
                break
            got = tail.run(out_names, sent)
            c = compare(ref, got, out_names, what=f"head + tail at batch {b}")
            row["max_rel"] = max(row["max_rel"], c.max_rel)
            if not c.ok(tol):
                row.update(ok=False, problem=f"batch {b}: {c.describe(tol)}")
                break
        results.append(row)
    return results


def run_one(onnx_path: Path, name: str, exporter: str, work: Path, only_analyze: bool,
            keep_splits: bool, log_dir: Path) -> dict:
    """analyze (x3), split and check one export; every failure is caught and recorded."""
    from dsc_export.artifacts import read_manifest
    from dsc_export.errors import UserError, VerificationError
    from dsc_export.splitting import analyze_file, split_model

    meta = json.loads((onnx_path.parent / "export.json").read_text())
    row: dict = {"model": name, "exporter": exporter, "resolution": meta["resolution"],
                 "file_MB": meta["file_MB"], "torch": meta["torch"], "status": "ok"}
    tag = f"{name}.{exporter}"

    def failed(step: str, exc: BaseException) -> None:
        if isinstance(exc, (UserError, VerificationError)):
            row.update(status="refused", step=step, message=_one_line(exc))
        else:  # anything else escaping the tool is a bug
            log = log_dir / f"{tag}.{step}.traceback.txt"
            log.write_text(traceback.format_exc())
            row.update(status="bug", step=step, message=f"{type(exc).__name__}: {_one_line(exc)}",
                       traceback=os.fspath(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else os.fspath(log))

    times = []
    try:
        for _ in range(ANALYZE_RUNS):
            t = time.perf_counter()
            an = analyze_file(onnx_path)
            times.append(time.perf_counter() - t)
    except Exception as exc:
        failed("analyze", exc)
        return row
    row.update(
        analyze_s=statistics.median(times), analyze_runs_s=times,
        cut_points=len(an.cut_points), natural=len(an.natural), compressive=len(an.compressive),
        folded=len(an.fold.folded), batch_dependent=len(an.fold.batch_dependent), notes=an.notes,
        points=[{"tensor": c.tensor, "shape": c.shape, "dtype": c.dtype, "bytes": c.bytes,
                 "ratio": c.ratio, "natural": c.natural, "compressive": c.compressive, "scope": c.scope}
                for c in an.cut_points],
    )
    print(f"  analyze: {an.summary()}, median {row['analyze_s']:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    if only_analyze:
        return row
    split_dir = work / tag
    try:
        t = time.perf_counter()
        manifest = split_model(onnx_path, split_dir)
        row["split_s"] = time.perf_counter() - t
    except Exception as exc:
        failed("split", exc)
        return row
    row["splits"] = sum(1 for s in manifest.splits if s.kind == "split")
    row["split_max_rel"] = max((s.max_rel_diff or 0.0 for s in manifest.splits if s.kind == "split"), default=None)
    print(f"  split: {row['splits']} splits in {row['split_s']:.1f} s", flush=True)
    try:
        checks = check_split(split_dir, read_manifest(split_dir))
    except Exception as exc:
        row.update(status="check failed", step="check", message=f"{type(exc).__name__}: {_one_line(exc)}")
        return row
    finally:
        if not keep_splits:
            shutil.rmtree(split_dir, ignore_errors=True)
    row["checks"] = checks
    row["verified"] = all(c["ok"] for c in checks)
    if not row["verified"]:
        row["status"] = "WRONG RESULT"
    print(f"  independent check: {sum(c['ok'] for c in checks)}/{len(checks)} splits reproduce the model "
          f"at batch sizes {list(CHECK_BATCHES)}", flush=True)
    return row


def job(name: str, exporter: str, zoo: Path, only_analyze: bool, keep_splits: bool) -> None:
    """Child process entry: write rows/<model>.<exporter>.json."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    for d in ("rows", "logs", "splits"):
        (zoo / d).mkdir(parents=True, exist_ok=True)
    row = run_one(zoo / "models" / f"{name}.{exporter}" / "model.onnx", name, exporter, zoo / "splits",
                  only_analyze, keep_splits, zoo / "logs")
    row["only_analyze"] = only_analyze
    row["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_row(zoo, row)


def _write_row(zoo: Path, row: dict) -> None:
    path = zoo / "rows" / f"{row['model']}.{row['exporter']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- the table


def _cell_verified(r: dict) -> str:
    if "checks" not in r:
        return "not run (--only-analyze)" if r.get("only_analyze") and r.get("status") == "ok" else ""
    checks = r["checks"]
    if not checks:
        return "no split: " + ("no cut point" if r.get("cut_points") == 0 else "no compressive bottleneck")
    if r["verified"]:
        worst = max(c["max_rel"] for c in checks)
        return f"yes, {len(checks)}/{len(checks)} (max rel {worst:.1e})"
    bad = [c for c in checks if not c["ok"]]
    return f"**NO**, {len(bad)}/{len(checks)} differ: {bad[0]['problem']}"


def _why(r: dict) -> str:
    s = r["status"]
    if s == "export failed":
        return f"export failed (torch, not dsc-export): {r['message']}"
    if s == "refused":
        return f"{r['step']} refused: {r['message']}"
    if s == "bug":
        return f"**BUG** in {r['step']}: {r['message']}"
    if s in ("crashed", "check failed"):
        return f"**{s.upper()}** ({r.get('step', '')}): {r['message']}"
    notes = r.get("notes") or []
    if not notes:
        return ""
    first = notes[0] if len(notes[0]) <= 200 else notes[0][:200] + "..."
    return first if len(notes) == 1 else f"{len(notes)} notes, the first: {first}"


def render(rows: list[dict], machine: dict, date: str) -> str:
    """docs/models.md from the rows (pure)."""
    lines = [
        "# The model zoo: what dsc-export does with real models",
        "",
        "Every architecture below is built with random weights (nothing downloaded; BatchNorm",
        "statistics re-estimated on random inputs), exported by **both** of torch's exporters",
        "(TorchScript: `torch.onnx.export(..., dynamo=False)`, opset 17; and `dynamo=True`, torch's",
        "default since 2.9) with a dynamic batch on axis 0, then `analyze`d and `split` as a user",
        "would. *verified* is an independent check of every split written: head then tail run by",
        "onnxruntime and compared with the whole model run by onnxruntime, at batch sizes 1 and 2 on",
        "other random inputs than the split's own verification, with `dsc_export.compare`'s tolerance;",
        "the head's output must also have the size the manifest gives the cut point.",
        "",
        f"Produced by `python benchmarks/model_zoo.py` on {date}: {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine.get('torch', '?')}, onnxruntime {machine.get('onnxruntime', '?')}. *analyze s* is the",
        f"median of {ANALYZE_RUNS} in-process runs of `analyze_file` (target: under {ANALYZE_TARGET_S:g} s); *split s*",
        "includes the split's own verification. Classification models at 224x224 (Inception-v3 299x299),",
        "segmentation models at 224x224 (their `out` output).",
        "",
    ]
    ok = [r for r in rows if r["status"] in ("ok", "WRONG RESULT")]
    timed = [r for r in rows if "analyze_s" in r]
    lines += ["## Summary", ""]
    lines.append(f"- {len(rows)} exports of {len({r['model'] for r in rows})} models; "
                 f"{sum(r['status'] == 'export failed' for r in rows)} exports failed in torch itself.")
    lines.append(f"- analyzed: {len(timed)}; with cut points: {sum(r.get('cut_points', 0) > 0 for r in timed)}; "
                 f"with a natural bottleneck: {sum(r.get('natural', 0) > 0 for r in timed)}.")
    if timed:
        worst = max(timed, key=lambda r: r["analyze_s"])
        over = [f"{r['model']} ({r['exporter']}, {r['analyze_s']:.2f} s)"
                for r in timed if r["analyze_s"] >= ANALYZE_TARGET_S]
        lines.append(f"- analyze: slowest {worst['analyze_s']:.2f} s ({worst['model']}, {worst['exporter']}); "
                     + (f"over {ANALYZE_TARGET_S:g} s: {', '.join(over)}." if over
                        else f"all under {ANALYZE_TARGET_S:g} s."))
    checked = [r for r in ok if "checks" in r]
    lines.append(f"- split and checked independently: {len(checked)}; every split reproduces the model: "
                 f"{sum(r['verified'] for r in checked)}; **wrong results: "
                 f"{sum(not r['verified'] for r in checked)}**.")
    lines.append(f"- refused (one line, the tool's own error): {sum(r['status'] == 'refused' for r in rows)}; "
                 f"**bugs (an exception other than the tool's errors, or a crash): "
                 f"{sum(r['status'] in ('bug', 'crashed', 'check failed') for r in rows)}**.")
    none = [f"{r['model']} ({r['exporter']})" for r in timed if r.get("cut_points") == 0]
    if none:
        lines.append(f"- no cut point at all: {', '.join(none)}.")
    lines += ["", "## The table", "",
              "| model | exporter | cut points | natural | compressive | analyze s | split s "
              "| verified (independently) | refusal, failure or notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    order = {m.name: k for k, m in enumerate(MODELS)}
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 99), EXPORTERS.index(r["exporter"]))):
        def num(key, fmt="{}"):
            return fmt.format(r[key]) if key in r and r[key] is not None else ""
        why = _why(r).replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['exporter']} | {num('cut_points')} | {num('natural')} | "
                     f"{num('compressive')} | {num('analyze_s', '{:.2f}')} | {num('split_s', '{:.1f}')} | "
                     f"{_cell_verified(r).replace('|', '/')} | {why} |")
    lines += [
        "",
        "## Reading the table",
        "",
        "- *cut points*: tensors every path from the input to the output passes through (see",
        "  [concepts](concepts.md)); *natural*: smaller than the input on the wire; *compressive*: smaller",
        "  than every earlier cut point too (Eq. 3), where `split` cuts by default.",
        "- *export failed*: torch's exporter itself raised, or its ONNX disagrees with torch in",
        "  onnxruntime; not a dsc-export problem, recorded so that the table is complete.",
        "- *refused*: `analyze` or `split` stopped with one line that names the cause. *BUG*: any other",
        "  exception (its traceback is kept in `benchmarks/out/zoo/logs/`).",
        "- 0 cut points on a model that has an obvious chain of blocks means that something (a `Shape`",
        "  read of an early tensor, typically) is taken as a path around every tensor: see the notes.",
        "",
        "Rerun: `python benchmarks/model_zoo.py` (exports are cached in `benchmarks/out/zoo/`;",
        "`--models a,b`, `--exporters dynamo`, `--only-analyze`, `--resume`).",
        "",
    ]
    return "\n".join(lines)


def load_rows(zoo: Path, models: list[str], exporters: tuple[str, ...] = EXPORTERS) -> list[dict]:
    rows = []
    for m in models:
        for e in exporters:
            p = zoo / "rows" / f"{m}.{e}.json"
            if p.is_file():
                rows.append(json.loads(p.read_text()))
    return rows


def compare_rows(old: list[dict], new: list[dict]) -> list[str]:
    """One line per export whose cut points (tensor, per-sample shape, bytes, natural,
    compressive) differ between two runs (pure); exports in only one run are skipped."""
    by_key = {(r["model"], r["exporter"]): r for r in old}
    lines = []
    for r in new:
        o = by_key.get((r["model"], r["exporter"]))
        if o is None or "points" not in o or "points" not in r:
            continue
        key = ("shape", "bytes", "natural", "compressive")
        a = [(p["tensor"], *(json.dumps(p[k]) for k in key)) for p in o["points"]]
        b = [(p["tensor"], *(json.dumps(p[k]) for k in key)) for p in r["points"]]
        if a == b:
            continue
        gone = [p[0] for p in a if p not in b]
        added = [p[0] for p in b if p not in a]
        lines.append(f"{r['model']} ({r['exporter']}): {len(a)} -> {len(b)} cut points; "
                     f"{len(gone)} gone or changed, e.g. {gone[:3]}; {len(added)} new or changed, e.g. {added[:3]}")
    return lines


def machine_info() -> dict:
    from dsc_export.ort import cpu_name

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(m.name for m in MODELS))
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--out", default=os.fspath(HERE / "out"),
                    help="output folder: exports and rows in OUT/zoo/, OUT/zoo.json [default: benchmarks/out]")
    ap.add_argument("--only-analyze", action="store_true", help="analyze only: no split, no check")
    ap.add_argument("--resume", action="store_true", help="keep the rows already computed; run only the missing ones")
    ap.add_argument("--retry-failed", action="store_true", help="export again what failed to export before")
    ap.add_argument("--keep-splits", action="store_true", help="keep the split dirs (OUT/zoo/splits/)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/models.md and benchmarks/results/")
    ap.add_argument("--compare", metavar="JSON",
                    help="an earlier zoo.json or results/zoo-*.json: list the exports whose cut points changed")
    ap.add_argument("--export-one", nargs=3, metavar=("MODEL", "EXPORTER", "DEST"), help=argparse.SUPPRESS)
    ap.add_argument("--job", nargs=2, metavar=("MODEL", "EXPORTER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    zoo = out / "zoo"
    if args.export_one:
        try:
            export_one(args.export_one[0], args.export_one[1], Path(args.export_one[2]))
        except Exception as exc:
            print(f"EXPORT FAILED: {type(exc).__name__}: {_one_line(exc)}", flush=True)
            sys.exit(1)
        return
    if args.job:
        job(args.job[0], args.job[1], zoo, args.only_analyze, args.keep_splits)
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    exporters = tuple(e.strip() for e in args.exporters.split(",") if e.strip())
    unknown = [m for m in models if m not in BY_NAME] + [e for e in exporters if e not in EXPORTERS]
    if unknown:
        raise SystemExit(f"unknown model or exporter: {', '.join(unknown)}; models: {', '.join(BY_NAME)}; "
                         f"exporters: {', '.join(EXPORTERS)}")
    total = len(models) * len(exporters)
    k = 0
    for name in models:
        for exporter in exporters:
            k += 1
            print(f"[{k}/{total}] {name} ({exporter})", flush=True)
            row_path = zoo / "rows" / f"{name}.{exporter}.json"
            if args.resume and row_path.is_file():
                print("  kept (--resume)", flush=True)
                continue
            onnx_path, err = ensure_export(zoo, name, exporter, args.retry_failed)
            if onnx_path is None:
                _write_row(zoo, {"model": name, "exporter": exporter, "status": "export failed", "message": err,
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S")})
                continue
            cmd = [sys.executable, os.fspath(Path(__file__).resolve()), "--out", os.fspath(out),
                   "--job", name, exporter]
            cmd += ["--only-analyze"] * args.only_analyze + ["--keep-splits"] * args.keep_splits
            try:
                rc = subprocess.run(cmd, timeout=JOB_TIMEOUT_S).returncode
                why = f"the process exited with status {rc}"
            except subprocess.TimeoutExpired:
                rc, why = -1, f"timed out after {JOB_TIMEOUT_S} s"
            if rc != 0:
                _write_row(zoo, {"model": name, "exporter": exporter, "status": "crashed", "step": "job",
                                 "message": why, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
            if not args.keep_splits:  # a crashed job leaves its split dir behind
                shutil.rmtree(zoo / "splits" / f"{name}.{exporter}", ignore_errors=True)
    rows = load_rows(zoo, [m.name for m in MODELS])
    info = machine_info()
    date = time.strftime("%Y-%m-%d")
    payload = {"benchmark": "model_zoo", "machine": info, "date": date,
               "targets": {"analyze_s": ANALYZE_TARGET_S}, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out / 'zoo.json'}")
    if not args.no_docs:
        res = HERE / "results" / f"zoo-cpu-{info['cores']}core-{date}.json"
        kept = [{**r, "notes": (r.get("notes") or [])[:3], "notes_count": len(r.get("notes") or [])} for r in rows]
        res.write_text(json.dumps({**payload, "rows": kept}) + "\n")  # the full rows: out/zoo.json
        docs = ROOT / "docs" / "models.md"
        text = render(rows, info, date)
        old = docs.read_text() if docs.is_file() else ""
        begin = "<!-- BEGIN int8-detection"  # benchmarks/int8_detection.py's rows: kept as they are
        if begin in old:
            text = text.rstrip("\n") + "\n\n" + begin + old.split(begin, 1)[1]
        docs.write_text(text)
        print(f"wrote {res} and {ROOT / 'docs' / 'models.md'}")
    if args.compare:
        changed = compare_rows(json.loads(Path(args.compare).read_text())["rows"],
                               [r for r in rows if r["model"] in models and r["exporter"] in exporters])
        print(f"cut points against {args.compare}: " + ("identical on every export run" if not changed else
                                                           f"{len(changed)} export(s) differ"))
        for line in changed:
            print("  " + line)
    for r in rows:
        if r["model"] in models and r["exporter"] in exporters:
            print(f"{r['model']:30} {r['exporter']:12} {r['status']:14} cuts={r.get('cut_points', '-')!s:4} "
                  f"analyze={r.get('analyze_s', float('nan')):.2f}s {_cell_verified(r)} {_why(r)[:120]}")


if __name__ == "__main__":
    main()
