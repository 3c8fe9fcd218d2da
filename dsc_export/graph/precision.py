"""Precision as an ONNX transform: float16 compute with the model's inputs and outputs unchanged.

TensorRT 11 has no FP16 builder flag (networks are strongly typed: the ONNX types are the
precision), so fp16 is a graph conversion done before the build, the same for every backend.

The conversion touches only the tensors that carry data (those whose values depend on the
graph inputs). Shape arithmetic stays in its own types, so padding computed from an input's
size is never rounded; graph inputs and outputs keep their dtypes (a Cast follows a float32
input and precedes a float32 output). Float32 weights read only by converted nodes are stored
as float16 (clipped to float16's range); any other float32 operand is cast where it is read.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsc_export.errors import UserError
from dsc_export.graph.model import _attr_graphs, data_dependent, dataflow

PRECISIONS = ("fp32", "fp16")
FP16_MAX = float(np.finfo(np.float16).max)

# Inputs that the operator defines as float32 whatever the data type (they stay float32).
KEEP_FLOAT32 = {"Resize": {1, 2}, "Upsample": {1}}
# Operators that read their inputs' shapes only: a float16 operand is fine as it is.
SHAPE_ONLY = {"Shape", "Size"}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` computing in float16, with its inputs and outputs unchanged.

    Args:
        model: an ONNX model with its weights loaded.

    Returns:
        The converted model (a new ``ModelProto``).

    Raises:
        UserError: the graph has control flow (If, Loop, Scan), which this transform does not
            convert.
    """
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(any(True for _ in _attr_graphs(a)) for n in g.node for a in n.attribute):
        raise UserError("float16 conversion does not handle control flow (If/Loop/Scan); build with --precision fp32")

    types = _elem_types(out)
    values, _ = data_dependent(dataflow(g))
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}

    converted_nodes = [n for n in g.node if n.op_type not in SHAPE_ONLY and any(i in values for i in n.input)]
    converted = {id(n) for n in converted_nodes}
    half: set[str] = set()  # tensors that are float16 after the conversion
    for n in converted_nodes:
        for o in n.output:
            if o and types.get(o) == F:
                half.add(o)
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == F:
                    a.i = H

    # Weights read only by converted nodes (outside the float32-only inputs) are stored as float16.
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))
    for name, t in inits.items():
        if t.data_type != F or name in graph_inputs:
            continue
        uses = readers.get(name, [])
        if uses and all(id(n) in converted and k not in KEEP_FLOAT32.get(n.op_type, ()) for n, k in uses):
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name))
            half.add(name)
    for n in g.node:  # Constant nodes read only by converted nodes, likewise
        if n.op_type != "Constant" or types.get(n.output[0]) != F:
            continue
        uses = readers.get(n.output[0], [])
        if uses and all(id(u) in converted and k not in KEEP_FLOAT32.get(u.op_type, ()) for u, k in uses):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == F:
                    arr = numpy_helper.to_array(a.t)
                    a.t.CopyFrom(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)))
                    half.add(n.output[0])

    # Casts where a converted node reads float32 or a float32 reader gets float16.
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == H else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to,
                                              name=f"dsc_cast_{len(casts)}"))
        return casts[key]

    body: list[onnx.NodeProto] = []
    for n in g.node:
        new_nodes = []
        keep = KEEP_FLOAT32.get(n.op_type, set())
        for k, i in enumerate(n.input):
            if not i:
                continue
            if id(n) in converted and k not in keep and types.get(i) == F and i not in half:
                n.input[k] = cast(i, H)
            elif (id(n) not in converted or k in keep) and i in half and n.op_type not in SHAPE_ONLY:
                n.input[k] = cast(i, F)
        body.extend(new_nodes)
        body.append(n)

    # Outputs keep their float32 type: the producer writes NAME.fp16, a Cast writes NAME.
    tail_nodes = []
    for o in g.output:
        if o.name in half:
            inner = f"{o.name}__fp16"
            for n in body:
                n.output[:] = [inner if x == o.name else x for x in n.output]
                n.input[:] = [inner if x == o.name else x for x in n.input]
            tail_nodes.append(helper.make_node("Cast", [inner], [o.name], to=F, name=f"dsc_cast_out_{o.name}"))
            half.discard(o.name)
            half.add(inner)
    del g.node[:]
    g.node.extend(body + tail_nodes)
    for vi in g.value_info:
        if vi.name in half and vi.type.tensor_type.elem_type == F:
            vi.type.tensor_type.elem_type = H
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from static inference on a weightless copy."""
    from dsc_export.graph.shapes import _without_data

    light = _without_data(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False)
    except Exception as exc:  # an invalid graph: say so in one line
        raise UserError(f"cannot infer tensor types for the float16 conversion: {str(exc).splitlines()[0]}") from exc
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types
