"""Benchmark: INT8 and detection models as a user meets them (issue 24), rows for docs/models.md.

INT8: a torchvision classifier (random weights, TorchScript exporter, dynamic batch) quantized by
onnxruntime's own quantizer (after its ``quant_pre_process``) in the forms users ship:
``quantize_static`` in QDQ and QOperator
format, per-tensor and per-channel, uint8 and int8 activations (8 random calibration batches),
and ``quantize_dynamic``. Each goes through ``split`` (its own verification), an INDEPENDENT
check of every split (head then tail against the whole model in onnxruntime, batch 1 and 2, other
inputs), ``build`` (batch 1) and ``bench --role server`` (every tail fed its head's real
outputs).

Detection: torchvision's SSDlite and Faster R-CNN exported as torchvision does (one image
``[3, H, W]``, no batch axis), which ``analyze`` must refuse in one line, and SSDlite re-exported
with a batch axis (a wrapper taking ``[1, 3, H, W]``), which runs at batch 1 with its
data-dependent ``boxes [-1, 4]`` outputs returned whole.

Writes the table between the markers in ``docs/models.md`` (``benchmarks/model_zoo.py`` keeps
that block), ``benchmarks/out/int8_detection.json`` and
``benchmarks/results/int8_detection-cpu-<n>core-<date>.json``.

Usage: python benchmarks/int8_detection.py [--out DIR] [--no-docs] [--model mobilenet_v3_large]
       [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- BEGIN int8-detection (benchmarks/int8_detection.py) -->", "<!-- END int8-detection -->"
CHECK_SEED = 1234
INT8_FORMS = [  # (label, format, per_channel, activation type) ; "dynamic": quantize_dynamic
    ("QDQ u8/s8 per-tensor", "QDQ", False, "QUInt8"),
    ("QDQ s8/s8 per-channel", "QDQ", True, "QInt8"),
    ("QOperator u8/s8 per-tensor", "QOperator", False, "QUInt8"),
    ("QOperator u8/s8 per-channel", "QOperator", True, "QUInt8"),
    ("dynamic (quantize_dynamic)", "dynamic", False, "QUInt8"),
]


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _cli(*argv, timeout=1800) -> tuple[int, str, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dsc_export", *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("·")]
    if "Traceback" in r.stderr:
        err = ["BUG: " + next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), "traceback")]
    return r.returncode, (err[-1] if err else ""), time.perf_counter() - t


def export_classifier(name: str, dest: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    path = dest / f"{name}.onnx"
    torch.onnx.export(net, x, str(path), dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    return path


def quantize(src: Path, dst: Path, fmt: str, per_channel: bool, act: str) -> None:
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if fmt == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                    activation_type=getattr(QuantType, act), weight_type=QuantType.QInt8)


def check_splits(model: Path, split: Path) -> tuple[bool, float, int]:
    """Head then tail against the whole model (onnxruntime), batch 1 and 2, other inputs than the
    split's: (all exact within dsc_export's tolerance, worst max abs diff, splits checked)."""
    import numpy as np

    from dsc_export.artifacts import read_manifest
    from dsc_export.compare import compare, tolerance
    from dsc_export.ort import make_session

    man = read_manifest(split)
    whole = make_session(model)
    worst, ok, n = 0.0, True, 0
    for b in (1, 2):
        x = np.random.default_rng((CHECK_SEED, b)).standard_normal((b, 3, 224, 224)).astype(np.float32)
        want = whole.run(None, {"image": x})
        for s in (s for s in man.splits if s.kind == "split"):
            z = make_session(split / s.head).run([s.wire_tensor], {"image": x})[0]
            got = make_session(split / s.tail).run(None, {s.wire_tensor: z})
            c = compare(want, got)
            ok &= c.ok(tolerance(z.dtype, *(w.dtype for w in want)))
            worst = max(worst, c.max_abs)
            n += b == 1
    return ok, worst, n


def int8_rows(name: str, work: Path) -> list[dict]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from dsc_export.artifacts import read_manifest

    raw = export_classifier(name, work)
    src = work / f"{name}-pre.onnx"  # the quantizer's own pre-processing, as its docs ask
    quant_pre_process(str(raw), str(src))
    rows = []
    for label, fmt, per_channel, act in INT8_FORMS:
        q = work / f"{name}-{fmt}-{'pc' if per_channel else 'pt'}-{act}.onnx"
        row = {"kind": "INT8", "model": name, "form": label}
        try:
            quantize(src, q, fmt, per_channel, act)
        except Exception as exc:  # the quantizer itself
            rows.append({**row, "status": "quantizer failed", "note": _one_line(str(exc))})
            continue
        split = work / (q.stem + "-split")
        shutil.rmtree(split, ignore_errors=True)
        rc, line, split_s = _cli("split", q, "-o", split)
        if rc != 0:
            rows.append({**row, "status": "BUG" if line.startswith("BUG") else "refused", "note": line})
            continue
        man = read_manifest(split)
        dtypes = sorted({c.dtype for c in man.cut_points})
        ints = sum(c.dtype in ("uint8", "int8") for c in man.cut_points)
        exact, worst, n = check_splits(q, split)
        row.update(cut_points=len(man.cut_points), natural=sum(c.natural for c in man.cut_points),
                   compressive=sum(c.compressive for c in man.cut_points), int8_cuts=ints,
                   cut_dtypes=dtypes, split_s=round(split_s, 1), splits=n, exact=exact, max_abs=worst)
        rc, line, _ = _cli("build", split, "--batch-sizes", "1")
        row["build"] = "ok" if rc == 0 else line
        rc, line, _ = _cli("bench", split, "--role", "server", "--batch-sizes", "1", "--repeats", "3",
                           "--warmup", "1")
        row["bench_server"] = "ok" if rc == 0 else line
        row["status"] = "ok" if exact and row["build"] == row["bench_server"] == "ok" else "FAILED"
        rows.append(row)
        shutil.rmtree(split, ignore_errors=True)
    return rows


def export_detector(name: str, dest: Path, batched: bool) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    kw = {"weights": None, "weights_backbone": None}
    net = getattr(torchvision.models.detection, name)(**kw).eval()
    size = 320
    path = dest / f"{name}{'-batched' if batched else ''}.onnx"
    if batched:
        class OneImage(torch.nn.Module):
            def __init__(self, det):
                super().__init__()
                self.det = det

            def forward(self, x):  # x [1, 3, H, W]
                out = self.det([x[0]])[0]
                return out["boxes"], out["scores"], out["labels"]

        torch.onnx.export(OneImage(net), (torch.rand(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["boxes", "scores", "labels"])
    else:
        torch.onnx.export(net, ([torch.rand(3, size, size)],), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["boxes", "scores", "labels"])
    return path


def detection_rows(work: Path) -> list[dict]:
    from dsc_export.artifacts import read_manifest

    rows = []
    for name, batched in (("ssdlite320_mobilenet_v3_large", False), ("fasterrcnn_mobilenet_v3_large_320_fpn", False),
                          ("ssdlite320_mobilenet_v3_large", True)):
        row = {"kind": "detection", "model": name,
               "form": "with a batch axis [1, 3, 320, 320]" if batched else "as torchvision exports it [3, 320, 320]"}
        try:
            path = export_detector(name, work, batched)
        except Exception as exc:
            rows.append({**row, "status": "export failed", "note": _one_line(str(exc))})
            continue
        rc, line, _ = _cli("analyze", path)
        if rc != 0:
            rows.append({**row, "status": "BUG" if line.startswith("BUG") else "refused", "note": line})
            continue
        split = work / (path.stem + "-split")
        shutil.rmtree(split, ignore_errors=True)
        rc, line, split_s = _cli("split", path, "-o", split)
        if rc != 0:
            rows.append({**row, "status": "BUG" if line.startswith("BUG") else "refused", "note": line})
            continue
        man = read_manifest(split)
        outs = ", ".join(f"{o.name} {o.shape}" for o in man.model.outputs)
        row.update(cut_points=len(man.cut_points), natural=sum(c.natural for c in man.cut_points),
                   compressive=sum(c.compressive for c in man.cut_points), split_s=round(split_s, 1),
                   status="ok", note=f"split and verified by split; fixed batch {man.model.fixed_batch}; "
                                     f"input {man.model.input_bytes:,} bytes per sample; outputs {outs} returned whole")
        rows.append(row)
    return rows


def render(rows: list[dict], info: dict) -> str:
    lines = [BEGIN, "", "## INT8 and detection models", "",
             f"Produced by `python benchmarks/int8_detection.py` on {info['date']}: {info['cpu']}, "
             f"{info['cores']} cores, "
             f"onnxruntime {info['onnxruntime']}, torch {info['torch']}. INT8 models are a torchvision classifier "
             "(random weights, 224x224) quantized by onnxruntime's own quantizer after its `quant_pre_process` "
             "(8 random calibration batches); splits of models with Q/DQ nodes are verified at onnxruntime's "
             "`basic` level, where they run as written; "
             "*exact* is an independent check of every split (head then tail against the whole quantized model in "
             "onnxruntime, batch 1 and 2, other inputs than the split's own); *build* and *bench server* run the "
             "verbs at batch 1 (every tail fed its head's real outputs, so uint8 / int8 cuts are timed on their "
             "own dtype and values).", "",
             "| kind | model | form | cut points | natural | compressive | 8-bit cuts | split s | exact | build | "
             "bench server | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def v(key, fmt="{}"):
            return fmt.format(r[key]) if r.get(key) is not None else ""
        exact = "" if "exact" not in r else (f"yes, {r['splits']} splits (max abs {r['max_abs']:.1e})" if r["exact"]
                                            else f"NO (max abs {r['max_abs']:.1e})")
        note = r.get("note", "") or (", ".join(r.get("cut_dtypes", [])) and "cut dtypes: " + ", ".join(r["cut_dtypes"]))
        lines.append(f"| {r['kind']} | {r['model']} | {r['form']} | {v('cut_points')} | {v('natural')} | "
                     f"{v('compressive')} | {v('int8_cuts')} | {v('split_s')} | {exact} | {v('build')} | "
                     f"{v('bench_server')} | {note.replace('|', '/')} |")
    lines += ["",
              "- A batch-less image input (`[3, H, W]`: torchvision's detection models take a list of images) is",
              "  refused in one line naming the missing batch axis and how to re-export; it is never read as a",
              "  fixed batch of 3 colour planes (`dsc_export/graph/batch_axis.py` has the rule).",
              "- A fixed-batch model with data-dependent outputs (`boxes [-1, 4]`, NonZero / NonMaxSuppression",
              "  detections) is accepted at its batch size: a request is one batch, and its outputs go back whole",
              "  (the output contract's `whole`). At batch 1 that is one image's detections per request; such a",
              "  model is never batched or merged with other requests.",
              "- Behind a dynamic batch axis the same outputs are refused: no server can split `[-1, 4]` per request.",
              "", END]
    return "\n".join(lines)


def write_docs(block: str) -> None:
    path = ROOT / "docs" / "models.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "int8_detection")
    ap.add_argument("--model", default="mobilenet_v3_large")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs from the last run's JSON")
    args = ap.parse_args()
    if args.render_only:
        last = json.loads((args.out.parent / "int8_detection.json").read_text())
        write_docs(render(last["rows"], last["info"]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import torch

    from dsc_export.ort import cpu_name

    info = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "platform": platform.platform()}
    rows = int8_rows(args.model, args.out) + detection_rows(args.out)
    (args.out.parent / "int8_detection.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    if not args.no_docs:
        write_docs(render(rows, info))
        res = HERE / "results" / f"int8_detection-cpu-{info['cores']}core-{info['date']}.json"
        res.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
