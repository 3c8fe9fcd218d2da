"""Serving: the tails server over HTTP and gRPC, bundles, and the client's local fallback."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.http", reason="the 'serve' extra (tritonclient) is not installed")

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.bundle import make_bundle, open_bundle  # noqa: E402
from dsc_export.engines import build_engines  # noqa: E402
from dsc_export.errors import UserError  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.planning import make_plan  # noqa: E402
from dsc_export.profiling import profile_split_dir  # noqa: E402
from dsc_export.serving.server import free_ports  # noqa: E402
from dsc_export.splitting import split_model  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def b0(exported, tmp_path_factory):
    """B0 split dir with onnxruntime engines at 1, 2, 4, quick profiles and a plan."""
    rep = exported("efficientnet_b0")
    root = tmp_path_factory.mktemp("serve") / "split"
    split_model(rep.path, root)
    build_engines(root, "onnxruntime", batch_sizes=[1, 2, 4], parts="all")
    dev = profile_split_dir(root, "device", batch_sizes=[1, 2, 4], repeats=3, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", batch_sizes=[1, 2, 4], repeats=3, warmup=1)
    plan = make_plan(read_manifest(root), dev, srv, batch_sizes=[1, 2, 3, 4], rates=[1, 10, 100])
    (root / "plan.json").write_text(plan.to_json())
    slow = profile_split_dir(root, "device", batch_sizes=[1, 2, 4], repeats=3, warmup=1, threads=1, slowdown=50)
    slow_plan = make_plan(read_manifest(root), slow, srv, batch_sizes=[1, 2, 3, 4], rates=[1, 10, 100])
    (root.parent / "plan-slow-device.json").write_text(slow_plan.to_json())  # offloading always wins
    return root


@pytest.fixture(scope="module")
def server(b0):
    from dsc_export.serving.server import ServeOptions, TailServer

    http, grpc, metrics = free_ports(3)
    with TailServer(b0, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics,
                                     threads=2, log_file=b0.parent / "triton.log")) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_split_answers_like_the_whole_model(b0, server, protocol):
    from tritonclient.utils import np_to_triton_dtype

    mod = __import__(f"tritonclient.{protocol}", fromlist=["x"])
    url = server.urls()[protocol]
    client = mod.InferenceServerClient(url)
    man = read_manifest(b0)
    x = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    want = make_session(b0 / man.model.path).run(None, {"image": x})[0]
    for s in man.splits:
        if not s.tail:
            continue
        z = x if s.kind == "offload" else make_session(b0 / s.head).run([s.wire_tensor], {"image": x})[0]
        inp = mod.InferInput("input", list(z.shape), np_to_triton_dtype(z.dtype))
        if protocol == "http":
            inp.set_data_from_numpy(z, binary_data=True)
        else:
            inp.set_data_from_numpy(z)
        res = client.infer(s.id, [inp])
        got = res.as_numpy("logits")
        assert got.shape == want.shape
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, s.id
        assert res.as_numpy("server_ms").shape == (3, 1) and res.as_numpy("server_ms")[0, 0] > 0
    client.close()
    assert server.stats.requests.get("offload", 0) >= 1


def test_wrong_tensors_get_the_protocol_error_and_the_server_lives_on(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = th.InferenceServerClient(server.urls()["http"])
    bad_shape = th.InferInput("input", [1, 224, 224, 4], "UINT8")
    bad_shape.set_data_from_numpy(np.zeros((1, 224, 224, 4), np.uint8), binary_data=True)
    with pytest.raises(InferenceServerException, match="shape"):
        c.infer("offload", [bad_shape])
    bad_type = th.InferInput("input", [1, 224, 224, 3], "FP32")
    bad_type.set_data_from_numpy(np.ones((1, 224, 224, 3), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="(?i)data-?type|dtype|type"):
        c.infer("offload", [bad_type])
    assert c.is_server_live() and c.is_model_ready("offload")
    c.close()


def test_client_runs_batches_against_the_server(b0, server):
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    logs = []
    man = read_manifest(b0)
    whole = make_session(b0 / man.model.path)
    rng = np.random.default_rng(1)
    with DynamicSplitClient(b0, server.urls()["http"], options=ClientOptions(
        initial_rate_MBps=100.0), log=logs.append) as c:
        for _ in range(4):
            x = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
            got = c.infer(x)["logits"]
            want = whole.run(None, {"image": x})[0]
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert len(logs) == 4 and all(b.fallback is None for b in logs)
    sent = [b for b in logs if b.split != "local"]
    assert all(b.bytes > 0 and b.measured_rate_MBps is None or b.measured_rate_MBps > 0 for b in sent)


def test_privacy_never_sends_the_raw_input(b0, server):
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    logs = []
    # a fast link: offload would win without privacy
    with DynamicSplitClient(b0, server.urls()["grpc"], options=ClientOptions(
        protocol="grpc", privacy=True, initial_rate_MBps=1000.0), log=logs.append) as c:
        for _ in range(3):
            c.infer(np.random.default_rng(2).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8))
    assert logs and all(b.planned != "offload" and b.split != "offload" for b in logs)


def test_bundles_round_trip(b0, tmp_path):
    dev = make_bundle(b0, "device", tmp_path / "dev.tar")
    srv = make_bundle(b0, "server", tmp_path / "srv.tar")
    assert "plan.json" in dev["files"] and any(f.startswith("head-") for f in dev["files"])
    assert not any(f.startswith("tail-") for f in dev["files"])
    assert any(f.startswith("triton/cut033/") for f in srv["files"])
    assert not any(f.startswith("head-") for f in srv["files"])
    out = tmp_path / "dev"
    open_bundle(tmp_path / "dev.tar", out, expect_side="device")
    man = read_manifest(out)
    assert all(e.part == "head" for e in man.engines) and man.engines
    cfg = (tmp_path / "x").mkdir() or None
    open_bundle(tmp_path / "srv.tar", tmp_path / "srv", expect_side="server")
    cfg = (tmp_path / "srv" / "triton" / "cut033" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and 'name: "input"' in cfg and "dynamic_batching" in cfg
    repo_model = tmp_path / "srv" / "triton" / "cut033" / "1" / "model.onnx"
    sess = make_session(repo_model)
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_outputs()[0].name == "logits"
    with pytest.raises(UserError, match="server bundle"):
        open_bundle(tmp_path / "srv.tar", tmp_path / "again", expect_side="device")


def _rewrite(src: Path, dst: Path, edit):
    with tarfile.open(src) as t, tarfile.open(dst, "w") as out:
        for m in t.getmembers():
            data = t.extractfile(m).read()
            m2, data2 = edit(m, data)
            if m2 is not None:
                m2.size = len(data2)
                out.addfile(m2, io.BytesIO(data2))


def _append(src: Path, dst: Path, member: tarfile.TarInfo, data: bytes | None):
    """A copy of the tar ``src`` with one more member."""
    with tarfile.open(src) as t, tarfile.open(dst, "w") as out:
        for m in t.getmembers():
            out.addfile(m, t.extractfile(m))
        out.addfile(member, io.BytesIO(data) if data is not None else None)


def test_tampered_and_unsafe_bundles_are_refused(b0, tmp_path):
    make_bundle(b0, "device", tmp_path / "dev.tar")

    def flip(m, d):
        return m, (d[:-1] + bytes([d[-1] ^ 1])) if m.name == "head-cut033.onnx" else d

    _rewrite(tmp_path / "dev.tar", tmp_path / "t1.tar", flip)
    with pytest.raises(UserError, match="head-cut033.onnx.*sha256"):
        open_bundle(tmp_path / "t1.tar", tmp_path / "o1")
    assert not (tmp_path / "o1").exists() and not any(p.name.startswith(".o1") for p in tmp_path.iterdir())

    evil = tarfile.TarInfo("../evil.txt")
    evil.size = 3
    _append(tmp_path / "dev.tar", tmp_path / "t2.tar", evil, b"bad")
    with pytest.raises(UserError, match="unsafe path"):
        open_bundle(tmp_path / "t2.tar", tmp_path / "o2")
    assert not (tmp_path / "evil.txt").exists()

    link = tarfile.TarInfo("heads/link.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _append(tmp_path / "dev.tar", tmp_path / "t3.tar", link, None)
    with pytest.raises(UserError, match="link"):
        open_bundle(tmp_path / "t3.tar", tmp_path / "o3")

    extra = tarfile.TarInfo("heads/extra.onnx")
    extra.size = 1
    _append(tmp_path / "dev.tar", tmp_path / "t4.tar", extra, b"x")
    with pytest.raises(UserError, match="does not list"):
        open_bundle(tmp_path / "t4.tar", tmp_path / "o4")

    with pytest.raises(UserError, match="another model"):
        open_bundle(tmp_path / "dev.tar", tmp_path / "o5", expect_model_sha256="0" * 64)

    def old_backend(m, d):
        if m.name != "bundle.json":
            return m, d
        idx = json.loads(d)
        idx["backends"] = [{"backend": "onnxruntime", "version": "0.0.1"}]
        return m, json.dumps(idx).encode()

    _rewrite(tmp_path / "dev.tar", tmp_path / "t6.tar", old_backend)
    with pytest.raises(UserError, match="version 0.0.1"):
        open_bundle(tmp_path / "t6.tar", tmp_path / "o6")


def test_client_finishes_every_batch_when_the_server_is_killed(b0, tmp_path):
    """The server runs in its own process group and is killed (SIGKILL) in the middle of a run."""
    from dsc_export.planning import Plan
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    plan = Plan.from_dict(json.loads((b0.parent / "plan-slow-device.json").read_text()))
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "dsc_export", "serve", str(b0), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1",
                             "--triton-log", str(tmp_path / "triton.log")],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import tritonclient.http as th

        c = th.InferenceServerClient(f"127.0.0.1:{http}")
        t0 = time.time()
        while True:
            try:
                if c.is_server_ready() and c.is_model_ready("offload") and c.is_model_ready("dsc_meta"):
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.time() - t0 > 120:
                why = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
                pytest.fail(f"server did not start: {why}")
            time.sleep(0.5)
        c.close()
        logs = []
        man = read_manifest(b0)
        whole = make_session(b0 / man.model.path)
        rng = np.random.default_rng(3)
        with DynamicSplitClient(b0, f"127.0.0.1:{http}", plan, options=ClientOptions(
            initial_rate_MBps=100.0, deadline_s=3.0, backoff_s=0.2, max_backoff_s=0.5), log=logs.append) as client:
            for k in range(10):
                if k == 4:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                x = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
                got = client.infer(x)["logits"]
                want = whole.run(None, {"image": x})[0]
                assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        assert len(logs) == 10, logs
        assert all(b.fallback is None and b.split != "local" for b in logs[:4]), logs[:4]
        assert logs[4].fallback and logs[4].planned != "local"  # the first batch after the kill fell back
        assert all(b.split == "local" for b in logs[4:])  # finished here, server retried after the back-off
        assert sum(1 for b in logs[4:] if b.fallback) >= 2, logs[4:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
