"""Head/tail surgery and the split dir, on synthetic graphs (fast, no torch)."""

import json
import os

import graphs
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsc_export.artifacts import SPLIT_SCHEMA, read_manifest
from dsc_export.errors import UserError, VerificationError
from dsc_export.graph.model import load_model
from dsc_export.ort import make_session
from dsc_export.splitting import analyze_file, split_model


def save(model, path):
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", [n for n in sorted(graphs.ALL) if graphs.ALL[n]()[1]])
def test_every_cut_point_splits_and_verifies(name, tmp_path):
    model, expected = graphs.ALL[name]()
    src = save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "split", at=expected)
    cuts = [s for s in man.splits if s.kind == "split"]
    assert [s.tensor for s in cuts] == expected
    assert [s.id for s in man.splits][0] == "offload" and man.splits[-1].id == "local"
    for s in cuts:
        assert s.max_rel_diff <= 1e-5
        head = onnx.load(str(tmp_path / "split" / s.head))
        tail = onnx.load(str(tmp_path / "split" / s.tail))
        onnx.checker.check_model(head)
        onnx.checker.check_model(tail)
        assert head.opset_import == model.opset_import and tail.ir_version == model.ir_version
        # dynamic batch kept on both sides of the wire
        assert head.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
        assert tail.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
        # share no state: no initializer object is needed by both unless it is a copy
        assert head.graph.output[0].name == tail.graph.input[0].name == s.wire_tensor


def test_split_reproduces_model_outputs_exactly(tmp_path):
    model, _ = graphs.two_outputs()
    src = save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", at=["a", "b"], verify=False)
    whole = make_session(src)
    x = np.random.default_rng(5).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = whole.run(None, {"x": x})
    for s in man.splits[1:-1]:
        h = make_session(tmp_path / "s" / s.head).run(None, {"x": x})[0]
        got = make_session(tmp_path / "s" / s.tail).run(None, {s.wire_tensor: h})
        assert len(got) == 2
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def test_float16_wire_casts_inside_the_graphs(tmp_path):
    model, _ = graphs.chain()
    src = save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s", wire_dtype="float16", at=["b"])
    s = man.splits[1]
    head = onnx.load(str(tmp_path / "s" / s.head))
    tail = onnx.load(str(tmp_path / "s" / s.tail))
    assert head.graph.node[-1].op_type == "Cast"
    assert head.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert tail.graph.node[0].op_type == "Cast"
    assert tail.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert s.bytes == 8 * 16 * 16 * 2 and man.wire_dtype == "float16"
    assert 0 < s.max_rel_diff <= 2e-2  # float16 rounding is real, and small


def test_compressive_bottlenecks_are_the_default(tmp_path):
    model, _ = graphs.chain()  # x: 3x16x16 float; a, b: 8x16x16; c: 2x8x8
    src = save(model, tmp_path / "m.onnx")
    man = split_model(src, tmp_path / "s")
    assert [s.tensor for s in man.splits if s.kind == "split"] == ["c"]
    compressive = [c.tensor for c in man.cut_points if c.compressive]
    assert compressive == ["c"]
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert list(on_disk)[0] == "schema" and on_disk["schema"] == SPLIT_SCHEMA
    assert read_manifest(tmp_path / "s") == man
    for old in ("dsc-export.split/1", "dsc-export.split/2"):  # an older layout: one line, what to do
        (tmp_path / "s" / "manifest.json").write_text(json.dumps({**on_disk, "schema": old}))
        with pytest.raises(UserError, match=f"older dsc-export \\({old}, .*run dsc-export split again$"):
            read_manifest(tmp_path / "s")


def test_no_natural_bottleneck_gives_offload_and_local_only(tmp_path):
    model, _ = graphs.expanding()
    src = save(model, tmp_path / "m.onnx")
    an = analyze_file(src)
    assert an.natural == [] and any("no natural bottleneck" in n for n in an.notes)
    man = split_model(src, tmp_path / "s")
    assert [s.id for s in man.splits] == ["offload", "local"]


def test_at_a_tensor_that_is_not_a_cut_point_names_the_nearest(tmp_path):
    model, _ = graphs.residual()
    src = save(model, tmp_path / "m.onnx")
    with pytest.raises(UserError) as err:
        split_model(src, tmp_path / "s", at=["b"])
    msg = str(err.value)
    assert "not a cut point" in msg and "'a'" in msg and "'s'" in msg
    assert not (tmp_path / "s").exists()
    with pytest.raises(UserError, match="no tensor of that name"):
        split_model(src, tmp_path / "s", at=["nope"])


def test_batch_size_read_does_not_block_cuts(tmp_path):
    """x.view(x.size(0), -1): the tail reads the batch size from its cut tensor instead."""
    model, cuts = graphs.batch_reshape()
    src = save(model, tmp_path / "m.onnx")
    an = analyze_file(src)
    assert [c.tensor for c in an.cut_points] == cuts
    assert len(an.fold.batch_reads) == 1 and not an.fold.batch_dependent
    man = split_model(src, tmp_path / "s", at=cuts)  # verified at batch 1 and 3 against the model
    assert [s.tensor for s in man.splits if s.kind == "split"] == cuts
    # independently: every tail reads the batch size from its own input, never the model input
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    for s in man.splits[1:-1]:
        h = ort.InferenceSession(str(tmp_path / "s" / s.head)).run(None, {"x": x})[0]
        tail = ort.InferenceSession(str(tmp_path / "s" / s.tail))
        assert [i.name for i in tail.get_inputs()] == [s.wire_tensor]
        np.testing.assert_allclose(tail.run(None, {s.wire_tensor: h})[0], want, rtol=1e-5, atol=1e-6)


def test_batch_merged_into_another_axis_blocks_cuts_with_a_note(tmp_path):
    model, cuts = graphs.batch_merge_reshape()
    an = analyze_file(save(model, tmp_path / "m.onnx"))
    assert [c.tensor for c in an.cut_points] == cuts
    assert any("the shape of 'a2' is read" in n for n in an.notes)


def test_odd_names_get_safe_files(tmp_path):
    model, cuts = graphs.odd_names()
    man = split_model(save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    for s in man.splits[1:-1]:
        assert "/" not in os.path.basename(s.head) and ":" not in s.head
        assert (tmp_path / "s" / s.head).is_file()


def test_old_opset_model(tmp_path):
    model, cuts = graphs.old_opset()
    man = split_model(save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    assert all(s.max_rel_diff <= 1e-5 for s in man.splits[1:-1])


def test_external_data_model_and_missing_data(tmp_path):
    model, cuts = graphs.chain()
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    onnx.save(model, str(src), save_as_external_data=True, location="m.weights", size_threshold=0)
    man = split_model(src, tmp_path / "s", at=cuts)
    # the copy of the whole model keeps its data (in the split dir's store), equal to the source's
    copied = {t.name: onnx.numpy_helper.to_array(t)
              for t in load_model(tmp_path / "s" / "model.onnx").graph.initializer}
    assert copied.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_array_equal(copied[name], w)
    assert len(man.splits) == 5
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = make_session(src).run(None, {"x": x})
    (tmp_path / "ext" / "m.weights").unlink()
    got = make_session(tmp_path / "s" / "model.onnx").run(None, {"x": x})  # the copy holds its own weights
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(UserError, match="external data.*missing: m.weights"):
        analyze_file(src)


def test_parts_hold_graphs_and_the_weights_are_stored_once(tmp_path):
    """Every part's large tensors are external data in the split dir's one store, so no part file
    nears protobuf's 2 GB limit however big the model, and a tensor several parts read is one file."""
    from dsc_export.weight_store import MIN_BYTES

    g = graphs.G()
    g.conv("a", "x", 32, k=3)  # 3.5 KB of weights
    g.relu("b", "a")
    g.conv("c", "b", 16, k=3)  # 18 KB
    g.relu("y", "c")
    model, cuts = g.model(["y"]), ["a", "b", "c"]
    man = split_model(save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    root = tmp_path / "s"
    for s in man.splits:
        for rel in filter(None, (s.head, s.tail)):
            part = onnx.load(root / rel, load_external_data=False)
            inline = [t.name for t in part.graph.initializer if t.ByteSize() >= MIN_BYTES and not t.external_data]
            assert inline == [], (rel, inline)
    store = sorted((root / "weights").iterdir())
    large = [t for t in model.graph.initializer if t.ByteSize() >= MIN_BYTES]
    assert len(store) == len({t.raw_data or t.SerializeToString() for t in large})
    assert all(s.max_rel_diff <= 1e-5 for s in man.splits[1:-1])


def test_verification_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    import dsc_export.compare as compare

    monkeypatch.setitem(compare.REL_TOLERANCE, "float32", -1.0)
    model, cuts = graphs.chain()
    with pytest.raises(VerificationError, match="does not reproduce"):
        split_model(save(model, tmp_path / "m.onnx"), tmp_path / "s", at=cuts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_existing_split_dir_is_replaced_but_other_dirs_are_refused(tmp_path):
    model, _ = graphs.chain()
    src = save(model, tmp_path / "m.onnx")
    split_model(src, tmp_path / "s")
    split_model(src, tmp_path / "s", at=["a"])
    assert [s.tensor for s in read_manifest(tmp_path / "s").splits if s.kind == "split"] == ["a"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a split dir"):
        split_model(src, tmp_path / "other")


@pytest.mark.parametrize("content", [b"", b"not onnx at all", None])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is None:  # truncated real model
        model, _ = graphs.chain()
        content = model.SerializeToString()[:200]
    path.write_bytes(content)
    with pytest.raises(UserError):
        analyze_file(path)


def test_several_inputs_are_refused_with_reason(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y])
    path = save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(UserError, match="2 data inputs"):
        analyze_file(path)


def test_dynamic_spatial_dims_are_refused(tmp_path):
    model, _ = graphs.chain()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UserError, match="only the batch dimension"):
        analyze_file(save(model, tmp_path / "m.onnx"))


def test_streamed_part_file_is_exactly_the_part(tmp_path):
    from dsc_export.graph.surgery import CutSpec, _write_streaming, extract_tail

    model, _ = graphs.inception()
    part = extract_tail(model, CutSpec("a", (8, 16, 16), "float32"))
    assert part.initializers and all(t.name.endswith(".w") for t in part.initializers)
    _write_streaming(part, tmp_path / "t.onnx")
    assert onnx.load(str(tmp_path / "t.onnx")) == part.to_model()


def test_structure_check_catches_a_broken_part():
    from dsc_export.graph.surgery import CutSpec, check_structure, extract_head

    model, _ = graphs.chain()
    part = extract_head(model, CutSpec("b", (8, 16, 16), "float32"))
    check_structure(part, "head.onnx")
    part.model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UserError, match="head.onnx fails onnx.checker"):
        check_structure(part, "head.onnx")


def test_verification_catches_a_wrong_tail(tmp_path, monkeypatch):
    from onnx import numpy_helper

    import dsc_export.splitting as splitting

    real = splitting.extract_tail

    def perturbed(model, cut):
        part = real(model, cut)
        w = numpy_helper.to_array(part.initializers[0]).copy()
        w.flat[0] += 0.5
        part.initializers[0] = numpy_helper.from_array(w, part.initializers[0].name)
        return part

    monkeypatch.setattr(splitting, "extract_tail", perturbed)
    model, _ = graphs.chain()
    with pytest.raises(VerificationError, match="split cut001 .* does not reproduce"):
        split_model(save(model, tmp_path / "m.onnx"), tmp_path / "s", at=["b"])
    assert not (tmp_path / "s").exists()


def test_many_blocking_shape_reads_are_summarised_in_one_note(tmp_path):
    """Attention blocks read their own merged shapes dozens of times: one note, with a count."""
    g = graphs.G()
    prev = "x"
    g.init("pairs", np.array([-1, 2, 16, 16], np.int64))
    g.init("idx0", np.array([0], np.int64))
    g.init("two", np.array([2], np.int64))
    g.init("minus1", np.array([-1], np.int64))
    for k in range(4):
        g.conv(f"a{k}", prev, 4)
        g.node("Reshape", [f"a{k}", "pairs"], f"m{k}")  # [2N, 2, 16, 16]
        g.node("Shape", [f"m{k}"], f"s{k}")
        g.node("Gather", [f"s{k}", "idx0"], f"n2_{k}", axis=0)
        g.node("Div", [f"n2_{k}", "two"], f"n{k}")
        g.node("Concat", [f"n{k}", "minus1"], f"t{k}", axis=0)
        g.node("Reshape", [f"a{k}", f"t{k}"], f"flat{k}")
        prev = f"a{k}"
    g.node("Concat", [f"flat{k}" for k in range(4)], "y", axis=1)
    an = analyze_file(save(g.model(["y"]), tmp_path / "m.onnx"))
    blocking = [n for n in an.notes if "is read" in n or "are read" in n]
    assert len(blocking) == 1 and blocking[0].startswith("the shapes of 4 tensors are read")
