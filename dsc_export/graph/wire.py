"""Wire forms of a cut tensor: what the head sends and the tail reads, made by graph surgery.

A wire form is a pair of node lists, one appended at the end of the head (encode) and one
inserted at the start of the tail (decode), so that stock onnxruntime, TensorRT and Triton
serve the parts as they are:

- ``float32``: the cut tensor as it is (no nodes).
- ``float16``: ``Cast`` to float16 in the head, ``Cast`` back in the tail (2 bytes per element).
- ``int8``: ``QuantizeLinear`` in the head, ``DequantizeLinear`` in the tail (1 byte per
  element), per-tensor affine: q = saturate(round(x / scale) + zero_point) in int8,
  x' = (q - zero_point) * scale. ``scale`` and ``zero_point`` are calibrated on sample inputs
  (:func:`calibrate`, the min/max rule with 0 exactly representable). Per-channel (one scale
  per index of an axis) only when asked for.

Only floating cut tensors change form; a tensor already 1 byte per element has no int8 form
and integer tensors travel as they are (:func:`forms_of`). Pure: nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsc_export.artifacts import CUT_FORMS
from dsc_export.errors import UserError

FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
QMIN, QMAX = -128, 127  # int8
_SUFFIX = {"float16": "wire_fp16", "int8": "wire_int8"}
SCALE, ZERO_POINT = "dsc_export/wire_scale", "dsc_export/wire_zero_point"


@dataclass(frozen=True)
class Quant:
    """The affine map of an int8 wire: ``scale`` (float32 value; a tuple per channel with
    ``axis``) and ``zero_point`` (int8; a tuple per channel).

    ``Split.quant`` in the manifest is :meth:`as_dict` plus what calibration measured.
    """

    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...]
    axis: int | None = None  # None: per tensor; else the per-sample axis + 1 (the batched axis)
    dtype: str = "int8"

    def as_dict(self) -> dict:
        """The manifest's JSON form (tuples as lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Quant:
        """The map from its manifest JSON (extra keys ignored)."""

        def t(v):
            return tuple(v) if isinstance(v, list) else v

        return cls(
            scale=t(d["scale"]),
            zero_point=t(d["zero_point"]),
            axis=d.get("axis"),
            dtype=d.get("dtype", "int8"),
        )


def forms_of(dtype: str, forms: tuple[str, ...] | list[str] = CUT_FORMS) -> list[str]:
    """The wire forms of ``forms`` a cut tensor of ``dtype`` has: every float tensor has float32
    (as it is); float16 and int8 need a float tensor wider than the form; a tensor of another
    dtype has only its own form, named ``float32`` (as it is).

    Raises:
        ValueError: an unknown form.
    """
    bad = [f for f in forms if f not in CUT_FORMS]
    if bad:
        raise ValueError(f"unknown wire form '{bad[0]}' (known: {', '.join(CUT_FORMS)})")
    size = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    out = []
    for f in forms:
        if f == "float32":
            out.append(f)
        elif dtype in FLOAT_DTYPES and size > (2 if f == "float16" else 1):
            out.append(f)
    return out


def converts(dtype: str, form: str) -> bool:
    """True when the form adds nodes for a cut tensor of ``dtype`` (a float16 or int8 form of a
    wider float tensor)."""
    return form != "float32" and form in forms_of(dtype, (form,))


def wire_elem_dtype(dtype: str, form: str) -> str:
    """The numpy dtype name of the tensor on the wire for a cut tensor of ``dtype`` in ``form``."""
    return form if converts(dtype, form) else dtype


def itemsize(dtype: str, form: str) -> int:
    """Bytes per element on the wire."""
    d = wire_elem_dtype(dtype, form)
    return 2 if d == "bfloat16" else np.dtype(d).itemsize


def wire_name(tensor: str, dtype: str, form: str) -> str:
    """The name of the tensor that crosses the wire: ``tensor`` itself, or ``tensor.wire_fp16`` /
    ``tensor.wire_int8`` for a form that converts it."""
    return f"{tensor}.{_SUFFIX[form]}" if converts(dtype, form) else tensor


def calibrate(values: np.ndarray, axis: int | None = None, *, symmetric: bool = False) -> Quant:
    """The per-tensor (or, with ``axis``, per-channel) affine int8 map of ``values``.

    The range [lo, hi] is the min and max of the values widened to include 0 (so that 0 maps to
    an integer exactly); scale = (hi - lo) / 255 as float32, zero_point = round(QMIN - lo / scale)
    clipped to int8. A range of width 0 gets scale 1. ``symmetric``: zero_point 0 and scale =
    max |x| / 127 (what TensorRT's Q/DQ takes: it supports zero point 0 only).

    Args:
        values: the cut tensor on the calibration inputs, ``[N, *per-sample shape]``, finite.
        axis: None, or the axis (of ``values``, >= 1) that gets one scale per index.
        symmetric: zero point 0.

    Raises:
        ValueError: no values, or a value that is not finite.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("calibration needs finite values")
    if axis is None:
        lo, hi = np.minimum(v.min(), 0.0), np.maximum(v.max(), 0.0)
    else:
        others = tuple(k for k in range(v.ndim) if k != axis)
        lo, hi = np.minimum(v.min(axis=others), 0.0), np.maximum(v.max(axis=others), 0.0)
    if symmetric:
        width = np.asarray(np.maximum(-lo, hi), dtype=np.float64)
        scale = np.where(width > 0, width / QMAX, 1.0).astype(np.float32)
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        width = np.asarray(hi - lo, dtype=np.float64)
        scale = np.where(width > 0, width / (QMAX - QMIN), 1.0).astype(np.float32)
        zp = np.clip(np.rint(QMIN - lo / scale.astype(np.float64)), QMIN, QMAX).astype(np.int64)
    if axis is None:
        return Quant(float(scale), int(zp))
    return Quant(tuple(float(s) for s in scale), tuple(int(z) for z in zp), axis=axis)


def clipped_share(values: np.ndarray, q: Quant) -> float:
    """The share of ``values`` outside the range the map represents (they saturate)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 0.0
    scale, zp = _broadcast(q, v.ndim)
    y = np.rint(v / scale) + zp
    return float(np.mean((y < QMIN) | (y > QMAX)))


def _broadcast(q: Quant, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(q.scale, dtype=np.float32).astype(np.float64)
    zp = np.asarray(q.zero_point, dtype=np.float64)
    if q.axis is not None:
        shape = [1] * ndim
        shape[q.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def _elem(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _quant_initializers(q: Quant) -> list[onnx.TensorProto]:
    scale = np.asarray(q.scale, dtype=np.float32)
    zp = np.asarray(q.zero_point, dtype=np.int8)
    return [numpy_helper.from_array(scale, SCALE), numpy_helper.from_array(zp, ZERO_POINT)]


def _axis_attr(q: Quant) -> dict:
    return {} if q.axis is None else {"axis": q.axis}


def encode(
    tensor: str, dtype: str, form: str, quant: Quant | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and initializers) at the end of the head that turn ``tensor`` into its wire
    form :func:`wire_name`; none for a form that does not convert it.

    Raises:
        ValueError: an int8 form without ``quant``.
    """
    if not converts(dtype, form):
        return [], []
    out = wire_name(tensor, dtype, form)
    if form == "float16":
        return [
            helper.make_node(
                "Cast", [tensor], [out], to=TensorProto.FLOAT16, name="dsc_export/wire_cast"
            )
        ], []
    if quant is None:
        raise ValueError("an int8 wire needs a calibrated scale and zero point")
    nodes, src = [], tensor
    if dtype != "float32":  # QuantizeLinear reads float32 before opset 19
        src = f"{tensor}.wire_f32"
        nodes.append(
            helper.make_node(
                "Cast", [tensor], [src], to=TensorProto.FLOAT, name="dsc_export/wire_to_float32"
            )
        )
    nodes.append(
        helper.make_node(
            "QuantizeLinear",
            [src, SCALE, ZERO_POINT],
            [out],
            name="dsc_export/wire_quantize",
            **_axis_attr(quant),
        )
    )
    return nodes, _quant_initializers(quant)


def decode(
    tensor: str, dtype: str, form: str, quant: Quant | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and initializers) at the start of the tail that turn the wire tensor back into
    ``tensor`` of ``dtype``; none for a form that does not convert it.

    Raises:
        ValueError: an int8 form without ``quant``.
    """
    if not converts(dtype, form):
        return [], []
    src = wire_name(tensor, dtype, form)
    if form == "float16":
        return [
            helper.make_node(
                "Cast", [src], [tensor], to=_elem(dtype), name="dsc_export/wire_uncast"
            )
        ], []
    if quant is None:
        raise ValueError("an int8 wire needs a calibrated scale and zero point")
    out = tensor if dtype == "float32" else f"{tensor}.wire_f32"
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            [src, SCALE, ZERO_POINT],
            [out],
            name="dsc_export/wire_dequantize",
            **_axis_attr(quant),
        )
    ]
    if dtype != "float32":
        nodes.append(
            helper.make_node(
                "Cast", [out], [tensor], to=_elem(dtype), name="dsc_export/wire_to_dtype"
            )
        )
    return nodes, _quant_initializers(quant)


def min_opset(form: str, quant: Quant | None = None) -> int:
    """The default-domain opset a form's nodes need (QuantizeLinear: 10; with an axis: 13)."""
    if form != "int8":
        return 1
    return 13 if quant is not None and quant.axis is not None else 10


def check_symmetric(quants: dict[str, dict | None], backend: str) -> None:
    """Refuse int8 wires with a zero point other than 0 for a backend whose Q/DQ takes zero point
    0 only (TensorRT), one line naming the first split.

    Args:
        quants: split id -> ``Split.quant`` (None for other forms).
        backend: the backend's name, for the message.

    Raises:
        UserError: an affine int8 wire among ``quants``.
    """
    affine = [sid for sid, q in quants.items() if q and any(np.atleast_1d(q["zero_point"]) != 0)]
    if affine:
        more = f" (and {len(affine) - 1} more)" if len(affine) > 1 else ""
        raise UserError(
            f"{backend} takes int8 wires with zero point 0 only; {affine[0]}{more} is affine: "
            "split "
            "again with --int8-symmetric, or serve it with onnxruntime"
        )
