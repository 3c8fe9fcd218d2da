"""Exact per-sample sizes of tensors, and folding of static shape arithmetic.

Static shape inference is not enough: timm's ``tf_`` EfficientNets pad "same" at run time
(Shape -> Gather -> arithmetic -> Pad), and ``onnx.shape_inference`` leaves every spatial
dimension after the stem unknown. So:

1. :func:`fold_shape_arithmetic` evaluates the shape-arithmetic tensors that feed data ops
   (Pad's pads, Reshape's shape, ...) at batch sizes 1 and 2: with ``onnx.reference`` on the
   arithmetic alone, alternating with static inference on a weightless copy, and, only for
   what that cannot size, from real runs with those tensors as extra outputs. A value equal at
   both batch sizes is a constant for this input size and is folded into an initializer; the
   Shape nodes behind it disappear. A value that changes with the batch size (it reads the
   batch dimension) is kept, and remains a path in the cut analysis.
2. :func:`tensor_shapes` then asks static inference for the sizes (now it knows them), and
   records the rest from one run per batch size. No cut point is ever reported without its
   true size.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dsc_export.errors import UserError
from dsc_export.graph.model import (
    SHAPE_OPS,
    data_dependent,
    dataflow,
    empty_like,
    outer_scope_inputs,
)

PROBE_BATCHES = (1, 2)
TWO_GB = 2**31 - 2**20  # protobuf's limit, with a margin


def np_dtype_name(elem_type: int) -> str:
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
    fb = fixed_batch(model)
    return (fb,) if fb else PROBE_BATCHES


def run_with_outputs(
    model: onnx.ModelProto, names: list[str], batches: tuple[int, ...], seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` once per batch size on random inputs, returning the named tensors.

    The tensors are added as graph outputs to a copy of the model; models over 2 GB are run
    from a temporary folder with external data.
    """
    from dsc_export.backends.onnxruntime import make_session, random_inputs

    graph_outputs = model.graph.output
    n_before = len(graph_outputs)
    existing = {o.name for o in graph_outputs}
    for name in names:
        if name not in existing:
            graph_outputs.append(onnx.ValueInfoProto(name=name))
    rng = np.random.default_rng(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="dsc-probe-") as tmp:
        try:
            if model.ByteSize() > TWO_GB:
                path = Path(tmp) / "probe.onnx"
                onnx.save(model, os.fspath(path), save_as_external_data=True,
                          location="probe.onnx.data", convert_attribute=False)
                onnx.load_external_data_for_model(model, tmp)  # onnx.save moved the data out
                sess = make_session(path, optimization="none", arena=False)
            else:
                data = model.SerializeToString()
                sess = make_session(data, optimization="none", arena=False)
                del data
        finally:
            while len(graph_outputs) > n_before:
                graph_outputs.pop()
        for b in batches:
            feeds = random_inputs(sess, b, rng)
            values = sess.run(names, feeds) if names else []
            results.append(dict(zip(names, values)))
    return results


@dataclass
class FoldReport:
    """What :func:`fold_shape_arithmetic` did."""

    folded: list[str] = field(default_factory=list)  # tensors replaced by constants
    batch_dependent: list[str] = field(default_factory=list)  # kept: they read the batch size
    removed_nodes: int = 0
    probed: int = 0  # frontier tensors that needed a real run (static evaluation could not size them)


def fold_shape_arithmetic(model: onnx.ModelProto, inplace: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """Replace shape arithmetic that is constant for the model's input size by initializers.

    Args:
        model: the model (modified only with ``inplace``, which saves a copy of the weights).

    Returns:
        ``(folded model, report)``. The folded model computes the same outputs for inputs of
        the model's own size (any batch size).
    """
    df = dataflow(model.graph)
    values, shapes = data_dependent(df)
    report = FoldReport()
    if not shapes:
        return model, report
    frontier = []
    for n in df.nodes:
        if any(o in values for o in n.outputs):
            frontier.extend(i for i in n.inputs if i in shapes)
    frontier.extend(o for o in df.outputs if o in shapes)
    frontier = list(dict.fromkeys(frontier))
    if not frontier:
        return model, report
    batches = probe_batches(model)
    constant, dependent, unresolved = _evaluate_statically(model, frontier, batches)
    if unresolved:  # shapes static inference cannot size: record them from real runs
        runs = run_with_outputs(model, unresolved, batches)
        for name in unresolved:
            vals = [r[name] for r in runs]
            if _all_equal(vals):
                constant[name] = vals[0]
            else:
                dependent.append(name)
    report.batch_dependent = [t for t in frontier if t in set(dependent)]
    report.probed = len(unresolved)
    if not constant:
        return model, report
    if inplace:
        folded = model
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    _fold_into(folded, constant)
    report.folded = [t for t in frontier if t in constant]
    report.removed_nodes = remove_dead_nodes(folded)
    return folded, report


def _all_equal(values: list[np.ndarray]) -> bool:
    """True when a value is the same at every probe batch size (so a constant)."""
    return all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values[1:])


def _evaluate_statically(model: onnx.ModelProto, frontier: list[str], batches: tuple[int, ...]):
    """Evaluate shape-arithmetic tensors without running the network.

    Repeats: static shape inference on a weightless copy; every frontier tensor whose Shape/Size
    sources now have known shapes is evaluated with ``onnx.reference`` on just its arithmetic
    (the sources fed as zero tensors of that shape, the batch dimension set to each probe batch
    size); constants are folded into the copy so the next inference sees further. Stops when
    nothing new resolves.

    Returns:
        ``(constant values, batch-dependent names, unresolved names)``.
    """
    from onnx.reference import ReferenceEvaluator

    light = _without_data(model)
    constant: dict[str, np.ndarray] = {}
    dependent: list[str] = []
    pending = list(frontier)
    for _ in range(len(frontier) + 1):
        if not pending:
            break
        shapes = static_shapes(light)
        g = light.graph
        producer = {o: n for n in g.node for o in n.output if o}
        inits = {t.name: t for t in g.initializer}
        progress = []
        for t in pending:
            plan = _arith_subgraph(t, producer, inits, shapes)
            if plan is None:
                continue
            nodes, sources, needed_inits = plan
            values = []
            try:
                for b in batches:
                    feeds = {}
                    sub_inputs = []
                    for src in sources:
                        dims, dtype = shapes[src]
                        shp = [b if not isinstance(d, int) else d for d in dims]
                        feeds[src] = np.zeros(shp, dtype=dtype)
                        sub_inputs.append(helper.make_tensor_value_info(src, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shp))
                    sub = helper.make_model(
                        helper.make_graph(nodes, "arith", sub_inputs,
                                          [onnx.ValueInfoProto(name=t)], [inits[i] for i in needed_inits]),
                        opset_imports=list(model.opset_import), ir_version=model.ir_version,
                    )
                    values.append(np.asarray(ReferenceEvaluator(sub).run(None, feeds)[0]))
            except Exception:
                continue  # an op the reference evaluator lacks: left to a real run
            if _all_equal(values):
                constant[t] = values[0]
                _fold_into(light, {t: values[0]})
            else:
                dependent.append(t)
            progress.append(t)
        if not progress:
            break
        pending = [t for t in pending if t not in progress]
    return constant, dependent, pending


def _arith_subgraph(target, producer, inits, shapes):
    """Nodes computing ``target`` from Shape/Size sources of known shape, or None."""
    nodes, sources, needed, seen = [], [], [], set()
    stack = [target]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inits:
            needed.append(t)
            continue
        node = producer.get(t)
        if node is None:
            return None  # a graph input read directly: not pure shape arithmetic
        nodes.append(node)
        if node.op_type in SHAPE_OPS:
            src = node.input[0]
            dims, _ = shapes.get(src, (None, None))
            # every dimension known; only axis 0 (the batch) may be symbolic
            if dims is None or any(d is None for d in dims) or any(not isinstance(d, int) for d in dims[1:]):
                return None
            if src not in sources:
                sources.append(src)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        stack.extend(i for i in node.input if i)
    return _topo(nodes), sources, needed


def _topo(nodes):
    produced = {o for n in nodes for o in n.output}
    done, out, remaining = set(), [], list(nodes)
    while remaining:
        rest = []
        for n in remaining:
            if all(i in done or i not in produced for i in n.input):
                out.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(remaining):
            return nodes
        remaining = rest
    return out


def _fold_into(model: onnx.ModelProto, constant: dict[str, np.ndarray]) -> None:
    g = model.graph
    for node in g.node:
        for k, o in enumerate(node.output):
            if o in constant:
                node.output[k] = f"{o}__dsc_unfolded"
    for name, value in constant.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes (and initializers) no graph output depends on; returns the node count removed."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = set()
    for k in reversed(range(len(g.node))):
        node = g.node[k]
        if any(o in needed for o in node.output if o):
            keep.add(k)
            needed.update(i for i in node.input if i)
            needed.update(outer_scope_inputs(node))
    removed = len(g.node) - len(keep)
    for k in reversed(range(len(g.node))):
        if k not in keep:
            del g.node[k]
    dropped = set()
    for k in reversed(range(len(g.initializer))):
        if g.initializer[k].name not in needed:
            dropped.add(g.initializer[k].name)
            del g.initializer[k]
    for k in reversed(range(len(g.input))):
        if g.input[k].name in dropped:  # old IR lists initializers as inputs too
            del g.input[k]
    produced = {o for n in g.node for o in n.output}
    for k in reversed(range(len(g.value_info))):
        if g.value_info[k].name not in produced:
            del g.value_info[k]
    return removed


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep their dims but not their data (for inference)."""
    stripped = empty_like(model, model.graph.name)
    g = stripped.graph
    src = model.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        c = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        if np.prod(t.dims, dtype=np.int64) <= 1024:
            c.CopyFrom(t)
        g.initializer.append(c)
    return stripped


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[list, str]]:
    """Shapes (with symbolic dims as strings, unknown as None) and dtypes from static inference."""
    return _infer(_without_data(model))


def _infer(light: onnx.ModelProto) -> dict[str, tuple[list, str]]:
    """:func:`static_shapes` of a model whose large initializers hold no data already."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    out: dict[str, tuple[list, str]] = {}
    names: dict[int, str] = {}  # elem_type -> dtype name (np.dtype(...).name is slow)

    def dtype_name(elem_type: int) -> str:
        if elem_type not in names:
            names[elem_type] = np_dtype_name(elem_type)
        return names[elem_type]

    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
            continue
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (dims, dtype_name(tt.elem_type))
    for t in g.initializer:
        out[t.name] = (list(t.dims), dtype_name(t.data_type))
    return out


def tensor_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[list[int], str]]:
    """Per-sample shape (batch dimension dropped) and dtype of each named tensor.

    Static inference first; tensors it cannot size are recorded from one run per batch size.

    Raises:
        UserError: a tensor whose leading dimension is not the batch dimension.
    """
    static = static_shapes(model)
    fb = fixed_batch(model)
    result: dict[str, tuple[list[int], str]] = {}
    unknown = []
    for name in names:
        dims, dtype = static.get(name, (None, None))
        if dims and dtype and all(isinstance(d, int) and d > 0 for d in dims[1:]) and (
            not isinstance(dims[0], int) or (fb and dims[0] == fb)
        ):
            result[name] = ([int(d) for d in dims[1:]], dtype)
        else:
            unknown.append(name)
    if unknown:
        batches = probe_batches(model)
        runs = run_with_outputs(model, unknown, batches)
        for name in unknown:
            arrs = [r[name] for r in runs]
            lead_ok = all(a.ndim >= 1 and a.shape[0] == b for a, b in zip(arrs, batches))
            if not lead_ok or any(a.shape[1:] != arrs[0].shape[1:] for a in arrs):
                raise UserError(
                    f"tensor '{name}' does not have the batch as its leading dimension "
                    f"(shapes {[list(a.shape) for a in arrs]} at batch sizes {list(batches)})"
                )
            result[name] = (list(arrs[0].shape[1:]), arrs[0].dtype.name)
    return result

