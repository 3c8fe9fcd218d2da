"""A few of the model zoo's exports (benchmarks/model_zoo.py), as a user would make them.

Each model is exported with both of torch's exporters (TorchScript and ``dynamo=True``),
analysed, split, and every split is checked independently of the tool's own verification:
head then tail with onnxruntime against the whole model at batch sizes 1 and 2. The
segmentation model (LR-ASPP) must have cut points in its backbone: its last Resize reads the
input's height and width, which are constants at a fixed resolution.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = [(m, e) for m in ("squeezenet1_1", "shufflenet_v2_x1_0", "lraspp_mobilenet_v3_large")
         for e in ("torchscript", "dynamo")]


def _zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", ROOT / "benchmarks" / "model_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["model_zoo"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def zoo():
    pytest.importorskip("torchvision", reason="the 'export' extra (torch, torchvision) is not installed")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    return _zoo()


def _scopes(onnx_path: Path, tensors: list[str]) -> dict[str, str]:
    """Module path of each tensor's producer, read from the export itself: TorchScript names
    nodes after it (``/net/backbone/...``), dynamo records it in the node's metadata."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for t in tensors:
        node = producer[t]
        meta = {p.key: p.value for p in node.metadata_props}
        out[t] = meta.get("pkg.torch.onnx.name_scopes", "") + " " + node.name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_model_splits_verify_independently(zoo, tmp_path_factory, name, exporter):
    work = tmp_path_factory.mktemp(f"{name}.{exporter}")
    dest = work / "export"
    meta = zoo.export_one(name, exporter, dest)
    assert meta["ort_vs_torch_max_rel"] <= zoo.EXPORT_RTOL
    (work / "logs").mkdir()
    row = zoo.run_one(dest / "model.onnx", name, exporter, work / "splits", only_analyze=False,
                      keep_splits=False, log_dir=work / "logs")
    assert row["status"] == "ok", row.get("message")
    assert row["cut_points"] > 0 and row["compressive"] > 0
    # one split per compressive bottleneck, and every one reproduces the whole model
    assert row["splits"] == row["compressive"] == len(row["checks"])
    bad = [c for c in row["checks"] if not c["ok"]]
    assert not bad, bad
    assert all(c["max_rel"] <= c["tolerance"] for c in row["checks"])
    json.dumps(row)  # the row is what the benchmark writes
    if name.startswith("lraspp"):
        scopes = _scopes(dest / "model.onnx", [p["tensor"] for p in row["points"]])
        in_backbone = [t for t, s in scopes.items() if "backbone" in s]
        assert len(in_backbone) >= 5, scopes


def _row(model, exporter, **kw):
    return {"model": model, "exporter": exporter, "status": "ok", **kw}


def test_table_says_why_for_every_outcome():
    zoo = _zoo()
    pts = [{"tensor": "a", "shape": [8, 4, 4], "bytes": 512, "natural": True, "compressive": True}]
    rows = [
        _row("resnet50", "torchscript", cut_points=1, natural=1, compressive=1, analyze_s=0.2, split_s=1.0,
             points=pts, splits=1, verified=True, checks=[{"ok": True, "max_rel": 1e-7, "problem": None}]),
        _row("resnet50", "dynamo", status="export failed", message="Unsupported: aten::foo"),
        _row("swin_t", "torchscript", status="refused", step="split", message="tensor 'w' is not batched"),
        _row("swin_t", "dynamo", status="bug", step="analyze", message="KeyError: 'x'"),
        _row("vit_b_16", "dynamo", cut_points=1, natural=1, compressive=1, analyze_s=2.5, split_s=1.0,
             points=pts, splits=1, verified=False,
             checks=[{"ok": False, "max_rel": 0.5, "problem": "batch 2: max relative difference 5e-01"}]),
    ]
    md = zoo.render(rows, {"cpu": "cpu", "cores": 2}, "2026-01-01")
    lines = {(ln.split("|")[1].strip(), ln.split("|")[2].strip()): ln for ln in md.splitlines()
             if ln.startswith("| ") and not ln.startswith("| model")}
    assert "yes, 1/1" in lines[("resnet50", "torchscript")]
    assert "export failed (torch, not dsc-export): Unsupported: aten::foo" in lines[("resnet50", "dynamo")]
    assert "split refused: tensor 'w' is not batched" in lines[("swin_t", "torchscript")]
    assert "**BUG** in analyze: KeyError" in lines[("swin_t", "dynamo")]
    assert "**NO**, 1/1 differ" in lines[("vit_b_16", "dynamo")]
    assert "over 2 s: vit_b_16 (dynamo, 2.50 s)" in md and "**wrong results: 1**" in md and "bugs" in md


def test_compare_rows_names_changed_cut_points():
    zoo = _zoo()
    p = {"tensor": "a", "shape": [8, 4, 4], "bytes": 512, "natural": True, "compressive": True}
    same = _row("m", "dynamo", points=[p])
    old = [same, _row("m", "torchscript", points=[p])]
    new = [same, _row("m", "torchscript", points=[{**p, "bytes": 1024}])]
    out = zoo.compare_rows(old, new)
    assert len(out) == 1 and out[0].startswith("m (torchscript): 1 -> 1 cut points") and "'a'" in out[0]
