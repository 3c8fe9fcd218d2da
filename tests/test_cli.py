"""The command line: help with examples, one-line errors with a non-zero exit, JSON output."""

import json
import subprocess
import sys

import graphs
import onnx
import pytest
from click.testing import CliRunner

from dsc_export.cli import cli


def run(*args):
    """Run the real console entry point (so error handling is exercised as users see it)."""
    return subprocess.run([sys.executable, "-m", "dsc_export", *args], capture_output=True, text=True)


@pytest.mark.parametrize("verb", [[], ["export"], ["analyze"], ["split"], ["models"], ["build"], ["bench"], ["plan"],
                                  ["simulate"], ["bundle"], ["serve"], ["run"], ["demo"]])
def test_help_shows_an_example(verb):
    res = CliRunner().invoke(cli, [*verb, "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output and "dsc-export" in res.output


def test_models_table_lists_all_fifteen():
    res = CliRunner().invoke(cli, ["models"])
    assert res.exit_code == 0
    assert res.output.count("EfficientNetV1") == 8 and res.output.count("EfficientNetV2") == 7
    data = json.loads(CliRunner().invoke(cli, ["models", "--json"]).output)
    assert data[0]["timm_name"] == "tf_efficientnet_b0"


@pytest.mark.parametrize("args,needle", [
    (["analyze", "/no/such.onnx"], "does not exist"),
    (["split", "/no/such.onnx"], "does not exist"),
    (["export", "resnet50"], "unknown model 'resnet50'"),
    (["build", "/no/such/dir"], "not a split dir"),
    (["bench", "/no/such/dir", "--role", "device"], "not a split dir"),
    (["plan", "/no/such/dir", "--device", "d.json", "--server", "s.json"], "not a split dir"),
    (["simulate", "/no/plan.json", "/no/s.csv"], "does not exist"),
    (["bundle", "/no/such/dir", "--device", "-o", "x.tar"], "not a split dir"),
    (["demo", "--model", "resnet50"], "unknown model 'resnet50'"),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    res = run(*args)
    assert res.returncode == 1
    assert needle in res.stderr
    errors = [line for line in res.stderr.splitlines() if not line.startswith("· ")]
    assert "Traceback" not in res.stderr and len(errors) == 1 and errors[0].startswith("error: ")


@pytest.mark.parametrize("args", [
    ["analyze", "--wire-dtype", "int8", "m.onnx"],
    ["split", "--bogus", "m.onnx"],
    ["export", "efficientnet_b0", "--resolution", "abc"],
    ["models", "--nope"],
    ["nosuchverb"],
    ["bench", "."],  # click's "Missing option" message spans several lines: still one line here
    ["build", ".", "--batch-sizes", "0"],
    ["bundle", "."],
])
def test_bad_flags_are_one_line_usage_errors(args):
    res = run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0]


def test_not_a_bundle_is_one_line(tmp_path):
    (tmp_path / "b.tar").write_bytes(b"not a tar")
    res = run("serve", str(tmp_path / "b.tar"))
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: '{tmp_path / 'b.tar'}' is not a bundle (not a tar file)"


def test_truncated_model_is_one_line(tmp_path):
    model, _ = graphs.chain()
    (tmp_path / "t.onnx").write_bytes(model.SerializeToString()[:150])
    res = run("analyze", str(tmp_path / "t.onnx"))
    assert res.returncode == 1 and "Traceback" not in res.stderr and "error:" in res.stderr


def test_analyze_json_and_plot(tmp_path):
    model, _ = graphs.chain()
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = run("analyze", str(tmp_path / "m.onnx"), "--json", "--plot", str(tmp_path / "c.png"))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [c["tensor"] for c in data["cut_points"]] == ["a", "b", "c"]
    assert set(data["cut_points"][0]) >= {"tensor", "shape", "dtype", "elements", "bytes", "ratio",
                                          "element_ratio", "natural", "compressive", "scope"}
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_table_and_summary(tmp_path):
    model, _ = graphs.chain()
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = run("analyze", str(tmp_path / "m.onnx"))
    assert res.returncode == 0
    assert "3 cut points, 1 natural bottlenecks, 1 compressive" in res.stdout
    assert res.stdout.splitlines()[1].split()[:3] == ["#", "tensor", "shape"]


def test_split_writes_and_reports(tmp_path):
    model, _ = graphs.chain()
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = run("split", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    assert "manifest.json" in res.stdout and "verified" in res.stdout
    assert (tmp_path / "s" / "head-cut002.onnx").is_file()


def test_split_at_non_cut_point_is_one_line(tmp_path):
    model, _ = graphs.residual()
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = run("split", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s"), "--at", "b")
    assert res.returncode == 1 and "nearest cut points: 'a', 's'" in res.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("given, want", [([], (1.0, 3.0)), (["--switch-p", "0.3"], (0.3, 3.0)),
                                         (["--wait-price", "0"], (1.0, 0.0))])
def test_run_hands_switch_p_and_wait_price_to_the_client(tmp_path, monkeypatch, given, want):
    """``run --switch-p`` and ``--wait-price`` reach ClientOptions (the fleet's damped switch and
    the price of the wait a request adds); the client is stopped at its construction, so no
    server is needed."""
    from served_models import conv_net
    from test_serving_contract import _split_with_plan

    import dsc_export.serving.client as client_mod

    root = _split_with_plan(conv_net(outputs=("logits",)), tmp_path / "s", [1])
    seen = {}

    class Stop(Exception):
        pass

    def fake(split_dir, urls, plan, options=None, **kw):
        seen["options"] = options
        raise Stop

    monkeypatch.setattr(client_mod, "DynamicSplitClient", fake)
    res = CliRunner().invoke(cli, ["run", str(root), "--server", "127.0.0.1:1", "--batches", "1", *given])
    assert isinstance(res.exception, Stop), res.output
    assert (seen["options"].switch_p, seen["options"].wait_price) == want
