"""Precision as an ONNX transform: float16 compute with the model's inputs and outputs unchanged.

TensorRT 11 has no FP16 builder flag (networks are strongly typed: the ONNX types are the
precision), so fp16 is a graph conversion done before the build, the same for every backend.

What is converted, and what is not:

- **Only tensors that carry data** (whose values depend on the graph inputs) decide that a node
  computes in float16. Shape arithmetic stays in its own types, so padding or a Resize size
  computed from an input's size is never rounded; integer and bool paths are untouched.
- **The ONNX spec decides per type variable.** A node that reads or writes float32 data has
  each float32 type variable of its schema (``onnx.defs.get_schema(op, opset).type_constraints``
  at the model's opset) turned to float16 when the spec allows float16 for it; inputs the spec
  types as ``tensor(float)`` (QuantizeLinear-13's scale, Resize's scales, NonMaxSuppression's
  boxes) and type variables without float16 (Range, old reductions, LayerNormalization's
  ``U``) stay float32, with a Cast where a float16 tensor meets them.
- **Some nodes keep float32 compute whole** (:data:`KEEP_FLOAT32_OPS`), with Casts around
  them: quantization ops (their scales are the quantized model's arithmetic), ops whose output
  dtype is an attribute (RandomNormalLike, EyeLike, ...), control flow (If/Loop/Scan: their
  bodies run in float32, outer-scope tensors they read are cast back), ops outside the ONNX
  domain, nodes whose types onnx cannot infer, and nodes reading a float32 constant beyond
  float16's range (|v| > 65504), which would otherwise be clipped. Given the activations' peaks
  on sample inputs (:func:`activation_peaks`), nodes around activations beyond float16's range
  keep float32 too.
- **Already-float16, float64 and bfloat16 tensors keep their types**: only float32 becomes
  float16. A float16 model converts to itself; a float64 part stays float64.
- **Casts to float32** become casts to float16 when their result carries data; Constant and
  ConstantOfShape values and float32 weights are stored as float16 when every reader takes
  float16, and cast where they are read otherwise.
- Graph inputs and outputs keep their dtypes (a Cast follows a float32 input and precedes a
  float32 output).

onnxruntime's CPU provider lacks float16 kernels for many ops the spec allows (Conv,
Softmax, reductions ...); its graph optimiser inserts float32 Casts around those itself, so
the converted graph loads and runs, computing those ops in float32. That is a run-time choice
of that provider, not of the graph: TensorRT and CUDA run them in float16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsc_export.errors import UserError, first_line
from dsc_export.graph import probe
from dsc_export.graph.model import (
    _attr_graphs,
    data_dependent,
    dataflow,
    has_subgraph,
    outer_scope_inputs,
    sort_nodes,
    without_data,
)
from dsc_export.graph.signature import infer_types

FP16_MAX = float(np.finfo(np.float16).max)
# Activations beyond this on the sample inputs keep float32 compute: float16's range with two
# bits of headroom for real inputs larger than the samples.
PEAK_LIMIT = FP16_MAX / 4
F, H = TensorProto.FLOAT, TensorProto.FLOAT16

# Nodes that keep float32 compute although the spec allows float16, with the reason the notes give.
KEEP_FLOAT32_OPS = {
    "QuantizeLinear": "quantization scales stay float32",
    "DequantizeLinear": "quantization scales stay float32",
    "DynamicQuantizeLinear": "quantization scales stay float32",
    "QLinearConv": "quantized op", "QLinearMatMul": "quantized op",
    "RandomNormalLike": "output dtype is an attribute", "RandomUniformLike": "output dtype is an attribute",
    "Bernoulli": "output dtype is an attribute", "EyeLike": "output dtype is an attribute",
    "Multinomial": "output dtype is an attribute", "BitCast": "reinterprets float32 bits",
}
# Ops that keep float32 compute when an attribute has one of these values: onnxruntime's CPU
# provider has no float16 kernel for them, and accumulating in float16 would lose precision.
KEEP_FLOAT32_WHEN = {
    ("ScatterElements", "reduction"): {b"add", b"mul", b"max", b"min"},
    ("ScatterND", "reduction"): {b"add", b"mul", b"max", b"min"},
}
# Operators that read their inputs' shapes only: any dtype is fine as it is.
SHAPE_ONLY = {"Shape", "Size"}
# Data movement without arithmetic: the first input's values in another shape.
MOVE_OPS = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Tile"}
# Nodes whose float32 output is a constant stored in an attribute (rewritten as float16 when
# every reader takes float16).
CONSTANT_OPS = {"Constant", "ConstantOfShape"}


@dataclass
class Float16Conversion:
    """The result of :func:`convert_float16`.

    Attributes:
        model: the converted model.
        kept: node name -> why that node keeps float32 compute although it reads or writes
            float32 data (spec type constraints, :data:`KEEP_FLOAT32_OPS`, control flow,
            out-of-range constants).
        casts: number of Cast nodes added.
        converted: number of nodes that compute in float16 after the conversion and did not before.
    """

    model: onnx.ModelProto
    kept: dict[str, str] = field(default_factory=dict)
    casts: int = 0
    converted: int = 0

    def notes(self) -> list[str]:
        """One line per reason nodes keep float32 compute, with counts and a few node names."""
        by_reason: dict[str, list[str]] = {}
        for node, why in self.kept.items():
            by_reason.setdefault(why, []).append(node)
        lines = [] if self.converted else ["fp16: nothing to convert (no float32 computation on the model's data)"]
        for why, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(f"'{n}'" for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            lines.append(f"fp16: {len(nodes)} node(s) keep float32 compute ({why}): {shown}")
        return lines


def to_float16_for_build(model: onnx.ModelProto, samples, log=lambda s: None) -> onnx.ModelProto:
    """:func:`convert_float16` with the activation peaks of ``model`` on sample inputs, so that
    nodes around activations beyond float16's range keep float32 (what every backend's fp16
    build uses).

    Args:
        model: a part (head, tail or whole model) with its weights loaded.
        samples: an object with ``feeds(batch, index)`` for this part's inputs, from the
            caller (e.g. ``dsc_export.inputs.SampleInputs.random(model)``: random ones within
            the ranges the graph implies).
        log: receives :meth:`Float16Conversion.notes`.

    Returns:
        The converted model.
    """

    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[:1]] if model.graph.input else []
    batch = dims[0] if dims and dims[0] > 0 else 2
    conv = convert_float16(model, activation_peaks(model, [samples.feeds(batch)]))
    for line in conv.notes():
        log(line)
    return conv.model


def activation_peaks(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest magnitude each float32 tensor that carries data reaches on sample inputs.

    One onnxruntime run (float32, CPU; :func:`dsc_export.graph.probe.run_samples`) per sample
    of a copy of ``model`` that also outputs
    ``max(|t|)`` of every such tensor (a scalar each, so memory stays that of one run).

    Args:
        model: the float32 model (weights loaded).
        samples: feeds by input name, e.g. the verification inputs of ``split``/``build``.

    Returns:
        Tensor name -> max |value| over the samples (NaN counts as infinite).
    """

    watch = onnx.ModelProto()
    watch.CopyFrom(model)
    g = watch.graph
    types = _elem_types(watch)
    values, _ = data_dependent(dataflow(g))
    outputs = [i.name for i in g.input] + [o for n in g.node for o in n.output]
    watched = [t for t in dict.fromkeys(outputs) if t in values and types.get(t) == F]
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | {i.name for i in g.input}
    names = {}
    for k, t in enumerate(watched):
        a, m = f"dsc_peak/{k}/abs", f"dsc_peak/{k}"
        while a in taken or m in taken:
            a, m = a + "_", m + "_"
        g.node.extend([helper.make_node("Abs", [t], [a], name=a),
                       helper.make_node("ReduceMax", [a], [m], name=m, keepdims=0)])
        g.output.append(helper.make_tensor_value_info(m, F, []))
        names[m] = t
    peaks: dict[str, float] = {}
    for got in probe.run_samples(watch, list(names), samples):
        for m, v in zip(names, got):
            v = float(v) if np.isfinite(v) else float("inf")
            peaks[names[m]] = max(peaks.get(names[m], 0.0), v)
    return peaks


def convert_float16(model: onnx.ModelProto, peaks: dict[str, float] | None = None) -> Float16Conversion:
    """Convert ``model``'s float32 data computation to float16 (module docstring: what and how).

    Args:
        model: an ONNX model with its weights loaded (not modified).
        peaks: max |value| of tensors on sample inputs (:func:`activation_peaks`); a node that
            reads or writes a tensor beyond :data:`PEAK_LIMIT` keeps float32 compute (float16
            would overflow to inf there). None: no activation is checked (only constants).

    Returns:
        A :class:`Float16Conversion`: the new model (valid for ``onnx.checker`` when the input
        is; same input and output names, shapes and dtypes) and the nodes kept float32.

    Raises:
        UserError: the graph has a cycle or reads a tensor nothing defines, or onnx cannot
            infer its types (an invalid graph): one line naming the node.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sort_nodes(out)
    g = out.graph
    types = _elem_types(out)
    values, _ = data_dependent(dataflow(g))
    opsets = {(d.domain or "ai.onnx"): d.version for d in out.opset_import}

    graph_inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in graph_inputs}  # overridable ones keep their type
    producer_attr = {n.output[0]: n for n in g.node if n.op_type in CONSTANT_OPS and n.output}
    too_big = _out_of_range(inits, producer_attr, types)

    # 1. Per node: the dtype each input must have and each output gets.
    wants: list[list[int | None]] = []
    actual: dict[str, int | None] = {}
    kept: dict[str, str] = {}
    hot = {t: p for t, p in (peaks or {}).items() if not p <= PEAK_LIMIT}
    ctx = _Graph(out, types, values, opsets, too_big, {o.name for o in g.output}, hot)
    for k, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{k}"
        w, o, why = _plan(n, ctx)
        if why:
            kept[name] = why
        if n.op_type == "Cast" and o[0] == H and types.get(n.output[0]) == F:
            next(a for a in n.attribute if a.name == "to").i = H
        wants.append(w)
        for t, ty in zip(n.output, o):
            if t:
                actual[t] = ty
    for name in graph_inputs:
        actual[name] = types.get(name)
    _half_constant_moves(g, wants, actual, types, values, {o.name for o in g.output})
    converted = sum(1 for n, w in zip(g.node, wants)
                    if any(ty == H and types.get(t) == F for t, ty in zip(list(n.input) + list(n.output),
                                                                            w + [actual.get(o) for o in n.output])))
    readers: dict[str, list[int | None]] = {}
    for n, w in zip(g.node, wants):
        for t, ty in zip(n.input, w):
            if t:
                readers.setdefault(t, []).append(ty)
        for t in _outer_refs(n):
            readers.setdefault(t, []).append(types.get(t))  # subgraphs keep their types
    for o in g.output:
        readers.setdefault(o.name, []).append(types.get(o.name))

    # 2. Constants every reader takes as float16 are stored as float16.
    def all_half(t: str) -> bool:
        r = [x for x in readers.get(t, []) if x is not None]
        return bool(r) and all(x == H for x in r) and t not in too_big

    for name, t in inits.items():
        actual[name] = t.data_type
        if t.data_type == F and all_half(name):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
            actual[name] = H
    for name, n in producer_attr.items():
        if types.get(name) == F and all_half(name):
            _constant_to_half(n)
            actual[name] = H
    for t in g.sparse_initializer:
        actual[t.values.name] = t.values.data_type

    # 3. Casts where a tensor's dtype differs from what its reader takes; outputs keep their dtype.
    casts: dict[tuple[str, int], str] = {}
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | graph_inputs | set(inits)

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    added = 0
    out_names = {o.name: types.get(o.name) for o in g.output}
    body: list[onnx.NodeProto] = []
    for n, w in zip(g.node, wants):
        for k, (t, ty) in enumerate(zip(n.input, w)):
            if t and ty is not None and actual.get(t) in (F, H) and ty in (F, H) and actual[t] != ty:
                if (t, ty) not in casts:
                    casts[(t, ty)] = fresh(f"{t}__as_{'fp16' if ty == H else 'fp32'}")
                    body.append(helper.make_node("Cast", [t], [casts[(t, ty)]], to=ty, name=fresh(f"dsc_cast/{t}")))
                    added += 1
                n.input[k] = casts[(t, ty)]
        renames = {}
        for t in _outer_refs(n):  # control flow: its bodies read float32 where the graph had it
            if actual.get(t) == H and types.get(t) == F:
                if (t, F) not in casts:
                    casts[(t, F)] = fresh(f"{t}__as_fp32")
                    body.append(helper.make_node("Cast", [t], [casts[(t, F)]], to=F, name=fresh(f"dsc_cast/{t}")))
                    added += 1
                renames[t] = casts[(t, F)]
        if renames:
            for a in n.attribute:
                for sub in _attr_graphs(a):
                    _rename_free(sub, renames)
        body.append(n)
        for k, t in enumerate(n.output):  # a graph output computed in float16: cast it back
            if t in out_names and actual.get(t) == H and out_names[t] == F:
                inner = fresh(f"{t}__fp16")
                n.output[k] = inner
                body.append(helper.make_node("Cast", [inner], [t], to=F, name=fresh(f"dsc_cast/{t}")))
                added += 1
                actual[inner], actual[t] = H, F
                casts[(t, H)] = inner
    del g.node[:]
    g.node.extend(body)
    if added and "ai.onnx" not in opsets:  # the Casts need the ONNX domain
        out.opset_import.append(helper.make_opsetid("", _default_opset(out.ir_version)))
    # value_info follows the new types; outputs and inputs never change.
    for vi in g.value_info:
        t = actual.get(vi.name)
        if vi.type.HasField("tensor_type") and t in (F, H) and vi.type.tensor_type.elem_type in (F, H):
            vi.type.tensor_type.elem_type = t
    return Float16Conversion(out, kept, added, converted)


def _half_constant_moves(g: onnx.GraphProto, wants: list[list[int | None]], actual: dict[str, int | None],
                         types: dict[str, int], values: set[str], outputs: set[str]) -> None:
    """Let constant data movement (an Identity or Reshape of a weight, as exporters make to share
    weights) run in float16 when every reader takes its result as float16, so that the weight is
    stored as float16 instead of cast at each read (exact: moving values rounds nothing)."""
    uses: dict[str, list[tuple[int, int]]] = {}
    for j, n in enumerate(g.node):
        for k, t in enumerate(n.input):
            if t:
                uses.setdefault(t, []).append((j, k))
    for j in reversed(range(len(g.node))):
        n = g.node[j]
        if n.op_type not in MOVE_OPS or (n.domain or "ai.onnx") != "ai.onnx" or len(n.output) != 1:
            continue
        src, dst = n.input[0], n.output[0]
        if src in values or dst in values or dst in outputs or types.get(src) != F or actual.get(dst) != F:
            continue
        readers = [wants[r][k] for r, k in uses.get(dst, [])]
        if readers and all(w == H for w in readers) and not any(_outer_refs(g.node[r]) for r, _ in uses[dst]):
            wants[j][0] = H
            actual[dst] = H


@dataclass(frozen=True)
class _Graph:
    """What :func:`_plan` needs to know about the whole graph."""

    model: onnx.ModelProto
    types: dict[str, int]  # element type of every tensor before the conversion
    values: set[str]  # tensors that carry data (depend on the inputs' values)
    opsets: dict[str, int]  # domain -> version
    too_big: dict[str, float]  # float32 constants beyond float16's range -> max |value|
    outputs: set[str]  # graph outputs
    hot: dict[str, float]  # float32 data tensors beyond PEAK_LIMIT on the samples -> their peak


def _plan(n: onnx.NodeProto, ctx: _Graph) -> tuple[list[int | None], list[int | None], str | None]:
    """The dtypes node ``n`` takes at each input and gives at each output after the conversion.

    Returns:
        ``(wants, outputs, why)``: per input the dtype it must be read as (None: any, as it
        is), per output its new dtype (None: unknown), and why the node keeps float32 compute
        while reading or writing float32 data (None when it does not, or carries no such data).
    """
    types, values, opsets, too_big = ctx.types, ctx.values, ctx.opsets, ctx.too_big
    ins, outs = list(n.input), list(n.output)
    original = ([types.get(t) if t else None for t in ins], [types.get(t) if t else None for t in outs])
    if n.op_type in SHAPE_ONLY and (n.domain or "ai.onnx") == "ai.onnx":
        return [None] * len(ins), original[1], None
    refs = _outer_refs(n)
    float_data = any(t and t in values and types.get(t) == F for t in ins + outs + refs)
    if not float_data:
        return original[0], original[1], None
    if refs or has_subgraph(n):
        return (*original, f"control flow ({n.op_type}): its subgraphs run as exported")
    domain = n.domain or "ai.onnx"
    if n.op_type in KEEP_FLOAT32_OPS and domain == "ai.onnx":
        return (*original, f"{n.op_type}: {KEEP_FLOAT32_OPS[n.op_type]}")
    hot = [t for t in ins + outs if t in ctx.hot and types.get(t) == F]
    if hot:
        return (*original, f"activations beyond {PEAK_LIMIT:.0f} on the sample inputs; float16 overflows at "
                           f"{FP16_MAX:.0f}")
    for a in n.attribute:
        if a.s in KEEP_FLOAT32_WHEN.get((n.op_type, a.name), ()):
            return (*original, f"{n.op_type} with {a.name}={a.s.decode()}: no float16 kernel in onnxruntime's "
                               "CPU provider, and float16 accumulation loses precision")
    schema = _schema(n.op_type, opsets.get(domain), domain)
    if schema is None:
        return (*original, f"{domain}::{n.op_type} has no ONNX schema at opset {opsets.get(domain)}")
    unknown = [t for t in outs if t and types.get(t) is None]
    if unknown:
        return (*original, f"onnx cannot infer the type of {n.op_type}'s output '{unknown[0]}'")
    if n.op_type == "Cast":  # reads any type; casts to float16 where it made float32 data
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        keep = to != F or outs[0] not in values or outs[0] in ctx.outputs
        return [None], [to if keep else H], None

    bound = _bind(schema, ins, outs)
    if bound is None:
        return (*original, f"{n.op_type} has more inputs or outputs than its schema at opset {schema.since_version}")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    half_vars, why = set(), None
    for tv, members in bound.items():
        tys = [types.get(t) for _, _, t in members]
        if tv not in allowed or F not in tys:
            continue  # a literal type (tensor(float)) or a variable without float32 here
        if None in tys:
            return (*original, f"onnx cannot infer the types of {n.op_type}'s {tv}")
        if "tensor(float16)" not in allowed[tv]:
            if any(t in values for _, _, t in members):
                why = f"{n.op_type}-{schema.since_version} does not allow float16 for its {tv}"
            continue
        if not any(io == "in" for io, _, _ in members):
            continue  # set by an attribute, not by the inputs
        big = [t for io, _, t in members if io == "in" and t in too_big]
        if big:
            return (*original, f"constant '{big[0]}' holds |values| up to {too_big[big[0]]:.3g}, beyond float16's "
                               f"{FP16_MAX:.0f}")
        half_vars.add(tv)
    w, o = list(original[0]), list(original[1])
    for tv in half_vars:
        for io, k, _ in bound[tv]:
            (w if io == "in" else o)[k] = H
    literal = [(io, k) for io, formal, actual in (("input", schema.inputs, ins), ("output", schema.outputs, outs))
               for k, t in enumerate(actual) if t and t in values and types.get(t) == F
               and (formal[min(k, len(formal) - 1)].type_str == "tensor(float)")]
    if literal and not why:
        io, k = literal[0]
        formal = (schema.inputs if io == "input" else schema.outputs)
        why = f"{n.op_type}-{schema.since_version} takes tensor(float) as its {formal[min(k, len(formal) - 1)].name}"
    if why and not any(x == H for x in o):
        return original[0], original[1], why
    if w == original[0] and o == original[1]:
        return w, o, None
    try:  # onnx's own inference has the last word on the output types (and rejects what it must)
        inferred = _infer(schema, n, w, types, ctx.model)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        return (*original, f"onnx type inference rejects {n.op_type}-{schema.since_version} in float16 ({msg})")
    o = [inferred.get(t, ty) if t else ty for t, ty in zip(outs, o)]
    return w, o, None


def _infer(schema, n: onnx.NodeProto, wants: list[int | None], types: dict[str, int],
           model: onnx.ModelProto) -> dict[str, int]:
    """Output element types of node ``n`` given its inputs' element types ``wants`` (None: as
    in ``types``), by onnx's inference function, or by inference on its function body for ops
    defined by one (MeanVarianceNormalization ...).

    Raises:
        Exception: onnx's inference error (a type constraint the new types break).
    """
    in_types = {}
    for t, ty in zip(n.input, wants):
        if t:
            ty = ty if ty is not None else types.get(t)
            if ty is None:
                return {}
            in_types[t] = helper.make_tensor_type_proto(ty, None)
    if schema.has_type_and_shape_inference_function:
        got = onnx.shape_inference.infer_node_outputs(schema, n, in_types, opset_imports=list(model.opset_import),
                                                      ir_version=model.ir_version)
        return {k: v.tensor_type.elem_type for k, v in got.items() if v.HasField("tensor_type")}
    if not (schema.has_function or schema.has_context_dependent_function):
        return {}
    graph = helper.make_graph([n], "one", [helper.make_value_info(k, v) for k, v in in_types.items()],
                              [helper.make_value_info(o, onnx.TypeProto()) for o in n.output if o])
    one = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    got = infer_types(one, check_type=True, data_prop=False, strict=True, errors="raise")
    return {o: got[o].tensor_type.elem_type for o in n.output if o in got}


def _default_opset(ir_version: int) -> int:
    """The newest ONNX opset a model of ``ir_version`` may import."""
    ok = [opset for _, ir, opset, *_ in helper.VERSION_TABLE if ir <= ir_version]
    return min(max(ok, default=1), onnx.defs.onnx_opset_version())


def _bind(schema, ins: list[str], outs: list[str]) -> dict[str, list[tuple[str, int, str]]] | None:
    """Type-string -> the (``in``/``out``, index, tensor) bound to it; None when the node has
    more inputs/outputs than the schema takes or a heterogeneous variadic."""
    bound: dict[str, list[tuple[str, int, str]]] = {}
    for io, actual, formal in (("in", ins, schema.inputs), ("out", outs, schema.outputs)):
        for k, t in enumerate(actual):
            if k < len(formal):
                f = formal[k]
            elif formal and formal[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                f = formal[-1]
            else:
                return None
            if f.option == onnx.defs.OpSchema.FormalParameterOption.Variadic and not f.is_homogeneous:
                return None
            if t:
                bound.setdefault(f.type_str, []).append((io, k, t))
    return bound


_SCHEMAS: dict[tuple[str, int | None, str], object] = {}


def _schema(op: str, opset: int | None, domain: str):
    key = (op, opset, domain)
    if key not in _SCHEMAS:
        try:
            _SCHEMAS[key] = None if opset is None else onnx.defs.get_schema(op, opset, "" if domain == "ai.onnx"
                                                                            else domain)
        except onnx.defs.SchemaError:
            _SCHEMAS[key] = None
    return _SCHEMAS[key]


def _outer_refs(n: onnx.NodeProto) -> list[str]:
    if not has_subgraph(n):
        return []
    return outer_scope_inputs(n)


def _rename_free(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename the outer-scope references of ``graph`` (and its nested subgraphs) in place."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    live = {k: v for k, v in renames.items() if k not in local}
    if not live:
        return
    for n in graph.node:
        n.input[:] = [live.get(i, i) for i in n.input]
        for a in n.attribute:
            for sub in _attr_graphs(a):
                _rename_free(sub, live)
    for o in graph.output:
        if o.name in live:  # a body output that is an outer tensor: outputs are positional
            o.name = live[o.name]


def _out_of_range(inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
                  types: dict[str, int]) -> dict[str, float]:
    """Float32 constants with finite values beyond float16's range: name -> max |value|."""
    big = {}
    arrays = [(name, t) for name, t in inits.items() if t.data_type == F]
    for name, n in producers.items():
        if types.get(name) == F:
            a = next((a for a in n.attribute if a.name in ("value", "value_float", "value_floats")), None)
            if a is not None:
                arrays.append((name, a.t if a.name == "value" else np.asarray(a.f if a.name == "value_float"
                                                                            else list(a.floats), np.float32)))
    for name, t in arrays:
        arr = numpy_helper.to_array(t) if isinstance(t, onnx.TensorProto) else t
        finite = np.abs(arr[np.isfinite(arr)]) if arr.size else arr
        m = float(finite.max()) if finite.size else 0.0
        if m > FP16_MAX:
            big[name] = m
    return big


def _constant_to_half(n: onnx.NodeProto) -> None:
    """Rewrite a Constant's or ConstantOfShape's float32 value as float16, in place."""
    for k, a in enumerate(n.attribute):
        if a.name == "value" and a.t.data_type == F:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        elif a.name in ("value_float", "value_floats"):
            arr = np.asarray(a.f if a.name == "value_float" else list(a.floats), np.float16)
            del n.attribute[k]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
            return


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from static inference on a weightless copy."""

    try:
        # check_type=True also infers through ops defined by a function body (GroupNormalization-21)
        inferred = infer_types(without_data(model), check_type=True, data_prop=False,
                               errors="raise")
    except Exception as exc:  # an invalid graph: say so in one line
        raise UserError(f"cannot infer tensor types for the float16 conversion: {first_line(exc)}") from exc
    types = {name: tp.tensor_type.elem_type for name, tp in inferred.items()}
    g = model.graph
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[n.output[0]] = F
    return types
