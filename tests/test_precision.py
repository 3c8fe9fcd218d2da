"""The float16 transform: types, weights, shape arithmetic untouched, numbers close."""

import numpy as np
import onnx
import pytest
from graphs import ALL, G
from onnx import TensorProto

from dsc_export.backends.onnxruntime import make_session, random_inputs
from dsc_export.errors import UserError
from dsc_export.graph.model import data_dependent, dataflow
from dsc_export.graph.precision import _elem_types, to_float16


def _run(model, feeds):
    return make_session(model.SerializeToString()).run(None, feeds)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("if_outer_scope",)])
def test_float16_keeps_io_types_and_stays_close(name):
    model = ALL[name]()[0]
    half = to_float16(model)
    onnx.checker.check_model(half)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [i.type.tensor_type.elem_type for i in model.graph.input]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [o.type.tensor_type.elem_type for o in model.graph.output]
    feeds = random_inputs(make_session(model.SerializeToString()), 2, np.random.default_rng(1))
    want, got = _run(model, feeds), _run(half, feeds)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        if w.dtype.kind == "f":
            rel = np.abs(w - g).max() / max(np.abs(w).max(), 1e-6)
            assert 0 < rel < 2e-2  # float16 really computed (not zero) and close


def _float_shape_math():
    """Data scaled by a float computed from a tensor's height: float32 arithmetic on a shape."""
    g = G(hw=15)
    g.conv("a", "x", 4)
    g.node("Shape", ["a"], "sh")
    g.init("idx2", np.array(2, np.int64))
    g.node("Gather", ["sh", "idx2"], "h", axis=0)
    g.node("Cast", ["h"], "hf", to=TensorProto.FLOAT)
    g.init("k", np.array(1000.0, np.float32))
    g.node("Div", ["hf", "k"], "s")
    g.node("Mul", ["a", "s"], "y")
    return g.model(["y"])


def test_float16_stores_weights_as_float16_and_leaves_shape_arithmetic_alone():
    model = _float_shape_math()
    half = to_float16(model)
    conv_weights = {n.input[1] for n in half.graph.node if n.op_type == "Conv"}
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert conv_weights and all(types[w] == TensorProto.FLOAT16 for w in conv_weights if w in types)
    # the padding arithmetic (Shape -> ... -> Pad's pads) keeps its types, float ones included
    _, shapes = data_dependent(dataflow(model.graph))
    before, after = _elem_types(model), _elem_types(half)
    assert shapes and all(after[t] == before[t] for t in shapes if t in before)
    assert before["s"] == after["s"] == TensorProto.FLOAT  # there was float math to keep, and it was kept
    feeds = random_inputs(make_session(model.SerializeToString()), 2, np.random.default_rng(1))
    want, got = _run(model, feeds)[0], _run(half, feeds)[0]
    assert np.abs(want - got).max() / np.abs(want).max() < 2e-2


def test_float16_refuses_control_flow():
    with pytest.raises(UserError, match="control flow"):
        to_float16(ALL["if_outer_scope"]()[0])
