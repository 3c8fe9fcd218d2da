"""What a model's graph declares about its inputs, and what onnx's static inference adds.

Pure: onnx and numpy only. :func:`infer_types` is the package's one wrapper of
``onnx.shape_inference.infer_shapes`` on whole models.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnx
from onnx import helper

PROBE_BATCHES = (1, 2)
TWO_GB = 2**31 - 2**20  # protobuf's limit, with a margin


@cache
def np_dtype_name(elem_type: int) -> str:
    """The numpy dtype name of an ONNX ``TensorProto`` element type (``1`` -> ``float32``)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name

def input_signature(model: onnx.ModelProto) -> list[tuple[str, list, str]]:
    """(name, shape with symbolic dims as strings, dtype) of each data input."""
    inits = {t.name for t in model.graph.initializer}
    sig = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        sig.append((i.name, dims, np_dtype_name(tt.elem_type)))
    return sig

def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The input's batch size if it is fixed in the graph, else None."""
    _, dims, _ = input_signature(model)[0]
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None

def batch_dim(model: onnx.ModelProto) -> int | str:
    """The input's batch dimension: its fixed size, or its symbolic name (``N`` when unnamed)."""
    dims = input_signature(model)[0][1]
    return dims[0] if dims and dims[0] != "?" else "N"

def probe_batches(model: onnx.ModelProto) -> tuple[int, ...]:
    """The batch sizes to run the model at when probing sizes: its fixed batch size if it has
    one, else ``PROBE_BATCHES``.
    """
    fb = fixed_batch(model)
    return (fb,) if fb else PROBE_BATCHES


def infer_types(model: onnx.ModelProto, *, check_type: bool = False, data_prop: bool = True,
                strict: bool = False, errors: str = "ignore") -> dict[str, onnx.TypeProto]:
    """Tensor types of ``model`` after onnx's static inference, initializers included.

    Args:
        model: the model, best a weightless copy (:func:`dsc_export.graph.model.without_data`).
        check_type: onnx's ``check_type`` (True also infers through ops defined by a function
            body, e.g. GroupNormalization-21).
        data_prop: onnx's ``data_prop`` (propagates shape values through shape arithmetic).
        strict: onnx's ``strict_mode`` (an inference error of any node is an error).
        errors: ``"ignore"``: when inference fails, the types the graph declares;
            ``"raise"``: onnx's error goes to the caller.

    Returns:
        Tensor name -> its ``TypeProto`` (tensors without an element type left out).

    Raises:
        Exception: onnx's inference error, with ``errors="raise"`` only.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=check_type, strict_mode=strict, data_prop=data_prop)
    except Exception:
        if errors == "raise":
            raise
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    for t in g.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types
