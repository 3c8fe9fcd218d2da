"""Offload forms at run time: serve decodes, the client encodes, the bytes sent are the manifest's.

Expected answers come from onnxruntime on the whole model, fed the pixels Pillow itself decodes.
"""

import math

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
pytest.importorskip("tritonclient.http", reason="the 'serve' extra (tritonclient) is not installed")

from test_offload import _pil_decode, _pil_encode, _split_built, photos  # noqa: E402
from test_serving import free_ports  # noqa: E402

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.planning import make_plan  # noqa: E402
from dsc_export.profiling import profile_split_dir  # noqa: E402

FORMS = ("raw", "png", "webp", "jpeg90")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = _split_built(tmp_path_factory.mktemp("offload-serve"), forms=FORMS, batches=(1, 2, 6))
    dev = profile_split_dir(root, "device", repeats=3, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", repeats=3, warmup=1)
    plan = make_plan(read_manifest(root), dev, srv, batch_sizes=[1, 2, 6], rates=[1, 10, 100],
                     min_agreement=0.0)  # every form in the race, JPEG too
    (root / "plan.json").write_text(plan.to_json())
    return root


@pytest.fixture(scope="module")
def server(coded):
    from dsc_export.serving.server import ServeOptions, TailServer

    http, grpc, metrics = free_ports(3)
    with TailServer(coded, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                                        log_file=coded.parent / "triton.log")) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_offload_form_answers_and_sends_its_encoded_bytes(coded, server, protocol):
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    man = read_manifest(coded)
    x = photos(6)  # the sample inputs split sized the forms on
    whole = make_session(coded / "model.onnx")
    for form in FORMS:
        sid = "offload" if form == "raw" else f"offload-{form}"
        logs = []
        with DynamicSplitClient(coded, server.urls()[protocol], options=ClientOptions(protocol=protocol, static=sid),
                                log=logs.append) as client:
            y = client.infer(x)["logits"]
        assert logs[-1].split == sid and logs[-1].fallback is None
        if form == "raw":
            want_bytes, pixels = x.nbytes, x
        else:
            encoded = [_pil_encode(img, form) for img in x]
            want_bytes = sum(len(b) for b in encoded)
            pixels = np.stack([_pil_decode(b, 3) for b in encoded])
        assert logs[-1].bytes == want_bytes
        # the manifest's bytes per sample: the mean encoded size on these very samples
        assert man.split(sid).bytes == math.ceil(want_bytes / len(x))
        np.testing.assert_allclose(y, whole.run(None, {"image": pixels})[0], rtol=1e-4, atol=1e-4)
        if form in ("raw", "png", "webp"):  # lossless: the whole model's answer on the raw pixels
            assert np.array_equal(y.argmax(1), whole.run(None, {"image": x})[0].argmax(1))


def test_privacy_never_sends_an_encoded_image(coded, server):
    from dsc_export.errors import UserError
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    with pytest.raises(UserError, match="privacy"):
        DynamicSplitClient(coded, server.urls()["http"], options=ClientOptions(static="offload-jpeg90", privacy=True))
    logs = []
    with DynamicSplitClient(coded, server.urls()["http"], options=ClientOptions(privacy=True),
                            log=logs.append) as client:
        for rate in (1, 100):
            client.endpoints[0].estimate.rate.value = rate
            client.infer(photos(2))
    assert not any(b.split.startswith("offload") for b in logs)


@pytest.mark.parametrize("platform", ["python", "onnxruntime_onnx", "tensorrt_plan"])
def test_stock_triton_decodes_the_offload_forms(coded, tmp_path, platform):
    """A server bundle's repository: the codec forms are Python-backend models (Triton's own
    backends cannot decode), whatever the repository's; the python one served by the tritonserver
    in PyTriton's wheel (which has no onnxruntime or TensorRT backend to serve the others)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from dsc_export.bundle import make_bundle, open_bundle
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient
    from dsc_export.serving.tritonserver import TritonServer

    make_bundle(coded, "server", tmp_path / "srv.tar", triton_platform=platform)
    open_bundle(tmp_path / "srv.tar", tmp_path / "srv", expect_side="server")
    repo = tmp_path / "srv" / "triton"
    for sid in ("offload-png", "offload-jpeg90"):
        cfg = text_format.Parse((repo / sid / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.backend == "python" and (repo / sid / "1" / "dsc_codecs.py").is_file()
        assert model_config_pb2.DataType.Name(cfg.input[0].data_type) == "TYPE_STRING"
    plain = text_format.Parse((repo / "offload" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (plain.backend or plain.platform) == platform
    if platform != "python":
        return
    x = photos(3)
    whole = make_session(coded / "model.onnx")
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log") as srv:
        for sid, form in (("offload-png", "png"), ("offload-jpeg90", "jpeg90")):
            logs = []
            with DynamicSplitClient(coded, srv.url("http"), options=ClientOptions(static=sid),
                                    log=logs.append) as client:
                y = client.infer(x)["logits"]
            encoded = [_pil_encode(img, form) for img in x]
            assert logs[-1].split == sid and logs[-1].bytes == sum(len(b) for b in encoded)
            pixels = np.stack([_pil_decode(b, 3) for b in encoded])
            np.testing.assert_allclose(y, whole.run(None, {"image": pixels})[0], rtol=1e-4, atol=1e-4)


def test_a_device_bundle_carries_the_offload_forms(coded, server, tmp_path):
    """The device side needs no file for a codec form: the manifest names it, the client encodes."""
    from dsc_export.bundle import make_bundle, open_bundle
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient

    make_bundle(coded, "device", tmp_path / "dev.tar")
    open_bundle(tmp_path / "dev.tar", tmp_path / "dev", expect_side="device")
    x = photos(2)
    logs = []
    with DynamicSplitClient(tmp_path / "dev", server.urls()["http"], options=ClientOptions(static="offload-jpeg90"),
                            log=logs.append) as client:
        y = client.infer(x)["logits"]
    encoded = [_pil_encode(img, "jpeg90") for img in x]
    assert logs[-1].split == "offload-jpeg90" and logs[-1].bytes == sum(len(b) for b in encoded)
    pixels = np.stack([_pil_decode(b, 3) for b in encoded])
    want = make_session(coded / "model.onnx").run(None, {"image": pixels})[0]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
