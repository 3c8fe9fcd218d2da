"""The situations users meet with real ONNX models (the kinds of ../shared/cases): each split is
either exact against the whole model, run independently by onnxruntime, or refused in one line.

Every model is built here (onnx.helper or torch.onnx.export), so the tests need nothing outside
the repository.
"""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsc_export.errors import UserError
from dsc_export.splitting import analyze_file, split_model

RNG = np.random.default_rng(0)


def _w(name, *shape, scale=0.2, dtype=np.float32):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(dtype), name)


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _independent_check(src, split_dir, x, rtol=1e-5):
    """Run every head then tail with onnxruntime and compare with the whole model."""
    man = json.loads((split_dir / "manifest.json").read_text())
    whole = ort.InferenceSession(str(src))
    name = whole.get_inputs()[0].name
    want = whole.run(None, {name: x})
    for s in man["splits"]:
        if s["kind"] != "split":
            continue
        h = ort.InferenceSession(str(split_dir / s["head"])).run(None, {name: x})[0]
        got = ort.InferenceSession(str(split_dir / s["tail"])).run(None, {s["wire_tensor"]: h})
        for g, w in zip(got, want):
            assert np.isfinite(g).all()
            scale = float(np.abs(w).max()) or 1.0
            assert float(np.abs(g.astype(np.float64) - w).max()) / scale <= rtol, s["id"]
    return man


# -- models that run at one batch size only -----------------------------------------------------

def _hardcoded_batch_reshape():
    """YOLO-style head: the Reshape target has batch 1 baked in, the input says dynamic."""
    inits = [_w("c1w", 16, 3, 3, 3), _w("c1b", 16), _w("c2w", 15, 16, 1, 1), _w("c2b", 15),
             numpy_helper.from_array(np.array([1, 3, 5, 16, 16], np.int64), "hard_shape")]
    nodes = [helper.make_node("Conv", ["image", "c1w", "c1b"], ["c1"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"]),
             helper.make_node("Reshape", ["c2", "hard_shape"], ["rs"], name="yolo/reshape"),
             helper.make_node("Sigmoid", ["rs"], ["det"])]
    g = helper.make_graph(nodes, "yolo", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 3, 5, 16, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_model_that_runs_at_batch_1_only_is_split_at_batch_1(tmp_path):
    src = _save(_hardcoded_batch_reshape(), tmp_path / "m.onnx")
    an = analyze_file(src)
    assert an.fixed_batch == 1 and an.input.shape[0] == 1
    assert any("runs at batch 1 only" in n and "'yolo/reshape'" in n for n in an.notes)
    man = split_model(src, tmp_path / "s", at=[c.tensor for c in an.cut_points])
    assert man.model.fixed_batch == 1 and not man.model.mergeable
    assert man.verification["batch_sizes"] == [1]
    assert [s.kind for s in man.splits].count("split") == len(an.cut_points) >= 2
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    _independent_check(src, tmp_path / "s", x)


def test_model_with_batch_2_baked_in_is_split_at_batch_2(tmp_path):
    m = _hardcoded_batch_reshape()
    m.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([2, 3, 5, 16, 16], np.int64), "hard_shape"))
    src = _save(m, tmp_path / "m.onnx")
    an = analyze_file(src)
    assert an.fixed_batch == 2 and any("runs at batch 2 only" in n for n in an.notes)
    man = split_model(src, tmp_path / "s", at=[c.tensor for c in an.cut_points])
    assert man.model.fixed_batch == 2 and man.verification["batch_sizes"] == [2]
    _independent_check(src, tmp_path / "s", RNG.standard_normal((2, 3, 32, 32)).astype(np.float32))


def test_model_that_runs_at_no_batch_size_is_refused_naming_the_node(tmp_path):
    m = _hardcoded_batch_reshape()
    m.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, 3, 7, 16, 16], np.int64), "hard_shape"))
    src = _save(m, tmp_path / "m.onnx")
    with pytest.raises(UserError) as err:
        split_model(src, tmp_path / "s")
    msg = str(err.value)
    assert "\n" not in msg and "Reshape node 'yolo/reshape'" in msg and "batch 1 too" in msg
    assert not (tmp_path / "s").exists()


# -- graph hygiene -------------------------------------------------------------------------------

def test_unsorted_nodes_are_sorted_and_split(tmp_path):
    model, cuts = graphs.chain()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # what a graph editor may leave
    src = _save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", at=cuts)
    assert any("not in topological order" in n for n in man.notes)
    for s in man.splits[1:-1]:  # every written part passes the full checker
        onnx.checker.check_model(onnx.load(str(tmp_path / "s" / s.head)), full_check=True)
        onnx.checker.check_model(onnx.load(str(tmp_path / "s" / s.tail)), full_check=True)
    _independent_check(src, tmp_path / "s", RNG.standard_normal((2, 3, 16, 16)).astype(np.float32))


def test_initializer_output_stays_exact(tmp_path):
    model, cuts = graphs.chain()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(6, dtype=np.float32), "table"))
    model.graph.output.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [6]))
    src = _save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", at=cuts)
    assert any("'table' is a constant" in n for n in man.notes)
    _independent_check(src, tmp_path / "s", RNG.standard_normal((2, 3, 16, 16)).astype(np.float32))


def test_output_computed_across_the_batch_is_refused_at_split_time(tmp_path):
    """An output with no batch axis that depends on the input: no server can answer it per
    request, so split refuses it up front, in one line, writing nothing."""
    model, cuts = graphs.chain()
    model.graph.node.append(helper.make_node("ReduceMean", ["y"], ["pooled"], axes=[0, 2, 3], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    src = _save(model, tmp_path / "m.onnx")
    with pytest.raises(UserError) as err:
        split_model(src, tmp_path / "s", at=cuts)
    assert "\n" not in str(err.value) and "output 'pooled'" in str(err.value)
    assert not (tmp_path / "s").exists()


def test_output_shapes_are_recorded_as_the_runs_show_them(tmp_path):
    """Graph outputs declared without sizes get the batch axis and sizes from the runs."""
    model, cuts = graphs.chain()
    for d in model.graph.output[0].type.tensor_type.shape.dim:
        d.Clear()  # rank known, every size unknown (as some converters write)
    man = split_model(_save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    assert man.model.outputs[0].shape == ["N", 2, 8, 8]


def test_input_that_is_also_an_output_leaves_only_offload_and_local(tmp_path):
    model, _ = graphs.chain()
    model.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16]))
    an = analyze_file(_save(model, tmp_path / "m.onnx"))
    assert an.cut_points == [] and any("'x' is the input itself" in n for n in an.notes)


# -- float16 ------------------------------------------------------------------------------------

def _big_activations():
    """Activations beyond float16's range in the stem, normalised afterwards."""
    inits = [numpy_helper.from_array((np.abs(RNG.standard_normal((8, 3, 3, 3))) * 20).astype(np.float32), "c1w"),
             _w("c2w", 8, 8, 3, 3, scale=0.3), numpy_helper.from_array(np.ones(8, np.float32), "s"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"), _w("fw", 10, 8, scale=0.3)]
    nodes = [helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["xf", "c1w"], ["c1"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("MaxPool", ["c1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("InstanceNormalization", ["p1", "s", "b"], ["n1"]),
             helper.make_node("Conv", ["n1", "c2w"], ["c2"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fw_t"], ["logits"])]
    inits.append(numpy_helper.from_array(numpy_helper.to_array(inits[-1]).T.copy(), "fw_t"))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_float16_wire_excludes_cut_points_that_overflow(tmp_path):
    src = _save(_big_activations(), tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", wire_dtype="float16")
    over = {c.tensor for c in man.cut_points if not c.fits_wire}
    # independently: the activations of c1 and p1 exceed 65504 on uint8 images
    probe = onnx.load(str(src))
    probe.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("c1", "p1", "n1")])
    x = RNG.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    c1, p1, n1 = ort.InferenceSession(probe.SerializeToString()).run(["c1", "p1", "n1"], {"image": x})
    assert np.abs(c1).max() > 65504 and np.abs(p1).max() > 65504 and np.abs(n1).max() < 65504
    assert over == {"c1", "p1"}
    assert all(s.tensor not in over for s in man.splits)
    assert any("overflow float16" in n for n in man.notes)
    assert all(np.isfinite(s.max_rel_diff) for s in man.splits if s.kind == "split")
    with pytest.raises(UserError, match="overflow float16"):
        split_model(src, tmp_path / "s2", wire_dtype="float16", at=["p1"])
    split_model(src, tmp_path / "s3", wire_dtype="float32", at=["p1"])  # float32 carries it exactly


def test_half_precision_model_splits_with_the_default_wire(tmp_path):
    g = graphs.G(dtype=TensorProto.FLOAT16)
    g.conv("a", "x", 8, k=3, stride=2)
    g.relu("b", "a")
    g.conv("c", "b", 8, k=3, stride=2)
    g.relu("y", "c")
    model = g.model(["y"], out_dtype=TensorProto.FLOAT16)
    for t in model.graph.initializer:  # the builder's weights are float32
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    src = _save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", at=["a", "b", "c"])
    # held to float16's tolerance because the outputs compared are float16
    assert man.verification["tolerance_rel"] == pytest.approx(2e-2)
    assert all(s.max_rel_diff <= 2e-2 for s in man.splits if s.kind == "split")


# -- batch dependence ---------------------------------------------------------------------------

def _batch_stats_bn(batch):
    """Normalisation with batch statistics (what BatchNorm in training mode computes): one
    sample's output depends on the other samples of its batch."""
    inits = [_w("cw", 8, 3, 3, 3), numpy_helper.from_array(np.array([0, 2, 3], np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["image", "cw"], ["c"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("ReduceMean", ["c", "axes"], ["mu"], keepdims=1),
             helper.make_node("Sub", ["c", "mu"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["logits"])]
    g = helper.make_graph(nodes, "bnt", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("batch", ["N", 4])
def test_batch_dependent_model_is_marked_never_merged(tmp_path, batch):
    src = _save(_batch_stats_bn(batch), tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", at=["r"])
    assert man.model.batch_independent is False and not man.model.mergeable
    assert any("depends on the other samples of its batch" in n for n in man.notes)
    # the split itself is exact at equal batches
    _independent_check(src, tmp_path / "s", RNG.standard_normal((4, 3, 16, 16)).astype(np.float32))


def test_batch_independent_model_is_marked_so(tmp_path):
    model, cuts = graphs.chain()
    man = split_model(_save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    assert man.model.batch_independent is True and man.model.mergeable


# -- torch exports: sequence-first attention, segmentation, both exporters ------------------------

torch = pytest.importorskip("torch", reason="the 'export' extra (torch) is not installed")


class _Hybrid(torch.nn.Module):
    """A CNN, then attention that runs sequence-first ([S, N, E])."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.enc = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        f = self.stem(x)
        s = f.flatten(2).permute(2, 0, 1)
        return self.fc(self.enc(s).mean(0))


def _export(module, path, res, dynamo):
    module.eval()
    x = torch.randn(2, 3, res, res)
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["image"],
                          dynamic_shapes={"x": {0: batch}})
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["out"], dynamic_axes={"image": {0: "N"}, "out": {0: "N"}})
    return path


def test_sequence_first_attention_keeps_the_cnn_cut_points(tmp_path):
    torch.manual_seed(0)
    src = _export(_Hybrid(), tmp_path / "m.onnx", 32, dynamo=False)
    an = analyze_file(src)
    assert an.cut_points, "the CNN part has cut points"
    assert an.unbatched and any("no leading batch dimension" in n for n in an.notes)
    first = an.cut_points[0].tensor
    split_model(src, tmp_path / "s", at=[first])
    _independent_check(src, tmp_path / "s", np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32))
    seq = next(iter(an.unbatched))
    with pytest.raises(UserError, match="no leading batch dimension"):
        split_model(src, tmp_path / "s2", at=[seq])


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_lraspp_segmentation_has_backbone_cut_points_all_exact(tmp_path, dynamo):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)

    class Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["out"]

    src = _export(Out(model), tmp_path / "m.onnx", 64, dynamo)
    an = analyze_file(src)
    assert len(an.cut_points) >= 10 and an.compressive
    if not dynamo:  # the TorchScript exporter's node names carry the module path
        assert sum("backbone" in (c.scope or "") for c in an.cut_points) >= 10
    split_model(src, tmp_path / "s")  # verified at batch 1 and 3
    _independent_check(src, tmp_path / "s", np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32),
                       rtol=1e-4)


# -- found by a fresh reviewer: external data, data-sized outputs, name collisions ----------------

def test_server_bundle_of_a_model_with_external_data_and_an_inner_tensor_named_input(tmp_path):
    """torch's dynamo exporter writes weights to a .data file; older exports name an inner tensor
    'input', the name the Triton repository gives the tail's input."""
    import tarfile

    from dsc_export.bundle import make_bundle

    model, cuts = graphs.chain()
    for n in model.graph.node:  # the first conv's output becomes 'input'
        n.input[:] = ["input" if x == "a" else x for x in n.input]
        n.output[:] = ["input" if x == "a" else x for x in n.output]
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    split_model(tmp_path / "m.onnx", tmp_path / "s", at=["input", "b"])
    make_bundle(tmp_path / "s", "server", tmp_path / "server.tar")
    with tarfile.open(tmp_path / "server.tar") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    repo = ort.InferenceSession(str(tmp_path / "x" / "triton" / "offload" / "1" / "model.onnx"))
    assert [i.name for i in repo.get_inputs()] == ["input"]
    np.testing.assert_allclose(repo.run(None, {"input": x})[0], want, rtol=1e-5, atol=1e-6)


def test_output_sized_by_the_data_is_refused_at_split_time(tmp_path):
    """A detection-style output (NonZero): its first axis follows the data, not the batch."""
    model, cuts = graphs.chain()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "thr"))
    model.graph.node.extend([helper.make_node("Greater", ["y", "thr"], ["hot"]),
                             helper.make_node("NonZero", ["hot"], ["nz"]),
                             helper.make_node("Transpose", ["nz"], ["dets"], perm=[1, 0])])
    model.graph.output.append(helper.make_tensor_value_info("dets", TensorProto.INT64, ["K", 4]))
    src = _save(model, tmp_path / "m.onnx")
    with pytest.raises(UserError) as err:
        split_model(src, tmp_path / "s", at=cuts)
    assert "output 'dets'" in str(err.value) and "varies with the data" in str(err.value)
    assert not (tmp_path / "s").exists()


def test_split_dir_has_ordinary_permissions(tmp_path):
    import os
    import stat

    model, cuts = graphs.chain()
    split_model(_save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts[:1])
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "s" / "manifest.json").stat().st_mode) == 0o666 & ~mask


def test_client_returns_the_model_output_names_not_the_wire_names(tmp_path):
    """Triton names are made safe ('StatefulPartitionedCall:0' travels as
    'StatefulPartitionedCall_0'); the client answers with the model's own names."""
    from dsc_export.serving.client import DynamicSplitClient
    from dsc_export.serving.protocol import served_outputs

    model, cuts = graphs.chain()
    for n in model.graph.node:
        n.output[:] = ["StatefulPartitionedCall:0" if o == "y" else o for o in n.output]
    model.graph.output[0].name = "StatefulPartitionedCall:0"
    man = split_model(_save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts[:1])
    client = object.__new__(DynamicSplitClient)
    client.contract = served_outputs(tmp_path / "s", man)
    wire = client.contract[0].wire_name
    assert wire == "StatefulPartitionedCall_0"
    y = np.ones((2, 2, 8, 8), np.float32)
    assert list(client._from_server({wire: y})) == ["StatefulPartitionedCall:0"]


def test_fp16_build_keeps_float32_around_big_activations_and_says_so(tmp_path):
    from dsc_export.engines import build_engines

    src = _save(_big_activations(), tmp_path / "m.onnx")
    split_model(src, tmp_path / "s", at=["n1"])
    notes = []
    rep = build_engines(tmp_path / "s", "onnxruntime", batch_sizes=[2], parts="heads", precision="fp16",
                        log=notes.append, keep_all=True)
    assert not rep.failed  # checked against the float32 ONNX within the float16 tolerance
    assert any("keep float32 compute" in n and "activations beyond" in n for n in notes)
