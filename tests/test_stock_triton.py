"""A server bundle's repository on a stock Triton: the Python-backend repository served by the
``tritonserver`` binary in PyTriton's wheel, Triton's statistics API, and every backend's
``config.pbtxt`` checked against Triton's own ``ModelConfig`` and the repository's ONNX."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
from served_models import conv_net, outputs_model

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.grpc", reason="the 'serve' extra (tritonclient) is not installed")

from google.protobuf import json_format, text_format  # noqa: E402
from test_serving_contract import _split_with_plan  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import np_to_triton_dtype  # noqa: E402

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.bundle import make_bundle, open_bundle  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.serving.client import ClientOptions, DynamicSplitClient  # noqa: E402
from dsc_export.serving.server import free_ports  # noqa: E402
from dsc_export.serving.tritonserver import TritonServer, model_stats  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("stock")
    return {
        "kinds": _split_with_plan(outputs_model(), base / "kinds", [1, 2]),
        "fixed": _split_with_plan(conv_net(batch=2, outputs=("logits", "prototypes")), base / "fixed", [2],
                                  fixed_batch=2, batch_independent=False),
    }


def _repository(root: Path, out: Path, platform: str = "python") -> Path:
    """The server bundle's ``triton/`` as a user unpacks it."""
    make_bundle(root, "server", out.with_suffix(".tar"), triton_platform=platform)
    open_bundle(out.with_suffix(".tar"), out, expect_side="server")
    return out / "triton"


def _stock(repo: Path) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                        log_file=repo.parent / "tritonserver.log")


@pytest.fixture(scope="module")
def kinds_stock(dirs, tmp_path_factory):
    with _stock(_repository(dirs["kinds"], tmp_path_factory.mktemp("repo") / "kinds")) as srv:
        yield srv


def _whole(root: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = make_session(root / read_manifest(root).model.path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))


def _cut(root: Path, split: str, x: np.ndarray) -> np.ndarray:
    """What the device sends for ``split``: its head's output (the raw input for offload)."""
    s = read_manifest(root).split(split)
    return x if s.kind == "offload" else make_session(root / s.head).run([s.wire_tensor], {"image": x})[0]


def _infer(mod, client, model: str, z: np.ndarray, protocol: str, names: list[str]) -> dict[str, np.ndarray]:
    inp = mod.InferInput("input", list(z.shape), np_to_triton_dtype(z.dtype))
    if protocol == "http":
        inp.set_data_from_numpy(z, binary_data=True)
    else:
        inp.set_data_from_numpy(z)
    res = client.infer(model, [inp], outputs=[mod.InferRequestedOutput(n) for n in names])
    return {n: res.as_numpy(n) for n in names}


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_tail_answers_a_stock_client_like_the_whole_model(dirs, kinds_stock, protocol):
    """Batch sizes 1 and 2 run on the engines, 3 on the ONNX; outputs batch first, no constant."""
    mod = __import__(f"tritonclient.{protocol}", fromlist=["x"])
    client = mod.InferenceServerClient(kinds_stock.url(protocol))
    root = dirs["kinds"]
    tails = [s.id for s in read_manifest(root).splits if s.tail]
    assert len(tails) >= 2 and sorted(tails) == kinds_stock.models()
    for batch in (1, 2, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        want = _whole(root, x)
        for split in tails:
            got = _infer(mod, client, split, _cut(root, split, x), protocol, ["logits", "scores_t", "feat"])
            assert _close(got["logits"], want["logits"]), (split, batch)
            assert _close(got["scores_t"], want["scores_t"].T), (split, batch)  # [10, N] served batch first
            assert _close(got["feat"], want["feat"]), (split, batch)
    cfg = client.get_model_config(tails[0])
    cfg = cfg if protocol == "http" else json_format.MessageToDict(cfg.config, preserving_proto_field_name=True)
    assert "prototypes" not in {o["name"] for o in cfg["output"]}  # a constant: the client has it
    client.close()


def test_concurrent_requests_are_merged_and_each_gets_its_own_samples(dirs, kinds_stock):
    """Dynamic batching hands model.py several requests; it runs them as one batch."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as th

    root = dirs["kinds"]
    xs = [np.random.default_rng(10 + k).standard_normal((1 + k % 2, 3, 16, 16)).astype(np.float32) for k in range(8)]
    before = model_stats(th.InferenceServerClient(kinds_stock.url()), "cut004")

    def one(x):
        c = th.InferenceServerClient(kinds_stock.url())
        try:
            return _infer(th, c, "cut004", _cut(root, "cut004", x), "http", ["logits"])["logits"]
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, xs))
    for x, g in zip(xs, got):
        assert _close(g, _whole(root, x)["logits"])
    c = th.InferenceServerClient(kinds_stock.url())
    d = model_stats(c, "cut004").minus(before)
    c.close()
    assert d.requests == len(xs) and 1 <= d.executions <= len(xs)


def test_statistics_api_gives_queue_and_compute_time_per_model(dirs, kinds_stock):
    """What a load-aware client reads from a stock Triton: per model, requests, queue and compute
    time; the same over HTTP and gRPC, and no more than the time the client waited."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    root = dirs["kinds"]
    http, grpc = th.InferenceServerClient(kinds_stock.url()), tg.InferenceServerClient(kinds_stock.url("grpc"))
    before = {m: model_stats(http, m) for m in kinds_stock.models()}
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    z = _cut(root, "offload", x)
    t0 = time.perf_counter()
    for _ in range(5):
        _infer(th, http, "offload", z, "http", ["logits"])
    waited_ms = (time.perf_counter() - t0) * 1e3
    after = {m: model_stats(http, m) for m in kinds_stock.models()}
    d = after["offload"].minus(before["offload"])
    assert d.requests == 5 and d.executions == 5  # one client, one request at a time: nothing merged
    assert d.queue_ms >= 0 and 0 < d.compute_ms and d.queue_ms + d.compute_ms < waited_ms
    assert all(after[m] == before[m] for m in after if m != "offload")  # per model
    assert model_stats(grpc, "offload") == after["offload"]
    http.close()
    grpc.close()


def test_client_reads_a_stock_servers_load_from_its_statistics(dirs, kinds_stock):
    """No dsc_load on a stock Triton: the client's load is Triton's statistics over the window
    between two reads, the same figures a reader of the statistics API computes."""
    import tritonclient.http as th

    from dsc_export.serving.protocol import QUEUE_MS, SERVER_MS
    from dsc_export.serving.transport import connect

    root = dirs["kinds"]
    models = kinds_stock.models()
    remote = connect(kinds_stock.url(), "http", 10.0)
    http = th.InferenceServerClient(kinds_stock.url())
    try:
        remote.wait_ready(models, 5, lambda pending: None)
        assert remote.model_sha256(models[0]) == read_manifest(root).model.sha256 and not remote.has_server_ms
        assert remote.load() is None  # the first read only starts the window
        before = {m: model_stats(http, m) for m in models}
        z = _cut(root, "offload", np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32))
        for _ in range(3):
            remote.infer("offload", z, ["logits"])
        load = remote.load()
        d = model_stats(http, "offload").minus(before["offload"])
        assert load.requests == d.requests == 3
        assert load.q_ms == pytest.approx(d.queue_ms / 3, rel=1e-6, abs=1e-6)
        assert remote.per_model["offload"] == pytest.approx((d.queue_ms / 3, d.compute_ms / 3), rel=1e-6, abs=1e-6)
        out = remote.infer("offload", z, ["logits"])  # the statistics stand in for server_ms / queue_ms
        assert d.compute_ms > 0 and out[SERVER_MS].ravel()[0] == pytest.approx(d.compute_ms / 3, rel=1e-5)
        assert out[QUEUE_MS].ravel()[0] == pytest.approx(d.queue_ms / 3, rel=1e-5, abs=1e-5)
    finally:
        remote.close()
        http.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_and_run_work_against_the_stock_server_unchanged(dirs, kinds_stock, protocol, tmp_path):
    """The client finds the model's sha256 in the config parameter and gets exact results."""
    root = dirs["kinds"]
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _whole(root, x)
    for split in [s.id for s in read_manifest(root).splits if s.tail]:
        logs = []
        with DynamicSplitClient(root, kinds_stock.url(protocol), options=ClientOptions(
            protocol=protocol, static=split, ready_timeout_s=5), log=logs.append) as client:
            got = client.infer(x)
        assert logs[0].split == split and logs[0].fallback is None  # answered by the stock server
        assert set(got) == set(want) and all(_close(got[n], w) for n, w in want.items()), split
    if protocol == "grpc":
        return
    make_bundle(root, "device", tmp_path / "dev.tar")
    r = subprocess.run([sys.executable, "-m", "dsc_export", "run", str(tmp_path / "dev.tar"), "--server",
                        kinds_stock.url(), "--split", "cut004", "--batch-size", "2", "--batches", "3", "--json",
                        "--wait-ready", "5"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(rows) == 3 and all(b["split"] == "cut004" and b["fallback"] is None for b in rows)


def test_fixed_batch_model_on_the_stock_server(dirs, tmp_path):
    """max_batch_size 0: Triton takes the full shape, model.py runs each request as it came."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    root = dirs["fixed"]
    with _stock(_repository(root, tmp_path / "fixed")) as srv:
        c = th.InferenceServerClient(srv.url())
        x = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32)
        want = _whole(root, x)
        for split in srv.models():
            got = _infer(th, c, split, _cut(root, split, x), "http", ["logits"])
            assert _close(got["logits"], want["logits"]), split
        with pytest.raises(InferenceServerException, match="(?i)shape"):
            _infer(th, c, "offload", np.zeros((3, 3, 16, 16), np.float32), "http", ["logits"])
        c.close()


def test_a_repository_triton_cannot_load_is_refused_in_one_line(dirs, tmp_path):
    from dsc_export.errors import UserError

    repo = _repository(dirs["kinds"], tmp_path / "broken")
    (repo / "cut004" / "1" / "model.onnx").write_bytes(b"not onnx")
    http, grpc, metrics = free_ports(3)
    with pytest.raises(UserError) as exc:  # no log_file: Triton's log is read from its work directory
        TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, ready_timeout_s=60).start()
    msg = str(exc.value)
    assert "\n" not in msg and "failed to load 'cut004'" in msg and "onnxruntime cannot load model.onnx" in msg, msg


# --- model.py in-process, with a stand-in for triton_python_backend_utils ---------------------

def _model_py(repo: Path, split: str, monkeypatch, warnings: list[str]):
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    pb.Tensor, pb.TritonError = Tensor, lambda msg: msg
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        outputs={t.name: t.array for t in output_tensors}, error=error)
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    pb.Logger = types.SimpleNamespace(log_warn=warnings.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location(f"model_{split}", repo / split / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = text_format.Parse((repo / split / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return mod, pb, cfg


def test_model_py_runs_the_engine_built_for_the_batch_size(dirs, tmp_path, monkeypatch):
    import onnxruntime as ort

    root = dirs["kinds"]
    repo = _repository(root, tmp_path / "inproc")
    warnings: list[str] = []
    mod, pb, cfg = _model_py(repo, "cut004", monkeypatch, warnings)
    built = {e.batch for e in read_manifest(root).engines if e.split == "cut004" and e.part == "tail"}
    assert built == {1, 2} and sorted((repo / "cut004" / "1").glob("model.b*.onnx")) == [
        repo / "cut004" / "1" / f"model.b{b}.onnx" for b in sorted(built)]
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True)})
    xs = [np.random.default_rng(k).standard_normal((b, 3, 16, 16)).astype(np.float32) for k, b in enumerate((1, 2))]
    answers = m.execute([{"input": pb.Tensor("input", _cut(root, "cut004", x))} for x in xs])
    assert set(m.sessions) == {None}  # two requests merged into one batch of 3: no engine, the ONNX
    for x, a in zip(xs, answers):
        assert a.error is None and _close(a.outputs["logits"], _whole(root, x)["logits"])
    m.execute([{"input": pb.Tensor("input", _cut(root, "cut004", xs[1]))}])
    assert set(m.sessions) == {None, 2} and not warnings  # batch 2: its engine
    # engines of another onnxruntime version: everything runs on the ONNX, and Triton's log says so
    engines = json.loads(cfg.parameters["dsc_engines"].string_value)
    for e in engines.values():
        e["onnxruntime"] = "0.0.1"
    cfg.parameters["dsc_engines"].string_value = json.dumps(engines)
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True)})
    assert m.engines == {} and ort.__version__ in warnings[0]
    bad = m.execute([{"input": pb.Tensor("input", np.zeros((1, 5), np.float32))}])
    assert bad[0].error and "\n" not in bad[0].error


# --- every backend's config, the way Triton checks it -------------------------------------------

@pytest.mark.parametrize("platform", ["onnxruntime_onnx", "tensorrt_plan", "python"])
@pytest.mark.parametrize("name", ["kinds", "fixed"])
def test_configs_parse_into_model_config_and_match_the_tensors(dirs, tmp_path, name, platform):
    """Each config.pbtxt parses into tritonclient's ModelConfig; its input and outputs are the
    repository ONNX's (names, Triton dtypes, dims: per sample when batching, full when not), and a
    run of that ONNX gives shapes the dims admit."""
    root = dirs[name]
    man = read_manifest(root)
    repo = _repository(root, tmp_path / name, platform)
    for s in man.splits:
        if not s.tail:
            assert not (repo / s.id).exists()
            continue
        cfg = text_format.Parse((repo / s.id / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == s.id
        assert (cfg.backend, cfg.platform) == (("python", "") if platform == "python" else ("", platform))
        assert cfg.parameters["dsc_model_sha256"].string_value == man.model.sha256
        kind = model_config_pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)
        assert kind == ("KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU")
        onnx_path = repo / s.id / ("model.onnx" if platform == "tensorrt_plan" else "1/model.onnx")
        sess = make_session(onnx_path)
        batched = cfg.max_batch_size > 0
        assert batched == (name != "fixed")

        def dims(shape):
            full = [d if isinstance(d, int) and d > 0 else -1 for d in shape]
            return full[1:] if batched else full

        def dtype(t):
            return model_config_pb2.DataType.Name(t.data_type)

        inp = sess.get_inputs()[0]
        assert [i.name for i in cfg.input] == [inp.name] == ["input"]
        assert list(cfg.input[0].dims) == dims(inp.shape)
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
        z = _cut(root, s.id, x)
        assert dtype(cfg.input[0]) == "TYPE_" + np_to_triton_dtype(z.dtype)
        assert list(cfg.input[0].dims) == [d if d == w else -1 for d, w in zip(cfg.input[0].dims, z.shape[batched:])]
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": z})))
        assert [o.name for o in cfg.output] == [o.name for o in sess.get_outputs()]
        for o in cfg.output:
            got = outs[o.name]
            assert dtype(o) == "TYPE_" + np_to_triton_dtype(got.dtype), (s.id, o.name)
            shape = got.shape[1:] if batched else got.shape
            assert len(o.dims) == len(shape) and all(d in (-1, n) for d, n in zip(o.dims, shape)), (s.id, o.name)
            if batched:
                assert got.shape[0] == 2  # batch first, as Triton splits it
        whole = _whole(root, x)
        want = {"logits", "scores_t", "feat"} if name == "kinds" else {"logits", "prototypes"}
        assert set(outs) == want and outs["logits"].shape == whole["logits"].shape


def test_cli_triton_backend_and_the_old_platform_flag(dirs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def bundle(*args):
        return subprocess.run([sys.executable, "-m", "dsc_export", "bundle", str(dirs["kinds"]), "--server", *args],
                              capture_output=True, text=True, env=env, timeout=300)

    r = bundle("-o", str(tmp_path / "py.tar"), "--triton-backend", "python")
    assert r.returncode == 0, r.stderr
    r = bundle("-o", str(tmp_path / "trt.tar"), "--triton-platform", "tensorrt_plan")
    assert r.returncode == 0, r.stderr
    r = bundle("-o", str(tmp_path / "both.tar"), "--triton-backend", "python", "--triton-platform", "tensorrt_plan")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --triton-backend python and --triton-platform tensorrt_plan disagree; give one of them"]
    assert not (tmp_path / "both.tar").exists()


    with tarfile.open(tmp_path / "py.tar") as t:
        names = set(t.getnames())
    assert {"triton/cut004/config.pbtxt", "triton/cut004/1/model.py", "triton/cut004/1/model.onnx"} <= names
    with tarfile.open(tmp_path / "trt.tar") as t:
        assert "triton/build-plans.sh" in t.getnames()
