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

from dsc_export.errors import ModelRunError, UserError
from dsc_export.graph.model import (
    BATCH_READ,
    SHAPE_OPS,
    data_dependent,
    dataflow,
    empty_like,
    is_batch_read,
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
    model: onnx.ModelProto, names: list[str], batches: tuple[int, ...], seed: int = 0, inputs=None,
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` once per batch size, returning the named tensors.

    The tensors are added as graph outputs to a copy of the model; models over 2 GB are run
    from a temporary folder with external data.

    Args:
        model: the model.
        names: tensors to return.
        batches: batch sizes to run at.
        seed: seed of the random inputs (when ``inputs`` is None).
        inputs: sample inputs (an object with ``feeds(batch, index)``, e.g.
            :class:`dsc_export.inputs.SampleInputs`); None: random inputs.

    Raises:
        ModelRunError: onnxruntime fails at one of the batch sizes (its ``batch`` says which).
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
            feeds = random_inputs(sess, b, rng) if inputs is None else inputs.feeds(b)
            try:
                values = sess.run(names, feeds) if names else []
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise ModelRunError("the model", b, exc) from exc
            results.append(dict(zip(names, values)))
    return results


@dataclass
class FoldReport:
    """What :func:`fold_shape_arithmetic` did."""

    folded: list[str] = field(default_factory=list)  # tensors replaced by constants
    # Shape/Size reads whose dimensions are constants or the batch size: rewritten to read the
    # batch size alone (any batched tensor has it), so they are no path around a cut point
    batch_reads: list[str] = field(default_factory=list)
    # kept: they change with the batch size otherwise than as the batch dimension itself
    batch_dependent: list[str] = field(default_factory=list)
    removed_nodes: int = 0
    probed: int = 0  # frontier tensors that needed a real run (static evaluation could not size them)


def fold_shape_arithmetic(model: onnx.ModelProto, inplace: bool = False, inputs=None) -> tuple[onnx.ModelProto, FoldReport]:
    """Replace shape arithmetic that is constant for the model's input size by initializers,
    and reads of the batch size by one read of the model input's batch dimension.

    Args:
        model: the model (modified only with ``inplace``, which saves a copy of the weights).

    Returns:
        ``(folded model, report)``. The folded model computes the same outputs for inputs of
        the model's own size (any batch size). Values of data-dependent shape (behind NonZero,
        NonMaxSuppression, a Reshape to a computed shape, ...) are never folded.
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
    tainted = shape_tainted(df, values)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    constant, dependent, unresolved = _evaluate_statically(model, frontier, batches, tainted)
    # data-dependent shapes can be equal at two probes by chance: never fold them from a run
    dependent += [t for t in unresolved if _shape_sources(t, producer) & tainted]
    unresolved = [t for t in unresolved if t not in set(dependent)]
    if unresolved:  # shapes static inference cannot size: record them from real runs
        runs = run_with_outputs(model, unresolved, batches, inputs=inputs)
        for name in unresolved:
            vals = [r[name] for r in runs]
            if _all_equal(vals):
                constant[name] = vals[0]
            else:
                dependent.append(name)
    report.probed = len(unresolved)
    if inplace:
        folded = model
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    if constant:
        _fold_into(folded, constant)
        report.folded = [t for t in frontier if t in constant]
        report.removed_nodes = remove_dead_nodes(folded)
    if dependent:
        report.batch_reads = rewrite_batch_reads(folded, batches, tainted, inputs)
        if report.batch_reads:
            report.removed_nodes += remove_dead_nodes(folded)
        _, still = data_dependent(dataflow(folded.graph))
        report.batch_dependent = [t for t in frontier if t in set(dependent) and t in still]
    return folded, report


# Ops whose output shape depends on the values (not only the shapes) of their inputs, by input
# position (None: every input); a Shape read behind them is never constant.
_VALUE_SHAPED = {
    "NonZero": None, "NonMaxSuppression": None, "Unique": None, "Compress": None, "Loop": None,
    "Scan": None, "If": None, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "ConstantOfShape": {0},
    "Slice": {1, 2, 3, 4}, "Pad": {1}, "Resize": {1, 2, 3}, "Upsample": {1}, "Range": {0, 1, 2},
    "TopK": {1}, "OneHot": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "CenterCropPad": {1},
}


def shape_tainted(df, values: set[str]) -> set[str]:
    """Tensors whose *shape* may depend on the input's values (data-dependent shapes).

    A tensor is tainted when an op of :data:`_VALUE_SHAPED` sizes it from a value that depends
    on the inputs' values, and everything computed from a tainted tensor is tainted (an
    over-approximation: folding is skipped, never wrongly done).
    """
    from dsc_export.graph.model import topological_nodes

    tainted: set[str] = set()
    for n in topological_nodes(df):
        ins = n.inputs
        pos = _VALUE_SHAPED.get(n.op_type, set())
        if any(i in tainted for i in ins) or (
            n.op_type in _VALUE_SHAPED and any(i in values for k, i in enumerate(ins) if pos is None or k in pos)
        ):
            tainted.update(o for o in n.outputs if o)
    return tainted


def _shape_sources(target: str, producer: dict) -> set[str]:
    """The tensors whose shapes ``target`` is computed from (inputs of the Shape/Size nodes behind it)."""
    sources, seen, stack = set(), set(), [target]
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        if node.op_type in SHAPE_OPS:
            sources.add(node.input[0])
        else:
            stack.extend(i for i in node.input if i)
    return sources


def rewrite_batch_reads(model: onnx.ModelProto, batches: tuple[int, ...], tainted: set[str] = frozenset(),
                        inputs=None) -> list[str]:
    """Rewrite every Shape/Size read whose dimensions are constants or the batch size, in place.

    ``Shape(X)`` with X ``[N, 3, 224, 224]`` becomes ``Concat(batch, [3, 224, 224])``, where
    ``batch`` is one read of the model input's batch dimension (a Shape node named
    :data:`dsc_export.graph.model.BATCH_READ`, then Gather of axis 0); ``Size(X)`` becomes
    ``batch * 150528``. The data-flow view does not count that read as an edge, so a model whose
    blocks read the batch size from the input (torch's dynamo exporter, ``x.view(x.size(0), -1)``)
    keeps its cut points; each tail reads the batch size from its cut tensor instead.

    The values are taken at the probe batch sizes (statically where inference knows the source's
    dimensions, else from one run): a dimension equal at every probe is a constant, one equal to
    the batch size at every probe is the batch; a read with any other dimension is kept as it is.

    Returns:
        The names of the rewritten nodes.
    """
    g = model.graph
    df = dataflow(g)
    values, shapes = data_dependent(df)
    sig = input_signature(model)
    if len(sig) != 1 or not sig[0][1] or isinstance(sig[0][1][0], int):
        return []  # several inputs, or a fixed batch (then every shape is constant)
    input_name, dims0, _ = sig[0]
    batch_param = dims0[0]
    read_ids = [k for k, n in enumerate(g.node) if n.op_type in SHAPE_OPS and not is_batch_read(n)
                and n.output[0] in shapes and n.input[0] not in tainted]
    reads = [g.node[k] for k in read_ids]
    if not reads:
        return []
    static = static_shapes(model)
    at: dict[str, list[np.ndarray]] = {}
    probe = []
    for n in reads:
        dims, _ = static.get(n.input[0], (None, None))
        if dims is not None and all((isinstance(d, int) and d > 0) or d == batch_param for d in dims):
            full = [[b if d == batch_param else d for d in dims] for b in batches]
            if n.op_type == "Size":
                at[n.output[0]] = [np.array(np.prod(f, dtype=np.int64)) for f in full]
            else:
                attrs = {a.name: a.i for a in n.attribute}
                sl = slice(attrs.get("start", 0), attrs.get("end", None))
                at[n.output[0]] = [np.array(f[sl], dtype=np.int64) for f in full]
        else:
            probe.append(n.output[0])
    if probe:
        runs = run_with_outputs(model, probe, batches, inputs=inputs)
        for name in probe:
            at[name] = [np.asarray(r[name]) for r in runs]

    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    base = next(b for b in (f"{BATCH_READ}#{k}" if k else BATCH_READ for k in range(len(g.node) + 1))
                if f"{b}/shape" not in taken)  # a model cut by dsc-export before has one already
    axis0 = f"{base}/axis0"
    batch_vec, batch_scalar = f"{base}/batch", f"{base}/batch_scalar"
    replace: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    need_scalar = False
    for k, n in zip(read_ids, reads):
        vals = at[n.output[0]]
        out = n.output[0]
        tag = f"{base}/{len(replace)}"
        if n.op_type == "Size":
            per = [int(v) // b if b and int(v) % b == 0 else None for v, b in zip(vals, batches)]
            if vals[0].ndim != 0 or None in per or len(set(per)) != 1:
                continue
            c = f"{tag}/per_sample"
            new_inits.append(numpy_helper.from_array(np.array(per[0], dtype=vals[0].dtype), c))
            replace[k] = [helper.make_node("Mul", [batch_scalar, c], [out], name=tag)]
            need_scalar = True
            continue
        pieces = _batch_pieces(vals, batches)
        if pieces is None:
            continue
        ins = []
        for j, (kind, seg) in enumerate(pieces):
            if kind == "batch":
                ins.append(batch_vec)
            else:
                c = f"{tag}/c{j}"
                new_inits.append(numpy_helper.from_array(np.array(seg, dtype=vals[0].dtype), c))
                ins.append(c)
        if vals[0].dtype != np.int64:
            return []  # Shape and Size are int64 by the spec; anything else is not ours to touch
        replace[k] = [helper.make_node("Concat", ins, [out], axis=0, name=tag) if len(ins) > 1
                      else helper.make_node("Identity", ins, [out], name=tag)]
    if not replace:
        return []
    head = [helper.make_node("Shape", [input_name], [f"{base}/shape"], name=base),
            helper.make_node("Gather", [f"{base}/shape", axis0], [batch_vec], axis=0, name=f"{base}/gather")]
    new_inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axis0))
    if need_scalar:
        if _opset(model) >= 13:  # axes became an input
            head.append(helper.make_node("Squeeze", [batch_vec, axis0], [batch_scalar], name=f"{base}/squeeze"))
        else:
            head.append(helper.make_node("Squeeze", [batch_vec], [batch_scalar], axes=[0], name=f"{base}/squeeze"))
    rewritten = [g.node[k].name or g.node[k].output[0] for k in replace]
    nodes = head + [m for k, n in enumerate(g.node) for m in (replace.get(k) or [n])]
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
    g.initializer.extend(new_inits)
    return rewritten


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _batch_pieces(vals: list[np.ndarray], batches: tuple[int, ...]):
    """Split a shape vector, taken at each probe batch size, into runs of constants and single
    batch entries: ``[("const", [3]), ("batch", None), ("const", [7, 7])]``; None when an entry
    is neither, or when nothing reads the batch."""
    if any(v.ndim != 1 or v.shape != vals[0].shape for v in vals):
        return None
    pieces: list[tuple[str, list | None]] = []
    has_batch = False
    for j in range(vals[0].shape[0]):
        col = [int(v[j]) for v in vals]
        if all(c == col[0] for c in col):
            if pieces and pieces[-1][0] == "const":
                pieces[-1][1].append(col[0])
            else:
                pieces.append(("const", [col[0]]))
        elif col == list(batches):
            pieces.append(("batch", None))
            has_batch = True
        else:
            return None
    return pieces if has_batch else None


def _all_equal(values: list[np.ndarray]) -> bool:
    """True when a value is the same at every probe batch size (so a constant)."""
    return all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values[1:])


def _evaluate_statically(model: onnx.ModelProto, frontier: list[str], batches: tuple[int, ...],
                         tainted: set[str] = frozenset()):
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
            plan = _arith_subgraph(t, producer, inits, shapes, tainted)
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


def _arith_subgraph(target, producer, inits, shapes, tainted=frozenset()):
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
            if src in tainted:
                return None  # a data-dependent shape: never evaluated from zeros
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
    light = _without_data(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    out: dict[str, tuple[list, str]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
            continue
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (dims, np_dtype_name(tt.elem_type))
    for t in g.initializer:
        out[t.name] = (list(t.dims), np_dtype_name(t.data_type))
    return out


def tensor_shapes(model: onnx.ModelProto, names: list[str], unbatched: dict[str, list] | None = None,
                  inputs=None) -> dict[str, tuple[list[int], str]]:
    """Per-sample shape (batch dimension dropped) and dtype of each named tensor.

    Static inference first; tensors it cannot size are recorded from one run per batch size.

    Args:
        model: the (folded) model.
        names: tensors to size.
        unbatched: when given, tensors whose leading dimension is not the batch are left out of
            the result and recorded here (name -> their shapes at the probe batch sizes) instead
            of raising.
        inputs: sample inputs for the runs (see :func:`run_with_outputs`).

    Raises:
        UserError: a tensor whose leading dimension is not the batch dimension (without
            ``unbatched``).
    """
    static = static_shapes(model)
    fb = fixed_batch(model)
    batch_param = None if fb else batch_dim(model)
    result: dict[str, tuple[list[int], str]] = {}
    unknown = []
    for name in names:
        dims, dtype = static.get(name, (None, None))
        if dims and dtype and all(isinstance(d, int) and d > 0 for d in dims[1:]) and (
            (fb and dims[0] == fb) or (batch_param is not None and dims[0] == batch_param)
        ):
            result[name] = ([int(d) for d in dims[1:]], dtype)
        else:
            unknown.append(name)
    if unknown:
        batches = probe_batches(model)
        runs = run_with_outputs(model, unknown, batches, inputs=inputs)
        for name in unknown:
            arrs = [r[name] for r in runs]
            lead_ok = all(a.ndim >= 1 and a.shape[0] == b for a, b in zip(arrs, batches))
            if not lead_ok or any(a.shape[1:] != arrs[0].shape[1:] for a in arrs):
                shapes = [list(a.shape) for a in arrs]
                if unbatched is not None:
                    unbatched[name] = shapes
                    continue
                raise UserError(
                    f"tensor '{name}' does not have the batch as its leading dimension "
                    f"(shapes {shapes} at batch sizes {list(batches)})"
                )
            result[name] = (list(arrs[0].shape[1:]), arrs[0].dtype.name)
    return result
