"""Static evaluation of shape arithmetic (graph/shapes.py) against real runs.

The folding and the cut sizes are computed without running the network; every value and size
they produce is checked here against onnxruntime running the original model (an independent
computation), on synthetic graphs where the arithmetic reads a dimension that static inference
cannot name: a Reshape whose target is computed from a Shape read (ViT, Swin, MaxViT as the
TorchScript exporter writes them).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import G

import dsc_export.graph.arithmetic as arithmetic_mod
import dsc_export.graph.probe as probe_mod
from dsc_export.graph.folding import fold_shape_arithmetic
from dsc_export.graph.shapes import tensor_shapes

BATCHES = (1, 2, 3)


def windows():
    """Swin-style window partition: x [N, 4, 8, 8] -> Reshape [-1, 4, 4, 4] (4N windows) ->
    Shape()[0] / 4 (= N, read from a tensor whose axis 0 is *not* the batch) -> back to
    [N, 4, 4, 4, 4] -> [N, 256]. Axis 0 of the windows is a symbol static inference cannot
    tie to the batch: taking it for the batch gives N // 4 = 0 at batch 1 and 2, a wrong
    constant target [0, 4, 4, 4, 4] that does not run."""
    g = G(c=4, hw=8)
    g.conv("a", "x", 4)
    g.init("win", np.array([-1, 4, 4, 4], np.int64))
    g.node("Reshape", ["a", "win"], "w")
    g.node("Relu", ["w"], "wr")
    g.node("Shape", ["wr"], "sw")
    g.init("i0", np.array([0], np.int64))
    g.node("Gather", ["sw", "i0"], "nw", axis=0)
    g.init("four", np.array([4], np.int64))
    g.node("Div", ["nw", "four"], "n")
    g.init("rest", np.array([4, 4, 4, 4], np.int64))
    g.node("Concat", ["n", "rest"], "target", axis=0)
    g.node("Reshape", ["wr", "target"], "back")
    g.node("Sigmoid", ["back"], "s")
    g.init("flat", np.array([0, -1], np.int64))
    g.node("Reshape", ["s", "flat"], "y")
    return g.model(["y"])


def class_token():
    """ViT-style: the batch size read from the input expands a class token, concatenated
    before the patches; later blocks read Shape() of tensors whose shapes follow from it."""
    g = G(c=3, hw=8)
    g.conv("p", "x", 6, k=1, stride=2)  # [N, 6, 4, 4]
    g.node("Shape", ["p"], "sp")
    g.init("i0", np.array([0], np.int64))
    g.node("Gather", ["sp", "i0"], "n", axis=0)
    g.init("tok_rest", np.array([6, 1], np.int64))
    g.node("Concat", ["n", "tok_rest"], "tok_shape", axis=0)
    g.init("tok", np.ones((1, 6, 1), np.float32))
    g.node("Expand", ["tok", "tok_shape"], "tokens")  # [N, 6, 1]
    g.init("seq", np.array([6, 16], np.int64))
    g.node("Concat", ["n", "seq"], "seq_shape", axis=0)
    g.node("Reshape", ["p", "seq_shape"], "patches")  # [N, 6, 16]
    g.node("Concat", ["tokens", "patches"], "z", axis=2)  # [N, 6, 17]
    g.node("Relu", ["z"], "z1")
    g.node("Shape", ["z1"], "sz")
    g.init("i2", np.array([2], np.int64))
    g.node("Gather", ["sz", "i2"], "len", axis=0)  # 17, static only once z's shape is known
    g.init("m1", np.array([-1], np.int64))
    g.node("Concat", ["n", "len", "m1"], "split_shape", axis=0)
    g.node("Reshape", ["z1", "split_shape"], "z2")  # [N, 17, 6]
    g.node("Sigmoid", ["z2"], "y")
    return g.model(["y"])


def _input(model: onnx.ModelProto, batch: int) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(batch).standard_normal((batch, *dims)).astype(np.float32)


def _run(model: onnx.ModelProto, names: list[str], batch: int) -> dict[str, np.ndarray]:
    """The named tensors of ``model`` run by onnxruntime at ``batch`` (inputs seeded by it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"x": _input(model, batch)})))


def _no_runs(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a real run was needed")
    monkeypatch.setattr(probe_mod, "run_with_outputs", refuse)


@pytest.mark.parametrize("build", [windows, class_token])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["shared-evaluator", "per-tensor-fallback"])
def test_fold_matches_onnxruntime_without_running(build, per_tensor, monkeypatch):
    model = build()
    if per_tensor:  # onnx.reference cannot load the arithmetic as one graph: each tensor alone
        monkeypatch.setattr(arithmetic_mod._Arithmetic, "build", classmethod(lambda cls, *a: None))
    _no_runs(monkeypatch)
    folded, report = fold_shape_arithmetic(model)
    monkeypatch.undo()
    assert report.probed == 0
    # what was folded is constant, what was kept changes with the batch size, as the runs say
    kept = report.batch_dependent
    # every target here reads the batch size: kept, or rewritten to one read of the input's batch
    assert kept or report.batch_reads
    runs = [_run(model, report.folded + kept, b) for b in BATCHES]
    for t in report.folded:
        assert all(np.array_equal(r[t], runs[0][t]) for r in runs), t
    for t in kept:
        assert not all(np.array_equal(r[t], runs[0][t]) for r in runs), t
    # the folded model computes what the model computes, at every batch size
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        ref = _run(model, ["y"], b)["y"]
        got = sess.run(["y"], {"x": _input(model, b)})[0]
        np.testing.assert_array_equal(got, ref)


def test_windows_target_is_not_a_wrong_constant():
    folded, report = fold_shape_arithmetic(windows())
    assert "target" in report.batch_dependent and "target" not in report.folded
    assert not any(t.name == "target" for t in folded.graph.initializer)


@pytest.mark.parametrize("build,names", [
    (windows, ["a", "back", "s", "y"]),
    (class_token, ["p", "patches", "z", "z1", "z2", "y"]),
])
def test_tensor_shapes_match_onnxruntime_without_running(build, names, monkeypatch):
    model = build()
    folded, _ = fold_shape_arithmetic(model)
    _no_runs(monkeypatch)
    got = tensor_shapes(folded, names)
    monkeypatch.undo()
    for b in (1, 2):
        run = _run(model, names, b)
        for n in names:
            assert list(run[n].shape) == [b, *got[n][0]], n
            assert run[n].dtype.name == got[n][1]
