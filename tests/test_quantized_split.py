"""Quantized models in every form onnxruntime's quantizer writes split exactly: QDQ and QOperator,
per tensor and per channel, uint8 and int8 activations, dynamic quantization. Checked
independently: head then tail against the whole model in onnxruntime, at the level the split's
verification records (a model with QuantizeLinear / DequantizeLinear nodes: 'basic', where they
run as written; see splitting.verification_level)."""

import cut_models
import numpy as np
import pytest

from dsc_export.artifacts import read_manifest
from dsc_export.engines import build_engines
from dsc_export.ort import make_session
from dsc_export.splitting import split_model

FORMS = [("QDQ", False, "QUInt8"), ("QDQ", True, "QInt8"), ("QDQ", True, "QUInt8"), ("QOperator", False, "QUInt8"),
         ("QOperator", True, "QInt8"), ("dynamic", False, "QUInt8")]


@pytest.mark.parametrize("fmt,per_channel,act", FORMS)
def test_every_quantized_form_splits_exactly(tmp_path, fmt, per_channel, act):
    src = cut_models.quantized(tmp_path, fmt, cut_models.conv_net(channels=(8, 16), hw=32),
                               per_channel=per_channel, activations=act)
    man = split_model(src, tmp_path / "s")
    level = man.verification["optimization"]
    assert level == ("extended" if fmt == "dynamic" else "basic")  # static forms hold Q / DQ nodes
    dtypes = {c.dtype for c in man.cut_points}
    if fmt != "dynamic":
        assert dtypes & {"uint8", "int8"}, dtypes  # a quantized cut, sized at 1 byte per element
        q = next(c for c in man.cut_points if c.dtype in ("uint8", "int8"))
        assert q.bytes == q.elements
    cuts = [s for s in man.splits if s.kind == "split"]
    assert cuts and all(s.max_abs_diff == 0.0 for s in cuts)
    x = np.random.default_rng(11).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = make_session(src, optimization=level).run(None, {"image": x})
    for s in cuts:
        z = make_session(tmp_path / "s" / s.head, optimization=level).run([s.wire_tensor], {"image": x})[0]
        got = make_session(tmp_path / "s" / s.tail, optimization=level).run(None, {s.wire_tensor: z})
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), s.id
    rep = build_engines(tmp_path / "s", "onnxruntime", batch_sizes=[2], parts="all", keep_all=True)
    assert not rep.failed and len(read_manifest(tmp_path / "s").engines) == 2 * (len(cuts) + 1)
