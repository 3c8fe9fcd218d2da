"""Sample inputs: ranges from the graph, random inputs within them, .npz and image folders,
one-line refusals, and the engine check and CLI options that use them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsc_export.errors import UserError
from dsc_export.inputs import IMAGENET_MEAN, IMAGENET_STD, SampleInputs, input_ranges
from dsc_export.ort import make_session, random_array, random_inputs

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)  # outputs given without a shape
    del m.graph.output[:]
    m.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(m)
    return m


def _f32(name, shape, scale=1.0):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def token_model(batch="N", tokens=8):
    """ids int64 [N, 8] -> Gather of a [100, 16] table -> MatMul, Relu, mean over tokens ->
    MatMul [16, 4] (the compressive bottleneck) -> Relu -> MatMul -> y [N, 3]."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("ReduceMean", ["r1"], ["p"], name="pool", axes=[1], keepdims=0),
             helper.make_node("MatMul", ["p", "w2"], ["z"], name="mm2"),
             helper.make_node("Relu", ["z"], ["a"], name="relu2"),
             helper.make_node("MatMul", ["a", "w3"], ["y"], name="mm3")]
    inits = [_f32("table", (100, 16)), _f32("w1", (16, 16), 0.25), _f32("w2", (16, 4), 0.25), _f32("w3", (4, 3), 0.5)]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, tokens])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)


def image_model(layout="NHWC", dtype=TensorProto.UINT8, hw=(48, 64)):
    """An image input -> a 1x1 conv (after a Cast and Transpose for NHWC uint8) -> y."""
    h, w = hw
    shape = ["N", h, w, 3] if layout == "NHWC" else ["N", 3, h, w]
    nodes, x = [], "image"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    nodes.append(helper.make_node("Conv", [x, "w"], ["y"], kernel_shape=[1, 1]))
    return _model(nodes, [helper.make_tensor_value_info("image", dtype, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, h, w])], [_f32("w", (2, 3, 1, 1))])


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# --- ranges and random inputs -------------------------------------------------------------------


def test_todays_random_inputs_index_out_of_the_table():
    sess = make_session(token_model().SerializeToString())
    with pytest.raises(Exception, match="out of data bounds|indices"):
        sess.run(None, random_inputs(sess, 4, np.random.default_rng(0)))


def test_random_inputs_stay_within_the_table_and_run():
    m = token_model()
    assert input_ranges(m) == {"ids": (0, 99)}
    s = SampleInputs.random(m, seed=0)
    assert "random (seed 0)" in s.description and "ids in [0, 99]" in s.description
    sess = make_session(m.SerializeToString())
    seen = []
    for batch in (1, 3, 64):
        for index in (0, 1):
            ids = s.feeds(batch, index)["ids"]
            assert ids.shape == (batch, 8) and ids.dtype == np.int64
            assert ids.min() >= 0 and ids.max() <= 99
            (y,) = sess.run(None, {"ids": ids})
            assert y.shape == (batch, 3) and np.isfinite(y).all()
            seen.append(ids)
    big = s.feeds(64)["ids"]
    assert big.min() == 0 and big.max() == 99  # 512 draws of 100 values: the whole table is used
    assert not np.array_equal(s.feeds(3, 0)["ids"], s.feeds(3, 1)["ids"])  # a new draw per index
    np.testing.assert_array_equal(s.feeds(3, 1)["ids"], s.feeds(3, 1)["ids"])  # and the same one again
    assert not np.array_equal(SampleInputs.random(m, seed=1).feeds(3)["ids"], s.feeds(3)["ids"])


def test_inputs_without_a_range_keep_todays_distribution():
    # int64 tokens that only feed arithmetic, and a float input: no range known
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["f", "x"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4096]),
                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4096])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])], [])
    assert input_ranges(m) == {}
    feeds = SampleInputs.random(m).feeds(2)
    ids, x = feeds["ids"], feeds["x"]
    assert ids.min() == -128 and ids.max() == 255  # random_array: the type's range clipped to -128..255
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05 and x.dtype == np.float32
    ref = random_array((2, 4096), np.int64, np.random.default_rng(0))
    assert ref.min() == -128 and ref.max() == 255


def _gather_through(ops):
    """ids [N, 2, 3] -> ops -> Gather(table [50, 4])."""
    nodes, x, inits = [], "ids", [_f32("table", (50, 4))]
    for k, op in enumerate(ops):
        out = f"t{k}"
        if op == "Cast":
            nodes.append(helper.make_node("Cast", [x], [out], to=TensorProto.INT32))
        elif op == "Reshape":
            inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), f"s{k}"))
            nodes.append(helper.make_node("Reshape", [x, f"s{k}"], [out]))
        elif op == "Unsqueeze":
            inits.append(numpy_helper.from_array(np.array([1], np.int64), f"a{k}"))
            nodes.append(helper.make_node("Unsqueeze", [x, f"a{k}"], [out]))
        else:
            nodes.append(helper.make_node(op, [x], [out]))
        x = out
    nodes.append(helper.make_node("Gather", ["table", x], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("ops", [[], ["Cast"], ["Reshape"], ["Unsqueeze", "Flatten", "Identity"],
                                 ["Cast", "Reshape", "Identity"]])
def test_ranges_follow_index_reads_through_value_preserving_ops(ops):
    m = _gather_through(ops)
    assert input_ranges(m) == {"ids": (0, 49)}
    sess = make_session(m.SerializeToString())
    sess.run(None, SampleInputs.random(m).feeds(5))  # within the table: no onnxruntime error


def test_ranges_of_gather_axes_gather_elements_gather_nd_one_hot_and_several_reads():
    i64 = TensorProto.INT64
    vi = helper.make_tensor_value_info
    # Gather on axis 1 of a [5, 7] table; GatherElements on axis 0 of a [6, 3] graph input; OneHot depth 10
    nodes = [helper.make_node("Gather", ["t57", "a"], ["ga"], axis=1),
             helper.make_node("GatherElements", ["data", "b"], ["gb"], axis=0),
             helper.make_node("OneHot", ["c", "depth", "values"], ["oc"]),
             helper.make_node("GatherND", ["t894", "d"], ["gd"]),
             # e indexes two tables: 30 rows and 20 rows -> [0, 19]
             helper.make_node("Gather", ["t30", "e"], ["ge1"]),
             helper.make_node("Gather", ["t20", "e"], ["ge2"]),
             helper.make_node("Gather", ["t30", "f"], ["gf"], axis=1)]  # axis 1 of [30, 4]: 4
    inits = [_f32("t57", (5, 7)), _f32("t30", (30, 4)), _f32("t20", (20, 4)), _f32("t894", (8, 9, 4)),
             numpy_helper.from_array(np.array(10, np.int64), "depth"),
             numpy_helper.from_array(np.array([0, 1], np.float32), "values")]
    m = _model(nodes, [vi("a", i64, ["N", 2]), vi("data", TensorProto.FLOAT, [6, 3]), vi("b", i64, [6, 3]),
                       vi("c", TensorProto.INT32, ["N"]), vi("d", i64, ["N", 2]), vi("e", i64, ["N"]),
                       vi("f", i64, ["N"])],
               [vi(n, TensorProto.FLOAT, None) for n in ("ga", "gb", "oc", "gd", "ge1", "ge2", "gf")], inits)
    assert input_ranges(m) == {"a": (0, 6), "b": (0, 5), "c": (0, 9), "d": (0, 7), "e": (0, 19), "f": (0, 3)}


def test_ranges_read_only_dims_never_weights(tmp_path):
    """A large model: its table in external data that is never loaded (missing, even)."""
    m = token_model()
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0, location="m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()
    structure = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert input_ranges(structure) == {"ids": (0, 99)}
    assert SampleInputs.random(structure).feeds(2)["ids"].max() <= 99


# --- .npz ---------------------------------------------------------------------------------------


def test_npz_round_trip_uses_the_values_exactly(tmp_path):
    m = token_model()
    ids = RNG.integers(0, 100, (5, 8))
    np.savez(tmp_path / "tok.npz", ids=ids)
    s = SampleInputs.from_path(tmp_path / "tok.npz", m)
    assert s.count == 5 and s.description == f"5 samples from {tmp_path / 'tok.npz'}"
    np.testing.assert_array_equal(s.feeds(2, 0)["ids"], ids[[0, 1]])
    np.testing.assert_array_equal(s.feeds(2, 2)["ids"], ids[[4, 0]])  # cycles through the samples
    np.testing.assert_array_equal(s.feeds(5)["ids"], ids)
    assert s.feeds(7)["ids"].shape == (7, 8)
    sess = make_session(m.SerializeToString())
    np.testing.assert_array_equal(sess.run(None, s.feeds(5))[0], sess.run(None, {"ids": ids})[0])


def test_npz_one_sample_and_lossless_dtypes(tmp_path):
    m = token_model()
    one = np.arange(8, dtype=np.int32)  # per-sample shape, no batch axis; int32 -> int64 loses nothing
    np.savez(tmp_path / "one.npz", ids=one)
    s = SampleInputs.from_path(str(tmp_path / "one.npz"), m)
    got = s.feeds(3)["ids"]
    assert s.count == 1 and got.dtype == np.int64
    np.testing.assert_array_equal(got, np.stack([one] * 3))


# --- image folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of real photos: matplotlib's Grace Hopper (JPEG), its logo (RGBA PNG) and
    scikit-image's sample PNGs where installed."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    folder = tmp_path_factory.mktemp("photos")
    shutil.copy(sample / "grace_hopper.jpg", folder / "a_grace_hopper.jpg")
    shutil.copy(sample / "logo2.png", folder / "b_logo2.png")
    (folder / "notes.txt").write_text("not an image")
    try:
        import skimage

        for p in sorted((Path(skimage.__file__).parent / "data").glob("*.png"))[:4]:
            shutil.copy(p, folder / f"c_{p.name}")
    except ImportError:
        pass
    return folder


def _pil(path, hw):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((hw[1], hw[0]), Image.BILINEAR))


def test_folder_of_photos_as_nhwc_uint8(photos):
    m = image_model("NHWC", TensorProto.UINT8, (48, 64))
    s = SampleInputs.from_path(photos, m)
    n = len([p for p in photos.iterdir() if p.suffix != ".txt"])
    assert s.count == n
    assert s.description == f"{n} samples from {photos} (resized to 48x64, NHWC uint8)"
    x = s.feeds(2)["image"]
    assert x.shape == (2, 48, 64, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], _pil(photos / "a_grace_hopper.jpg", (48, 64)))
    assert x.std() > 20  # a photo, not a constant
    make_session(m.SerializeToString()).run(None, s.feeds(3))


def test_folder_of_photos_as_nchw_float_normalised(photos):
    m = image_model("NCHW", TensorProto.FLOAT, (32, 40))
    s = SampleInputs.from_path(photos, m)
    assert "NCHW float32, scaled to [0, 1] and normalised with ImageNet mean/std" in s.description
    x = s.feeds(1)["image"]
    assert x.shape == (1, 3, 32, 40) and x.dtype == np.float32
    want = (_pil(photos / "a_grace_hopper.jpg", (32, 40)) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    assert -2.2 < x.min() < 0 < x.max() < 2.7  # the normalised range of [0, 1] pixels


# --- refusals: one line, naming the cause -------------------------------------------------------


def _refusal(tmp_path, model, make):
    path = make(tmp_path)
    with pytest.raises(UserError) as exc:
        SampleInputs.from_path(path, model)
    return one_line(exc)


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "nope.npz", "does not exist"),
    (lambda d: (d / "x.txt").write_text("1") and d / "x.txt", "neither a .npz file nor a folder"),
    (lambda d: (d / "bad.npz").write_bytes(b"garbage") and d / "bad.npz", "not a readable .npz"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((2, 8), np.int64), tokens=np.zeros(3)) or d / "a.npz",
     "array 'tokens' but the model has no such input (its inputs: 'ids')"),
    (lambda d: np.savez(d / "a.npz", other=np.zeros(3)) or d / "a.npz", "no such input"),
    (lambda d: np.savez(d / "a.npz") or d / "a.npz", "no array for input 'ids'"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((2, 9), np.int64)) or d / "a.npz",
     "input 'ids' in"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((2, 9), np.int64)) or d / "a.npz",
     "has shape [2, 9]; expected [K, 8] (K >= 1 samples) or [8] (one sample)"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((0, 8), np.int64)) or d / "a.npz", "has shape [0, 8]"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((2, 8), np.float64)) or d / "a.npz",
     "input 'ids' in"),
    (lambda d: np.savez(d / "a.npz", ids=np.zeros((2, 8), np.float64)) or d / "a.npz",
     "has dtype float64; the model takes int64 (save it with .astype('int64'))"),
    (lambda d: np.savez(d / "a.npz", ids=np.full((2, 8), 150)) or d / "a.npz",
     "has the value 150, but the graph indexes a table of 100 with it (valid 0..99)"),
    (lambda d: np.savez(d / "a.npz", ids=np.full((2, 8), -101)) or d / "a.npz", "has the value -101"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no images (.jpg .jpeg .png .bmp)"),
])
def test_npz_and_folder_refusals_are_one_line(tmp_path, make, needle):
    assert needle in _refusal(tmp_path, token_model(), make)


def test_negative_indices_count_from_the_end_and_are_accepted(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.full((2, 8), -100))
    s = SampleInputs.from_path(tmp_path / "a.npz", token_model())
    make_session(token_model().SerializeToString()).run(None, s.feeds(2))


def test_images_for_a_model_without_an_image_input_are_refused(photos):
    with pytest.raises(UserError) as exc:
        SampleInputs.from_path(photos, token_model())
    assert "input 'ids' is int64 [N, 8], not an image ([N, H, W, 3] or [N, 3, H, W], uint8 or float); " \
           "give a .npz instead" in one_line(exc)
    with pytest.raises(UserError) as exc:
        SampleInputs.from_path(photos, image_model("NCHW", TensorProto.INT32))
    assert "not an image" in one_line(exc)


def test_batch_fixed_model_needs_a_batch_of_samples(tmp_path, photos):
    m = token_model(batch=4)
    np.savez(tmp_path / "a.npz", ids=np.ones((3, 8), np.int64))
    with pytest.raises(UserError) as exc:
        SampleInputs.from_path(tmp_path / "a.npz", m)
    assert "runs at batch 4 only ('ids') but" in one_line(exc) and "has 3 sample(s); give at least 4" in str(exc.value)
    np.savez(tmp_path / "b.npz", ids=np.ones((4, 8), np.int64))
    assert SampleInputs.from_path(tmp_path / "b.npz", m).feeds(4)["ids"].shape == (4, 8)


def test_symbolic_non_batch_dims_are_one_line(tmp_path):
    m = token_model(tokens="T")
    s = SampleInputs.random(m)  # building is fine: analysis may never need an input
    with pytest.raises(UserError) as exc:
        s.feeds(2)
    assert "input 'ids' has a symbolic dimension 'T' at axis 1; only the batch dimension" in one_line(exc)
    np.savez(tmp_path / "a.npz", ids=np.ones((3, 8), np.int64))
    with pytest.raises(UserError) as exc:
        SampleInputs.from_path(tmp_path / "a.npz", m)
    assert "symbolic dimension 'T'" in one_line(exc)


# --- engines and the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_split(tmp_path_factory):
    """The token model's split dir (not verified: verification is the lead's integration)."""
    from dsc_export.splitting import split_model

    d = tmp_path_factory.mktemp("tok")
    onnx.save(token_model(), d / "tok.onnx")
    man = split_model(d / "tok.onnx", d / "split", verify=False)
    assert [s.id for s in man.splits] == ["offload", "cut004", "local"]  # one compressive bottleneck
    return d


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dsc_export", *args], capture_output=True, text=True, env=env)


def test_engine_checks_run_on_the_samples_and_on_ranged_random_inputs(token_split, tmp_path, monkeypatch):
    from dsc_export.artifacts import read_manifest
    from dsc_export.engines import build_engines

    used = []
    feeds = SampleInputs.feeds

    def spy(self, batch, index=0):
        out = feeds(self, batch, index)
        used.append((self.description.split(" ")[0], batch, {k: v.copy() for k, v in out.items()}))
        return out

    monkeypatch.setattr(SampleInputs, "feeds", spy)
    import dsc_export.engines.build as engines

    tail_fed, check = [], engines._check_engine

    def check_spy(backend, engine, reference, inputs, job, precision, **kw):
        if job.source.startswith("tail-"):
            tail_fed.append(inputs.feeds(kw["batch"]))
        return check(backend, engine, reference, inputs, job, precision, **kw)

    monkeypatch.setattr(engines, "_check_engine", check_spy)
    root = tmp_path / "split"
    shutil.copytree(token_split / "split", root)
    ids = RNG.integers(0, 100, (5, 8))
    np.savez(tmp_path / "tok.npz", ids=ids)
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 3], parts="all", inputs=os.fspath(tmp_path / "tok.npz"),
                        keep_all=True)
    assert rep.failed == [] and len({e.path for e in rep.built}) == 6  # model, head, tail at 1 and 3
    assert all(e.max_rel_diff is not None and e.max_rel_diff <= 1e-4 for e in rep.built)
    # the whole model and the head on the user's samples, the tail (input: the cut tensor) on the
    # head's outputs on the same samples (issue 24: parts are fed what they really receive)
    assert [(who, b) for who, b, _ in used] == [("5", 1), ("5", 3), ("5", 1), ("5", 3), ("5", 1), ("5", 3)]
    np.testing.assert_array_equal(used[1][2]["ids"], ids[:3])
    np.testing.assert_array_equal(used[5][2]["ids"], ids[:3])
    man = read_manifest(root)
    cut = man.split("cut004")
    whole = onnx.load(token_split / "tok.onnx")
    whole.graph.output.append(onnx.ValueInfoProto(name=cut.tensor))
    want = make_session(whole.SerializeToString()).run([cut.tensor], {"ids": ids[:3]})[0]
    got = tail_fed[-1][cut.wire_tensor]
    assert got.dtype == want.dtype and np.array_equal(got, want)
    used.clear()
    # random: within the table, no index error
    rep = build_engines(root, "onnxruntime", batch_sizes=[2], parts="all", keep_all=True)
    assert rep.failed == [] and len({e.path for e in rep.built}) == 3
    assert [who for who, _, _ in used] == ["random"] * 3 and used[0][2]["ids"].max() <= 99
    assert len(read_manifest(root).engines) == 4 * 3  # (local, offload, head, tail) x 3 batch sizes


def test_cli_build_refuses_bad_inputs_before_building(token_split, tmp_path):
    root = tmp_path / "split"
    shutil.copytree(token_split / "split", root)
    np.savez(tmp_path / "bad.npz", ids=np.full((2, 8), 100))
    r = _cli("build", str(root), "--batch-sizes", "1", "--inputs", str(tmp_path / "bad.npz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: input 'ids' in '{tmp_path / 'bad.npz'}' has the value 100, but "
                                             "the graph indexes a table of 100 with it (valid 0..99); check that the "
                                             "samples are for this model"]
    assert not (root / "engines").exists()
    np.savez(tmp_path / "ok.npz", ids=np.arange(8))
    r = _cli("build", str(root), "--batch-sizes", "2", "--inputs", str(tmp_path / "ok.npz"), "--keep-all")
    assert r.returncode == 0, r.stderr
    assert "built 3 engine(s), 0 already up to date, 0 dropped (not faster than the ONNX by 5%), 0 failed" in r.stdout


@pytest.mark.parametrize("verb", ["analyze", "split", "build"])
def test_cli_help_documents_inputs(verb):
    from click.testing import CliRunner

    from dsc_export.cli import cli

    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0 and "--inputs FILE.npz|DIR" in res.output and "tokens.npz" in res.output


def test_cli_analyze_and_split_with_inputs(token_split, tmp_path):
    model = token_split / "tok.onnx"
    np.savez(tmp_path / "tok.npz", ids=RNG.integers(0, 100, (4, 8)))
    r = _cli("analyze", str(model), "--inputs", str(tmp_path / "tok.npz"))
    assert r.returncode == 0 and "1 compressive" in r.stdout, r.stderr
    r = _cli("split", str(model), "-o", str(tmp_path / "s"), "--inputs", str(tmp_path / "tok.npz"))
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    r = _cli("split", str(model), "-o", str(tmp_path / "s2"))  # random within the table: verified too
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    np.savez(tmp_path / "bad.npz", ids=np.zeros((4, 9), np.int64))
    for args in (["analyze", str(model)], ["split", str(model), "-o", str(tmp_path / "s3")]):
        r = _cli(*args, "--inputs", str(tmp_path / "bad.npz"))
        assert r.returncode == 1 and [ln for ln in r.stderr.splitlines() if not ln.startswith("· ")] == [
            f"error: input 'ids' in '{tmp_path / 'bad.npz'}' has shape [4, 9]; expected [K, 8] (K >= 1 samples) "
            "or [8] (one sample)"]
        assert not (tmp_path / "s3").exists()
