"""The server and the client under the output contract, on tiny models (one output of every kind,
a fixed-batch model, a batch-dependent one), and the files a stock Triton reads."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from served_models import conv_net, outputs_model, run_script, set_batch_fields, stub_trtexec

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.http", reason="the 'serve' extra (tritonclient) is not installed")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.bundle import make_bundle, open_bundle  # noqa: E402
from dsc_export.engines import build_engines  # noqa: E402
from dsc_export.errors import UserError  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.planning import make_plan  # noqa: E402
from dsc_export.profiling import profile_split_dir  # noqa: E402
from dsc_export.serving.client import ClientOptions, DynamicSplitClient  # noqa: E402
from dsc_export.serving.protocol import LOAD, META, served_outputs  # noqa: E402
from dsc_export.serving.server import ServeOptions, TailServer, free_ports  # noqa: E402
from dsc_export.splitting import split_model  # noqa: E402

ROOT = Path(__file__).parents[1]


def _split_with_plan(model, root: Path, batches, **fields) -> Path:
    onnx.save(model, root.with_suffix(".onnx"))
    split_model(root.with_suffix(".onnx"), root)
    if fields:
        set_batch_fields(root, **fields)
    build_engines(root, "onnxruntime", batch_sizes=batches, parts="all", keep_all=True)
    dev = profile_split_dir(root, "device", batch_sizes=batches, repeats=2, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", batch_sizes=batches, repeats=2, warmup=1)
    plan = make_plan(read_manifest(root), dev, srv, batch_sizes=batches, rates=[1, 10, 100])
    (root / "plan.json").write_text(plan.to_json())
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    return {
        "kinds": _split_with_plan(outputs_model(), base / "kinds", [1, 2]),
        # input [2, ...] and samples that depend on their batch-mates (as split will record it)
        "fixed": _split_with_plan(conv_net(batch=2, outputs=("logits", "prototypes")), base / "fixed", [2],
                                  fixed_batch=2, batch_independent=False),
        "dependent": _split_with_plan(conv_net(outputs=("logits",)), base / "dependent", [1, 2],
                                      batch_independent=False),
        # same architecture and split ids as "kinds", other weights: another model
        "other": _split_with_plan(conv_net(outputs=("logits", "scores_t", "feat", "prototypes"), seed=9),
                                  base / "other", [1, 2]),
    }


def _server(root: Path):
    http, grpc, metrics = free_ports(3)
    return TailServer(root, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                         threads=1,
                                         log_file=root.parent / f"triton-{root.name}.log"))


@pytest.fixture(scope="module")
def kinds_server(dirs):
    with _server(dirs["kinds"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def fixed_server(dirs):
    with _server(dirs["fixed"]) as srv:
        yield srv


def _whole(root: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = make_session(root / read_manifest(root).model.path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_output_kind_comes_back_as_the_model_returns_it(dirs, kinds_server, protocol):
    root = dirs["kinds"]
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _whole(root, x)
    assert want["scores_t"].shape == (10, 2) and want["prototypes"].shape == (16, 10)
    for split in ("offload", "cut004"):
        logs = []
        with DynamicSplitClient(root, kinds_server.urls()[protocol], options=ClientOptions(
            protocol=protocol, static=split, ready_timeout_s=5), log=logs.append) as client:
            got = client.infer(x)
        assert logs[0].split == split and logs[0].fallback is None  # answered by the server, not locally
        assert set(got) == set(want)
        for name, w in want.items():
            assert got[name].shape == w.shape, (split, name)
            assert np.abs(got[name] - w).max() <= 1e-5 * np.abs(w).max(), (split, name)


def test_server_configs_follow_the_contract(dirs, kinds_server, fixed_server):
    import tritonclient.http as th

    c = th.InferenceServerClient(kinds_server.urls()["http"])
    cfg = c.get_model_config("cut004")
    outs = {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]}
    assert outs == {"logits": [10], "scores_t": [10], "feat": [-1, -1, -1], "server_ms": [1], "queue_ms": [1]}
    assert cfg["max_batch_size"] == 64 and "dynamic_batching" in cfg
    c.close()
    c = th.InferenceServerClient(fixed_server.urls()["http"])
    cfg = c.get_model_config("cut004")
    assert cfg.get("max_batch_size", 0) == 0 and "dynamic_batching" not in cfg
    assert [int(d) for d in cfg["input"][0]["dims"]] == [2, 16, 1, 1]
    assert {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]} == {
        "logits": [2, 10], "prototypes": [16, 10], "server_ms": [1], "queue_ms": [1]}
    c.close()


def test_fixed_batch_model_is_served_at_its_batch_only(dirs, fixed_server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    root = dirs["fixed"]
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _whole(root, x)
    for split in ("offload", "cut004"):
        logs = []
        with DynamicSplitClient(root, fixed_server.urls()["http"], options=ClientOptions(
            static=split, ready_timeout_s=5), log=logs.append) as client:
            got = client.infer(x)
            with pytest.raises(UserError, match="runs at batch size 2 only; this batch has 3"):
                client.infer(np.zeros((3, 3, 16, 16), np.float32))
        assert logs[0].fallback is None and logs[0].split == split
        for name, w in want.items():
            assert got[name].shape == w.shape and np.abs(got[name] - w).max() <= 1e-5 * np.abs(w).max()
    c = th.InferenceServerClient(fixed_server.urls()["http"])
    one = th.InferInput("input", [1, 3, 16, 16], "FP32")
    one.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="shape"):  # Triton itself refuses another batch
        c.infer("offload", [one])
    c.close()


class _Recorder:
    """A part runner that records the batch sizes it is given."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []

    def run(self, feeds, outputs=None):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.runner.run(feeds, outputs)


def test_merging_follows_the_manifest(dirs):
    """The server's callable: merged requests run as one batch and are split back per request
    (batch-last outputs included) only for a mergeable model; otherwise each runs alone."""
    from dsc_export.engines import PartRunner

    root = dirs["kinds"]
    man = read_manifest(root)
    srv = TailServer(root)
    s = man.split("cut004")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (2, 1)]
    head = make_session(root / s.head)
    reqs = [{"input": head.run([s.wire_tensor], {"image": x})[0]} for x in xs]
    for merge, batches in ((True, [3]), (False, [2, 1])):
        rec = _Recorder(PartRunner(root, man, s.id, "tail"))
        answers = srv._infer_fn(s.id, rec, s.wire_tensor, served_outputs(root, man), merge)(reqs)
        assert rec.batches == batches
        for x, ans in zip(xs, answers):
            want = _whole(root, x)
            assert set(ans) == {"logits", "scores_t", "feat", "server_ms", "queue_ms"}
            assert np.array_equal(ans["scores_t"], np.ascontiguousarray(want["scores_t"].T))  # batch first
            assert ans["scores_t"].flags["C_CONTIGUOUS"] and ans["server_ms"].shape == (len(x), 1)
            assert np.allclose(ans["logits"], want["logits"], rtol=0, atol=1e-5 * np.abs(want["logits"]).max())


class _FakeTriton:
    bound: list = []

    def __init__(self, config, security_config=None):
        pass

    def bind(self, **kw):
        _FakeTriton.bound.append(kw)

    def run(self):
        pass

    def stop(self):
        pass


@pytest.mark.parametrize("name,dynamic,max_batch", [("kinds", True, 64), ("dependent", False, 64), ("fixed", False, 0)])
def test_pytriton_models_merge_requests_only_where_the_model_allows(dirs, monkeypatch, name, dynamic, max_batch):
    import pytriton.triton
    from pytriton.model_config import DynamicBatcher

    monkeypatch.setattr(pytriton.triton, "Triton", _FakeTriton)
    monkeypatch.setattr(TailServer, "_wait_ready", lambda self, models: None)
    monkeypatch.setattr(TailServer, "_warm_up", lambda self, tails: None)  # nothing to answer it
    _FakeTriton.bound = []
    TailServer(dirs[name]).start()
    tails = [b for b in _FakeTriton.bound if b["model_name"] not in (META, LOAD)]
    assert tails and all(isinstance(b["config"].batcher, DynamicBatcher) == dynamic for b in tails)
    assert all((b["config"].max_batch_size if b["config"].batching else 0) == max_batch for b in tails)
    if name != "kinds":
        with pytest.raises(UserError, match="serve it without --dynamic-batching"):
            TailServer(dirs[name], ServeOptions(dynamic_batching=True)).start()


def test_client_waits_then_refuses_a_server_that_is_not_there(dirs):
    (port,) = free_ports(1)
    t0 = time.monotonic()
    said = []
    with pytest.raises(UserError, match=f"127.0.0.1:{port} does not answer within 1.5 s"):
        DynamicSplitClient(dirs["kinds"], f"127.0.0.1:{port}", options=ClientOptions(
            ready_timeout_s=1.5), say=said.append)
    assert 1.5 <= time.monotonic() - t0 < 10
    assert said and "waiting up to 1.5 s" in said[0]


def test_client_refuses_a_ready_server_of_another_model(dirs, kinds_server):
    with pytest.raises(UserError, match="serves another model"):
        DynamicSplitClient(dirs["other"], kinds_server.urls()["http"], options=ClientOptions(
            ready_timeout_s=5))
    import tritonclient.http as th

    from dsc_export.serving.protocol import wait_ready

    url = kinds_server.urls()["http"]
    c = th.InferenceServerClient(url)
    with pytest.raises(UserError, match=r"127.0.0.1:\d+ has not made cut009 ready within 1 s; serve this split"):
        wait_ready(c, ["cut004", "cut009"], 1, url)
    c.close()


def test_server_bundle_repository_follows_the_contract(dirs, tmp_path):
    for name, batching, dims_in in (("kinds", True, [16, 1, 1]), ("fixed", False, [2, 16, 1, 1]),
                                    ("dependent", False, [16, 1, 1])):
        out = tmp_path / name
        make_bundle(dirs[name], "server", tmp_path / f"{name}.tar")
        open_bundle(tmp_path / f"{name}.tar", out, expect_side="server")
        cfg = text_format.Parse((out / "triton" / "cut004" / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
        assert cfg.name == "cut004" and cfg.HasField("dynamic_batching") == batching
        assert cfg.max_batch_size == (0 if name == "fixed" else 64) and list(cfg.input[0].dims) == dims_in
        assert cfg.parameters["dsc_model_sha256"].string_value == read_manifest(dirs[name]).model.sha256
    cfg = text_format.Parse((tmp_path / "kinds" / "triton" / "cut004" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert {o.name: list(o.dims) for o in cfg.output} == {"logits": [10], "scores_t": [10], "feat": [-1, -1, -1]}
    # the repository's ONNX answers as the server does: batch first, no constant output
    root, man = dirs["kinds"], read_manifest(dirs["kinds"])
    x = np.random.default_rng(6).standard_normal((3, 3, 16, 16)).astype(np.float32)
    z = make_session(root / man.split("cut004").head).run(None, {"image": x})[0]
    repo = make_session(tmp_path / "kinds" / "triton" / "cut004" / "1" / "model.onnx")
    got = dict(zip([o.name for o in repo.get_outputs()], repo.run(None, {"input": z})))
    want = _whole(root, x)
    assert set(got) == {"logits", "scores_t", "feat"}
    assert np.abs(got["scores_t"] - want["scores_t"].T).max() <= 1e-5 * np.abs(want["scores_t"]).max()


def test_tensorrt_repository_script_quotes_and_follows_the_batch(dirs, tmp_path):
    bin_dir, log = stub_trtexec(tmp_path)
    for name in ("kinds", "fixed"):
        make_bundle(dirs[name], "server", tmp_path / f"{name}.tar", triton_platform="tensorrt_plan", max_batch_size=8)
        with tarfile.open(tmp_path / f"{name}.tar") as t:
            t.extractall(tmp_path / name, filter="data")
        log.unlink(missing_ok=True)
        r = run_script(tmp_path / name / "triton" / "build-plans.sh", tmp_path, bin_dir)
        assert r.returncode == 0, r.stderr
        calls = {json.loads(ln)[0]: json.loads(ln) for ln in log.read_text().splitlines()}
        argv = calls["--onnx=cut004/model.onnx"]
        if name == "kinds":
            assert argv == ["--onnx=cut004/model.onnx", "--saveEngine=cut004/1/model.plan",
                            "--minShapes='input':1x16x1x1", "--optShapes='input':4x16x1x1",
                            "--maxShapes='input':8x16x1x1", "--stronglyTyped", "--noTF32"]
        else:  # input [2, 16, 1, 1]: fully static, trtexec takes no shapes
            assert argv == ["--onnx=cut004/model.onnx", "--saveEngine=cut004/1/model.plan", "--stronglyTyped",
                            "--noTF32"]
        assert (tmp_path / name / "triton" / "cut004" / "1" / "model.plan").is_file()


def test_bundle_trtexec_lines_clear_tf32_as_build_does(dirs, tmp_path):
    """The server bundle's build-plans.sh and build --emit-trtexec clear TF32 alike for a float32
    model (one writer of trtexec lines): TensorRT would otherwise compute float32 convolutions and
    matrix products in TF32 on Ampere and newer."""
    from dsc_export.backends.tensorrt_tools import emit_trtexec

    root = dirs["kinds"]
    assert read_manifest(root).model.input.dtype == "float32"
    make_bundle(root, "server", tmp_path / "s.tar", triton_platform="tensorrt_plan")
    with tarfile.open(tmp_path / "s.tar") as t:
        script = t.extractfile("triton/build-plans.sh").read().decode()
    bundle_lines = [shlex.split(ln) for ln in script.splitlines() if ln.startswith("trtexec")]
    emit_trtexec(root, tmp_path / "build.sh", batch_sizes=[1, 2], parts="tails", precision="fp32")
    build_lines = [shlex.split(ln) for ln in (tmp_path / "build.sh").read_text().splitlines()
                   if ln.startswith("trtexec")]
    emit_trtexec(root, tmp_path / "fp16.sh", batch_sizes=[1], parts="tails", precision="fp16")
    fp16_lines = [shlex.split(ln) for ln in (tmp_path / "fp16.sh").read_text().splitlines()
                  if ln.startswith("trtexec")]
    assert len(bundle_lines) == len([s for s in read_manifest(root).splits if s.tail]) > 0
    assert build_lines and fp16_lines
    for flag in ("--noTF32", "--stronglyTyped"):
        assert all(flag in argv for argv in bundle_lines) and all(flag in argv for argv in build_lines)
    assert all("--noTF32" not in argv for argv in fp16_lines)  # fp16: the ONNX's types decide, as build


def test_device_bundle_needs_a_plan(dirs, tmp_path):
    root = tmp_path / "noplan"
    shutil.copytree(dirs["kinds"], root)
    (root / "plan.json").unlink()
    with pytest.raises(UserError, match="has no plan.json.*run dsc-export plan first"):
        make_bundle(root, "device", tmp_path / "dev.tar")
    assert not (tmp_path / "dev.tar").exists()
    r = subprocess.run([sys.executable, "-m", "dsc_export", "bundle", str(root), "--device", "-o",
                        str(tmp_path / "dev.tar")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "dsc-export plan first" in r.stderr


def test_cli_serve_says_ready_only_with_every_model_ready_and_run_uses_it(dirs, tmp_path):
    import tritonclient.http as th

    root = dirs["fixed"]
    make_bundle(root, "server", tmp_path / "srv.tar")
    make_bundle(root, "device", tmp_path / "dev.tar")
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["TMPDIR"] = str(tmp_path)  # where serve keeps Triton's log by default
    proc = subprocess.Popen([sys.executable, "-m", "dsc_export", "serve", str(tmp_path / "srv.tar"), "--http-port",
                             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # run started with the server: it waits for the models instead of running locally
        r = subprocess.run([sys.executable, "-m", "dsc_export", "run", str(tmp_path / "dev.tar"), "--server",
                            f"127.0.0.1:{http}", "--batches", "3", "--json", "--wait-ready", "120"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(ln) for ln in r.stdout.splitlines()]
        assert len(rows) == 3 and all(b["batch"] == 2 and b["fallback"] is None for b in rows)  # batch = fixed 2
        assert "waiting up to 120 s" in r.stderr
        line = ""
        while "all ready" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve ended before saying it was ready"
        c = th.InferenceServerClient(f"127.0.0.1:{http}")
        man = read_manifest(root)
        assert all(c.is_model_ready(s.id) for s in man.splits if s.tail) and c.is_model_ready(META)
        c.close()
        assert "batch size 2 only" in line
        r = subprocess.run([sys.executable, "-m", "dsc_export", "run", str(tmp_path / "dev.tar"), "--server",
                            f"127.0.0.1:{http}", "--batch-size", "3"], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            "error: the model runs at batch size 2 only; run it with --batch-size 2 (or leave --batch-size out)"]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group gets it
        out, err = proc.communicate(timeout=60)
        # Triton's own lines (glog "E1129 12:00:00...", "Signal (2) received.", the stubs') are in its log only
        said = [ln for ln in (out + err).splitlines() if ln.strip()]
        raw = [ln for ln in said if re.match(r"^[IWEF]\d{4} ", ln) or "Signal (" in ln or "Triton" in ln.split(":")[0]
               or "Non-graceful" in ln]
        assert raw == [] and proc.returncode == 0, said
        log = tmp_path / f"dsc-export-triton-{http}.log"
        assert f"Triton's log: {log}" in line and "Signal (2) received." in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_serve_run_and_device_bundle_refuse_an_output_no_server_can_answer(dirs, tmp_path):
    """The same one line as build and bundle --server (tests/test_contract.py), before anything
    starts: serve, run and bundle --device agree."""
    onnx.save(conv_net(outputs=("logits", "batch_mean")), tmp_path / "bm.onnx")
    root = tmp_path / "bm"
    split_model(tmp_path / "bm.onnx", root, verify=False)  # verified, split refuses it itself
    plan = json.loads((dirs["kinds"] / "plan.json").read_text())
    plan["model_sha256"] = read_manifest(root).model.sha256
    (root / "plan.json").write_text(json.dumps(plan))
    msg = "output 'batch_mean' has shape [10]: no axis follows the batch size and it depends on the input"
    for call in (lambda: TailServer(root).start(),
                 lambda: DynamicSplitClient(root, "127.0.0.1:1", options=ClientOptions(
                     ready_timeout_s=0)),
                 lambda: make_bundle(root, "device", tmp_path / "dev.tar")):
        with pytest.raises(UserError) as exc:
            call()
        assert str(exc.value).startswith(msg)


def test_cli_serve_refuses_dynamic_batching_where_requests_must_not_merge(dirs):
    r = subprocess.run([sys.executable, "-m", "dsc_export", "serve", str(dirs["dependent"]), "--dynamic-batching"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: dynamic batching would merge requests of several devices into one batch, but one sample's result "
        "depends on the other samples of its batch (batch statistics); serve it without --dynamic-batching"]
