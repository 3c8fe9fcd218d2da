"""Offload wire forms (split --offload): codecs, bytes per sample, fidelity, refusals.

Every expected value is computed here independently: Pillow called directly for the encoded
sizes and decoded pixels, onnxruntime on the whole model for the answers.
"""

import io
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dsc_export import codecs
from dsc_export.errors import UserError
from dsc_export.offload import parse_forms
from dsc_export.ort import make_session
from dsc_export.splitting import split_model


def image_model(layout="NHWC", channels=3, hw=16, dtype=TensorProto.UINT8, classes=10):
    """uint8 image -> Cast -> (Transpose) -> Conv 3x3 -> Relu -> GlobalAveragePool -> Gemm logits."""
    rng = np.random.default_rng(0)
    shape = ["N", hw, hw, channels] if layout == "NHWC" else ["N", channels, hw, hw]
    x = helper.make_tensor_value_info("image", dtype, shape)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    inits = [numpy_helper.from_array(rng.normal(size=(8, channels, 3, 3)).astype(np.float32) / 50, "w"),
             numpy_helper.from_array(rng.normal(size=(8, classes)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")]
    nodes = [helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT)]
    src = "xf"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["xf"], ["xt"], perm=[0, 3, 1, 2]))
        src = "xt"
    nodes += [helper.make_node("Conv", [src, "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"])]
    g = helper.make_graph(nodes, "img", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def photos(k=6, hw=16, channels=3, layout="NHWC"):
    """Smooth images with a little texture (what a codec is for), uint8 [k, ...]."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    out = []
    for i in range(k):
        base = np.stack([np.sin(3 * xx + i) * 90 + 128, np.cos(2 * yy + i) * 90 + 128,
                         (xx + yy) * 60 + 20 * i], -1)[..., :channels]
        img = np.clip(base + rng.normal(scale=12, size=base.shape), 0, 255).astype(np.uint8)
        out.append(img if layout == "NHWC" else img.transpose(2, 0, 1))
    return np.stack(out)


def _pil_encode(hwc, form):
    im = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    buf = io.BytesIO()
    if form.startswith("jpeg"):
        im.save(buf, "JPEG", quality=int(form[4:]))
    elif form == "png":
        im.save(buf, "PNG", compress_level=1)  # the settings codecs documents
    else:
        im.save(buf, "WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def _pil_decode(data, channels):
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB"))
    return a[..., None] if a.ndim == 2 else a


@pytest.mark.parametrize("form", ["raw", "png", "webp", "jpeg95", "jpeg50"])
@pytest.mark.parametrize("layout,channels", [("NHWC", 3), ("NCHW", 3), ("NHWC", 1), ("NCHW", 1)])
def test_codec_round_trip(form, layout, channels):
    x = photos(3, 24, channels, layout)
    per = x.shape[1:]
    assert codecs.image_layout(per, "uint8") == layout
    z = codecs.encode_batch(x, form, layout)
    assert z.shape == (3, 1) and z.dtype == object
    y = codecs.decode_batch(z, form, per, layout)
    assert y.shape == x.shape and y.dtype == np.uint8
    if form in ("raw", "png", "webp"):
        assert np.array_equal(y, x)
        assert codecs.is_lossless(form)
    else:  # JPEG: what Pillow itself decodes from Pillow's own encoding
        hwc = x if layout == "NHWC" else x.transpose(0, 2, 3, 1)
        want = np.stack([_pil_decode(_pil_encode(h, form), channels) for h in hwc])
        want = want if layout == "NHWC" else want.transpose(0, 3, 1, 2)
        assert np.array_equal(y, want)
        assert not codecs.is_lossless(form)
        assert 0 < np.abs(y.astype(int) - x).mean() < 20
    assert codecs.payload_bytes(z) == sum(len(b) for b in z.ravel())
    if form == "raw":
        assert codecs.payload_bytes(z) == x.nbytes


@pytest.mark.parametrize("bad,why", [("jpeg101", "1..100"), ("jpeg0", "1..100"), ("jpeg095", "1..100"),
                                     ("gif", "unknown offload form"), ("jpeg", "unknown offload form")])
def test_bad_forms_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        codecs.parse_form(bad)
    with pytest.raises(UserError, match=why):
        parse_forms(f"raw,{bad}")


def test_forms_parse_in_order_with_raw_first():
    assert parse_forms("jpeg95,png,jpeg95") == ["raw", "jpeg95", "png"]
    assert parse_forms(None) == ["raw"]


def test_layout_refusals():
    with pytest.raises(ValueError, match="uint8"):
        codecs.image_layout((3, 16, 16), "float32")
    with pytest.raises(ValueError, match="channel"):
        codecs.image_layout((16, 16, 4), "uint8")
    with pytest.raises(ValueError, match="not an image"):
        codecs.image_layout((16, 16), "uint8")


@pytest.mark.parametrize("layout,channels", [("NHWC", 3), ("NCHW", 1)])
def test_split_offload_forms_bytes_and_fidelity(tmp_path, layout, channels):
    src = tmp_path / "m.onnx"
    onnx.save(image_model(layout, channels), str(src))
    x = photos(8, 16, channels, layout)
    np.savez(tmp_path / "in.npz", image=x)
    forms = ["raw", "png", "webp", "jpeg95", "jpeg20"]
    man = split_model(src, tmp_path / "split", inputs=tmp_path / "in.npz", offload=forms)
    off = [s for s in man.splits if s.kind == "offload"]
    assert [s.id for s in off] == ["offload", "offload-png", "offload-webp", "offload-jpeg95", "offload-jpeg20"]
    assert [s.wire for s in off] == forms
    assert man.splits[-1].id == "local"
    assert off[0].bytes == x[0].nbytes and off[0].fidelity["top1_agreement"] == 1.0
    hwc = x if layout == "NHWC" else x.transpose(0, 2, 3, 1)
    sess = make_session(src)
    held = list(range(4, 8))  # the second half is held out
    ref = sess.run(None, {"image": x[held]})[0]
    for s in off[1:]:
        sizes = [len(_pil_encode(h, s.wire)) for h in hwc]
        assert s.bytes == math.ceil(np.mean(sizes)), s.id
        assert s.encoded["statistic"] == "mean" and s.encoded["median"] == pytest.approx(np.median(sizes))
        assert s.encoded["samples"] == 8 and s.tail == "model.onnx" and s.head is None
        dec = np.stack([_pil_decode(_pil_encode(h, s.wire), channels) for h in hwc[held]])
        dec = dec if layout == "NHWC" else dec.transpose(0, 3, 1, 2)
        got = sess.run(None, {"image": dec})[0]
        want = float(np.mean(ref.argmax(1) == got.argmax(1)))
        assert s.fidelity["top1_agreement"] == pytest.approx(want)
        assert s.fidelity["samples"] == 4
        assert s.fidelity["max_abs"] == pytest.approx(float(np.abs(got.astype(np.float64) - ref).max()),
                                                      rel=1e-3, abs=1e-5)
        if s.wire in ("png", "webp"):
            assert s.fidelity["max_abs"] == 0.0 and s.encoded["lossless"]
    # the manifest round-trips the records
    again = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert [s.get("encoded") is not None for s in again["splits"] if s["kind"] == "offload"] == \
        [False, True, True, True, True]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsc_export", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("form,why", [("jpeg101", "1..100"), ("bmp", "unknown offload form")])
def test_cli_refuses_bad_forms_and_writes_nothing(tmp_path, form, why):
    src = tmp_path / "m.onnx"
    onnx.save(image_model(), str(src))
    r = _cli("split", str(src), "-o", str(tmp_path / "out"), "--offload", f"raw,{form}")
    assert r.returncode == 1 and why in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_refuses_a_codec_on_a_float_input(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(image_model("NCHW", 3, dtype=TensorProto.FLOAT), str(src))
    r = _cli("split", str(src), "-o", str(tmp_path / "out"), "--offload", "raw,jpeg95")
    lines = r.stderr.strip().splitlines()  # progress, then the one error line
    assert r.returncode == 1 and [x for x in lines if x.startswith("error")] == lines[-1:]
    assert "takes floats" in r.stderr and "uint8" in r.stderr and "--float-input" in r.stderr
    assert not (tmp_path / "out").exists()
    # raw alone needs no codec: the float model splits as before
    assert _cli("split", str(src), "-o", str(tmp_path / "out"), "--offload", "raw").returncode == 0


def _split_built(tmp_path, forms=("raw", "png", "jpeg90"), batches=(1, 2)):
    from dsc_export.engines import build_engines

    src = tmp_path / "m.onnx"
    onnx.save(image_model(), str(src))
    np.savez(tmp_path / "in.npz", image=photos(6))
    split = tmp_path / "split"
    split_model(src, split, inputs=tmp_path / "in.npz", offload=list(forms))
    build_engines(split, "onnxruntime", batch_sizes=list(batches), parts="all")
    return split


def test_profiles_time_the_encoder_as_head_and_decode_in_the_tail(tmp_path):
    from dsc_export.artifacts import read_manifest
    from dsc_export.planning import candidates
    from dsc_export.profiling import profile_split_dir

    split = _split_built(tmp_path)
    dev = profile_split_dir(split, "device", repeats=3, warmup=1, threads=1, slowdown=2.0)
    srv = profile_split_dir(split, "server", repeats=3, warmup=1)
    t = {(x.split, x.part, x.batch): x for x in dev.timings + srv.timings}
    for b in (1, 2):
        for sid in ("offload-png", "offload-jpeg90"):
            assert t[(sid, "head", b)].median_ms > 0  # the encoder, on the device
            # the tail: decode on top of the whole model as timed for offload
            assert t[(sid, "tail", b)].median_ms > t[("offload", "tail", b)].median_ms
        assert ("offload", "head", b) not in t
    assert "codec_inputs" in dev.settings and "photos" in dev.settings["codec_inputs"]
    man = read_manifest(split)
    excluded = {}
    lossless = {c.id for c in candidates(man, dev, srv, excluded=excluded)}
    assert {"offload", "offload-png"} <= lossless and "offload-jpeg90" in excluded  # JPEG is lossy
    agree = man.split("offload-jpeg90").fidelity["top1_agreement"]
    assert "offload-jpeg90" in {c.id for c in candidates(man, dev, srv, min_agreement=agree)}
    cands = {c.id: c for c in candidates(man, dev, srv, admit_all=True)}
    assert cands["offload"].head_ms == [0.0, 0.0]
    assert cands["offload-jpeg90"].head_ms == [t[("offload-jpeg90", "head", b)].median_ms for b in (1, 2)]
    assert cands["offload-jpeg90"].bytes == read_manifest(split).split("offload-jpeg90").bytes
