"""Small models whose cut tensors are not float32 images of activations, and their quantized forms.

- :func:`mask_model`: a float model with an integer cut: an ArgMax class mask (int64) that the
  rest reads as indices into a 4-colour palette (``Gather``), so a tail fed anything but the
  head's real mask (random int64, float32 data) fails or answers wrongly.
- :func:`quantized`: ``onnxruntime.quantization.quantize_static`` of a small CNN in QDQ or
  QOperator format (every QOperator cut is uint8; QDQ's quantized input is one).
- :func:`embedding_model`: a classifier that returns its pooled embedding beside its logits.
- :func:`batchless_model`: a detector-like graph taking one image ``[3, H, W]`` (no batch axis),
  unsqueezed inside the graph, with data-dependent ``boxes [-1, 4]`` outputs, as torchvision's
  detection models export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from served_models import conv_net


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def mask_model(hw: int = 8) -> onnx.ModelProto:
    """image [N, 3, hw, hw] -> conv (4 classes) -> ArgMax ``mask`` [N, hw, hw] int64 -> palette
    Gather [N, hw, hw, 3] -> Transpose -> ``y`` [N, 3, hw, hw]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0, 1, (4, 3)).astype(np.float32), "palette")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["mask"], axis=1, keepdims=0),
             helper.make_node("Gather", ["palette", "mask"], ["colour"], axis=0),
             helper.make_node("Transpose", ["colour"], ["y"], perm=[0, 3, 1, 2])]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, hw, hw])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, hw, hw])], inits)


class _Calibration:
    """Calibration batches for quantize_static (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, name: str, shape, count: int = 8):
        rng = np.random.default_rng(1)
        self.batches = iter([{name: rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self.batches, None)


def quantized(folder: Path, fmt: str, model: onnx.ModelProto | None = None, *, per_channel: bool = False,
              activations: str = "QUInt8") -> Path:
    """``model`` (default: a small CNN, image [N, 3, 16, 16] -> logits [N, 10]) quantized by
    onnxruntime: statically (``activations`` QUInt8 or QInt8, int8 weights, per tensor or
    ``per_channel``) in ``fmt`` ``QDQ`` or ``QOperator``, or ``fmt`` ``dynamic``
    (``quantize_dynamic``); returns the file."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = model or conv_net(channels=(8, 16), hw=16)
    tag = f"{fmt}-{'pc' if per_channel else 'pt'}-{activations}"
    src, dst = folder / f"float-{tag}.onnx", folder / f"int8-{tag}.onnx"
    onnx.save(model, src)
    if fmt == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    quantize_static(str(src), str(dst), _Calibration(inp.name, shape),
                    quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                    activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8)
    return dst


def embedding_model() -> onnx.ModelProto:
    """The small CNN returning ``emb`` [N, 16] (its pooled, flattened embedding) before ``logits``
    [N, 10], which are computed from it."""
    m = conv_net()
    m.graph.output.insert(0, helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 16]))
    onnx.checker.check_model(m)
    return m


def batchless_model(c: int = 3, hw=(32, 32), layout: str = "CHW", batched: bool = False) -> onnx.ModelProto:
    """images ``[c, H, W]`` (``layout`` HWC: ``[H, W, c]``), unsqueezed to a batch of one inside
    the graph -> conv -> ``boxes`` [-1, 4] (data-dependent: the positions above a threshold) and
    ``scores`` [-1]. ``batched``: re-exported with a batch axis, images ``[1, c, H, W]`` squeezed
    first (a fixed batch of 1)."""
    rng = np.random.default_rng(0)
    dims = [c, *hw] if layout == "CHW" else [*hw, c]
    nodes = []
    x = "images"
    if batched:
        dims = [1, *dims]
        nodes.append(helper.make_node("Squeeze", [x, "axis0"], ["one"]))
        x = "one"
    if layout == "HWC":
        nodes.append(helper.make_node("Transpose", [x], ["chw"], perm=[2, 0, 1]))
        x = "chw"
    inits = [numpy_helper.from_array(rng.standard_normal((1, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([0.5], np.float32), "thr"),
             numpy_helper.from_array(np.array([1, 0], np.int64), "perm_idx")]
    nodes += [helper.make_node("Unsqueeze", [x, "axis0"], ["batch"]),
              helper.make_node("Conv", ["batch", "w"], ["heat"], pads=[1, 1, 1, 1]),
              helper.make_node("Squeeze", ["heat", "axis0"], ["heat2"]),  # [1, H, W]
              helper.make_node("Sigmoid", ["heat2"], ["prob"]),
              helper.make_node("Greater", ["prob", "thr"], ["hit"]),
              helper.make_node("NonZero", ["hit"], ["where"]),  # [3, K]
              helper.make_node("Transpose", ["where"], ["where_t"], perm=[1, 0]),  # [K, 3]
              helper.make_node("Cast", ["where_t"], ["where_f"], to=TensorProto.FLOAT),
              helper.make_node("Concat", ["where_f", "where_f"], ["boxes6"], axis=1),
              helper.make_node("Slice", ["boxes6", "s0", "s1", "s2"], ["boxes"]),
              helper.make_node("GatherND", ["prob", "where_t"], ["scores"])]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "s0"),
              numpy_helper.from_array(np.array([5], np.int64), "s1"),
              numpy_helper.from_array(np.array([1], np.int64), "s2")]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)],
                  [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"])], inits)
