"""A statically quantized model (onnxruntime's quantize_static on a small CNN, QDQ and QOperator)
through every verb as a user runs them: split, build, bench (device and server), plan, both
bundles, serve and run; every split's answer through the server checked against onnxruntime on
the whole quantized model."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cut_models
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.http", reason="the 'serve' extra (tritonclient) is not installed")

from test_serving import free_ports  # noqa: E402

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.bundle import open_bundle  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.serving.client import ClientOptions, DynamicSplitClient  # noqa: E402

ROOT = Path(__file__).parents[1]


def _cli(*argv, env, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dsc_export", *map(str, argv)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{argv[0]}: {r.stderr}"
    return r


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_int8_model_from_split_to_run(tmp_path, fmt):
    src = cut_models.quantized(tmp_path, fmt)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    split = tmp_path / "split"
    _cli("split", src, "-o", split, env=env)
    man = read_manifest(split)
    cut_dtypes = {c.tensor: c.dtype for c in man.cut_points}
    cuts = [s for s in man.splits if s.kind == "split"]
    assert cuts and any(cut_dtypes[s.tensor] in ("uint8", "int8") for s in cuts)  # a quantized cut
    _cli("build", split, "--batch-sizes", "1,2", env=env)
    _cli("bench", split, "--role", "device", "--repeats", "2", "--warmup", "1", "--threads", "1", env=env)
    _cli("bench", split, "--role", "server", "--repeats", "2", "--warmup", "1", env=env)
    server_profile = json.loads((split / "profiles" / "server-onnxruntime.json").read_text())
    assert {(t["split"], t["batch"]) for t in server_profile["timings"]} == {
        (s.id, b) for s in man.splits if s.tail for b in (1, 2)}
    _cli("plan", split, "--device", split / "profiles" / "device-onnxruntime.json", "--server",
         split / "profiles" / "server-onnxruntime.json", "--batch-sizes", "1,2", "--rates", "1,10,100", env=env)
    _cli("bundle", split, "--server", "-o", tmp_path / "srv.tar", env=env)
    _cli("bundle", split, "--device", "-o", tmp_path / "dev.tar", env=env)

    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "dsc_export", "serve", str(tmp_path / "srv.tar"), "--http-port",
                             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        r = _cli("run", tmp_path / "dev.tar", "--server", f"127.0.0.1:{http}", "--batches", "3", "--batch-size", "2",
                 "--json", "--wait-ready", "120", env=env)
        rows = [json.loads(ln) for ln in r.stdout.splitlines()]
        assert len(rows) == 3 and all(b["batch"] == 2 and b["fallback"] is None for b in rows)
        # every candidate through the server, against onnxruntime on the whole quantized model
        device = tmp_path / "device"
        open_bundle(tmp_path / "dev.tar", device, expect_side="device")
        x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
        whole = make_session(src)
        want = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, {"image": x})))
        for s in man.splits:
            if not s.tail:
                continue
            logs = []
            with DynamicSplitClient(device, f"127.0.0.1:{http}", options=ClientOptions(static=s.id, ready_timeout_s=60),
                                    log=logs.append) as client:
                got = client.infer(x)
            assert logs[0].split == s.id and logs[0].fallback is None, (s.id, logs[0].fallback)
            assert set(got) == set(want)
            for name, w in want.items():
                assert got[name].dtype == w.dtype and np.array_equal(got[name], w), (s.id, name)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
