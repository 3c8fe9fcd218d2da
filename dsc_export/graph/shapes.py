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
    Dataflow,
    data_dependent,
    dataflow,
    is_batch_read,
    outer_scope_inputs,
    topological_nodes,
    without_data,
)
from dsc_export.ort import make_session, random_inputs

PROBE_BATCHES = (1, 2)
TWO_GB = 2**31 - 2**20  # protobuf's limit, with a margin


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


def run_with_outputs(
    model: onnx.ModelProto, names: list[str], batches: tuple[int, ...], *, seed: int = 0, inputs=None,
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
    # tensor shapes at each probe batch size as the evaluation knew them (for tensor_shapes)
    views: list | None = field(default=None, repr=False, compare=False)


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
    constant, dependent, unresolved, views = _evaluate_statically(model, frontier, batches)
    report.views = views
    # a data-dependent shape is never a constant, whatever inference said or two probe runs
    # happened to give
    producer = {o: n for n in model.graph.node for o in n.output if o}
    data_shaped = {t for t in list(constant) + unresolved if tainted & set(shape_sources(t, producer))}
    dependent += [t for t in list(constant) + unresolved if t in data_shaped]
    constant = {t: v for t, v in constant.items() if t not in data_shaped}
    unresolved = [t for t in unresolved if t not in data_shaped]
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
        report.batch_reads = rewrite_batch_reads(folded, batches, tainted=tainted, inputs=inputs, views=views)
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
    tainted: set[str] = set()
    for n in topological_nodes(df):
        ins = n.inputs
        pos = _VALUE_SHAPED.get(n.op_type, set())
        if any(i in tainted for i in ins) or (
            n.op_type in _VALUE_SHAPED and any(i in values for k, i in enumerate(ins) if pos is None or k in pos)
        ):
            tainted.update(o for o in n.outputs if o)
    return tainted


def shape_sources(target: str, producer: dict[str, onnx.NodeProto]) -> list[str]:
    """The tensors whose shapes ``target`` is computed from: the inputs of the Shape/Size nodes
    behind it (batch-size reads left out: they read no particular tensor), in the order found.

    Args:
        target: a shape-arithmetic tensor.
        producer: tensor name -> the node that produces it.
    """
    sources, seen, stack = [], set(), [target]
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        if is_batch_read(node):
            continue
        if node.op_type in SHAPE_OPS:
            sources.append(node.input[0])
        else:
            stack.extend(i for i in node.input if i)
    return list(dict.fromkeys(sources))


def rewrite_batch_reads(model: onnx.ModelProto, batches: tuple[int, ...], *, tainted: set[str] = frozenset(),
                        inputs=None, views: list | None = None) -> list[str]:
    """Rewrite every Shape/Size read whose dimensions are constants or the batch size, in place.

    ``Shape(X)`` with X ``[N, 3, 224, 224]`` becomes ``Concat(batch, [3, 224, 224])``, where
    ``batch`` is one read of the model input's batch dimension (a Shape node named
    :data:`dsc_export.graph.model.BATCH_READ`, then Gather of axis 0); ``Size(X)`` becomes
    ``batch * 150528``. The data-flow view does not count that read as an edge, so a model whose
    blocks read the batch size from the input (torch's dynamo exporter, ``x.view(x.size(0), -1)``)
    keeps its cut points; each tail reads the batch size from its cut tensor instead.

    The values are taken at the probe batch sizes (the sources' shapes with the shape arithmetic
    evaluated at each, :func:`_concrete_shapes`, else from one run): a dimension equal at every probe is a constant, one equal to
    the batch size at every probe is the batch; a read with any other dimension is kept as it is.

    Returns:
        The names of the rewritten nodes.
    """
    g = model.graph
    _, shapes = data_dependent(dataflow(g))
    sig = input_signature(model)
    if len(sig) != 1 or not sig[0][1] or isinstance(sig[0][1][0], int):
        return []  # several inputs, or a fixed batch (then every shape is constant)
    input_name = sig[0][0]
    read_ids = [k for k, n in enumerate(g.node) if n.op_type in SHAPE_OPS and not is_batch_read(n)
                and n.output[0] in shapes and n.input[0] not in tainted]
    reads = [g.node[k] for k in read_ids]
    if not reads:
        return []
    at: dict[str, list[np.ndarray]] = {}
    probe = []
    # the sources' shapes at each probe batch size, with the shape arithmetic evaluated there
    sources = list(dict.fromkeys(n.input[0] for n in reads))
    if views is None or not all(v.known(x) for v in views for x in sources):
        views = _concrete_shapes(model, batches, sources)
    for n in reads:
        full = [v.get(n.input[0], (None, None))[0] for v in views]
        if any(f is None or not all(isinstance(d, int) and d >= 0 for d in f) for f in full):
            probe.append(n.output[0])
        elif n.op_type == "Size":
            at[n.output[0]] = [np.array(np.prod(f, dtype=np.int64)) for f in full]
        else:
            attrs = {a.name: a.i for a in n.attribute}
            sl = slice(attrs.get("start", 0), attrs.get("end", None))
            at[n.output[0]] = [np.array(f[sl], dtype=np.int64) for f in full]
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


def _evaluate_statically(model: onnx.ModelProto, frontier: list[str], batches: tuple[int, ...]):
    """Evaluate shape-arithmetic tensors without running the network.

    See :func:`_resolve`; a value equal at every probe batch size is a constant, one that
    changes reads the batch size.

    Returns:
        ``(constant values, batch-dependent names, unresolved names, per-batch shape views)``;
        the views (None when nothing was walked) hold the tensor shapes the walk knew at each
        probe batch size, for :func:`rewrite_batch_reads` and :func:`tensor_shapes` to reuse.
    """
    values, pending, _, types = _resolve(model, frontier, batches)
    constant: dict[str, np.ndarray] = {}
    dependent: list[str] = []
    for t, per_batch in values.items():
        if _all_equal(per_batch):
            constant[t] = per_batch[0]
        else:
            dependent.append(t)
    return constant, dependent, pending, ([_ShapeView(t) for t in types] if types else None)


def _with_batch(light: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``light`` whose data inputs have ``batch`` on a symbolic axis 0, as a run at
    that batch size feeds them; value_info and outputs naming the same symbol get it too."""
    m = onnx.ModelProto()
    m.CopyFrom(light)
    g = m.graph
    inits = {t.name for t in g.initializer}
    symbols = set()
    for i in g.input:
        tt = i.type.tensor_type
        if i.name in inits or not tt.HasField("shape") or not tt.shape.dim:
            continue
        d = tt.shape.dim[0]
        if d.HasField("dim_value") and d.dim_value > 0:
            continue
        if d.HasField("dim_param") and d.dim_param:
            symbols.add(d.dim_param)
        d.dim_value = batch
    if symbols:
        for vi in list(g.value_info) + list(g.output):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in symbols:
                    d.dim_value = batch
    return m


def _resolve(model: onnx.ModelProto, frontier: list[str], batches: tuple[int, ...],
             df: Dataflow | None = None, arith: set[str] | None = None):
    """Values of shape-arithmetic tensors at each probe batch size, without running the network.

    One weightless copy of the model per probe batch size, its input's batch dimension set to
    that size. Repeats: static shape inference on each copy, then one walk over the nodes in
    topological order that evaluates each pending tensor as soon as its Shape/Size sources have
    known shapes (``onnx.reference`` on just its arithmetic, the sources fed as zero tensors of
    that shape) and infers, node by node, the shapes that whole-graph inference left unknown
    (past a Reshape or Pad whose target is such a value); the values are folded into that batch
    size's copy, so the next inference sees them. Stops when nothing new resolves.

    Args:
        df, arith: ``dataflow(model.graph)`` and the shapes half of its :func:`data_dependent`,
            where the caller has them already.

    Returns:
        ``(values, unresolved names, copies, types)``: tensor -> its value at each of
        ``batches``, in the order resolved; the tensors left to a real run; the per-batch-size
        weightless copies with every resolved value folded in; per batch size, the tensor types
        the last walk knew (every tensor it could size; None when there was nothing to walk).
    """
    light = without_data(model)
    copies = [_with_batch(light, b) for b in batches]
    if df is None or arith is None:
        df = dataflow(model.graph)
        _, arith = data_dependent(df)
    arithmetic = _Arithmetic.build(light, frontier, arith)
    del light
    memos: list[dict[str, np.ndarray]] = [{} for _ in batches]
    # node indices are the same in every copy (folding renames outputs, never moves nodes)
    nodes = model.graph.node
    order = [k for k in _node_order(df)
             if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in nodes[k].attribute)
             and not all(o in arith for o in nodes[k].output if o)]
    values: dict[str, list[np.ndarray]] = {}
    pending = list(frontier)
    types = None
    for _ in range(len(frontier) + 1):
        if not pending:
            break
        walks = [_walk(copy, order, pending, model, arithmetic, memo) for copy, memo in zip(copies, memos)]
        types = [w[1] for w in walks]
        progress = {t: [w[0][t] for w in walks] for t in pending if all(t in w[0] for w in walks)}
        if not progress:
            break
        for k, copy in enumerate(copies):
            _fold_into(copy, {t: v[k] for t, v in progress.items()})
        values.update(progress)
        pending = [t for t in pending if t not in progress]
    return values, pending, copies, types


def _node_order(df: Dataflow) -> list[int]:
    """Node indices in a topological order: the graph's own when it is sorted (checked in one
    pass), else :func:`topological_nodes`'."""
    defined = set(df.inputs) | df.constants
    for n in df.nodes:
        if not all(i in defined for i in n.inputs):
            return [m.index for m in topological_nodes(df)]
        defined.update(n.outputs)
    return [n.index for n in df.nodes]


def _walk(copy: onnx.ModelProto, order: list[int], pending: list[str], model: onnx.ModelProto,
          arithmetic: _Arithmetic | None, memo: dict[str, np.ndarray]):
    """One pass of :func:`_resolve` over one copy: the pending tensors it can evaluate (name ->
    value), and the tensor types known at the end (whole-graph inference, then node by node).

    ``arithmetic`` evaluates them (``memo`` holds the values computed at this copy's batch
    size); without it (``onnx.reference`` cannot load the arithmetic as one graph), each is
    evaluated on its own by :func:`_evaluate_one`.
    """
    g = copy.graph
    types = _inferred_types(copy)
    shapes = _ShapeView(types)
    known = {name for name, tp in types.items() if _fully_known(tp)}
    producer = {o: n for n in g.node for o in n.output if o} if arithmetic is None else {}
    inits = {t.name: t for t in g.initializer}
    data = {name: t for name, t in inits.items() if t.raw_data or not np.prod(t.dims, dtype=np.int64) or _has_values(t)}
    for node in g.node:  # inference reads constants' values (a Reshape's target, a Pad's pads)
        if node.op_type == "Constant" and not node.domain and len(node.output) == 1:
            value = _constant_value(node)
            if value is not None:
                data[node.output[0]] = value
    todo = set(pending)
    found: dict[str, np.ndarray] = {}
    failed: set[str] = set()

    def evaluate(t: str) -> None:
        if arithmetic is not None:
            value = arithmetic.value(t, shapes, memo, failed)
        else:
            value = _evaluate_one(t, producer, inits, shapes, model)
        todo.discard(t)
        if value is None:
            return
        found[t] = value
        tensor = numpy_helper.from_array(value, t)
        inits[t] = data[t] = tensor  # later arithmetic reads the value, not its producer
        types[t] = helper.make_tensor_type_proto(tensor.data_type, list(value.shape))
        known.add(t)

    schemas: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}
    versions = {o.domain: o.version for o in copy.opset_import}
    opsets = list(copy.opset_import)
    nodes = g.node
    for k in order:
        node = nodes[k]
        ins = [i for i in node.input if i]
        for i in ins:
            if i in todo:
                evaluate(i)
        if all(o in known for o in node.output if o) or not all(i in known for i in ins):
            continue
        key = (node.op_type, node.domain)
        if key not in schemas:
            try:
                schemas[key] = onnx.defs.get_schema(node.op_type, versions.get(node.domain or "", 1), node.domain)
            except Exception:
                schemas[key] = None
        if schemas[key] is None:
            continue
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schemas[key], node, {i: types[i] for i in ins},
                {i: data[i] for i in ins if i in data}, opset_imports=opsets, ir_version=copy.ir_version)
        except Exception:
            continue
        for o, tp in inferred.items():
            if _fully_known(tp):
                types[o] = tp
                known.add(o)
            elif o not in types:
                types[o] = tp
    for t in list(todo):  # tensors no data op reads (graph outputs)
        evaluate(t)
    return found, types


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node holds, or None (sparse or string forms)."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(a), dtype=dtype), node.output[0])
    return None


def _fully_known(tp: onnx.TypeProto) -> bool:
    tt = tp.tensor_type
    return (tp.HasField("tensor_type") and bool(tt.elem_type) and tt.HasField("shape")
            and all(d.HasField("dim_value") for d in tt.shape.dim))


def _has_values(t: onnx.TensorProto) -> bool:
    return bool(t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data or t.string_data)


def _inferred_types(light: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Tensor types of a weightless model after static inference (initializers included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    g = inferred.graph
    types = {vi.name: vi.type for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    for t in g.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types


class _ShapeView:
    """``name -> (dims, dtype name)`` over tensor types, computed on access (as :func:`static_shapes`)."""

    def __init__(self, types: dict[str, onnx.TypeProto]):
        self.types = types

    def get(self, name: str, default=None):
        """``(dims, dtype name)`` of tensor ``name`` (unknown dims None, symbolic ones by name),
        or ``default`` when it has no type."""
        tp = self.types.get(name)
        if tp is None:
            return default
        tt = tp.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return dims, np_dtype_name(tt.elem_type)

    def __getitem__(self, name: str):
        got = self.get(name)
        if got is None:
            raise KeyError(name)
        return got

    def known(self, name: str) -> bool:
        """Every dimension of ``name`` is a number."""
        tp = self.types.get(name)
        return tp is not None and _fully_known(tp)


class _Arithmetic:
    """Shape arithmetic evaluated lazily, tensor by tensor, with ``onnx.reference``'s operators.

    One :class:`onnx.reference.ReferenceEvaluator` is built over every node the frontier
    tensors' arithmetic needs (Shape/Size nodes included, their sources fed as zero tensors of
    the known shape, as :func:`_evaluate_one` does, or, where the source is itself shape
    arithmetic, as its value); its operator instances then run one at a time, in the order a
    value is asked for, and every intermediate value is kept, so no operator is loaded twice
    and no arithmetic is run twice at one batch size.
    """

    def __init__(self, nodes: dict[str, object], constants: dict[str, np.ndarray], computed: set[str]):
        self.nodes = nodes  # output name -> operator instance
        self.constants = constants
        self.computed = computed  # Shape/Size sources that are evaluated, not fed as zeros

    @classmethod
    def build(cls, light: onnx.ModelProto, frontier: list[str], arith: set[str]) -> _Arithmetic | None:
        """The evaluator for ``frontier``'s arithmetic in ``light`` (``arith``: every tensor that
        depends on the inputs through shapes only); None when ``onnx.reference`` cannot load it
        (an unknown operator: each tensor is then evaluated on its own)."""
        from onnx.reference import ReferenceEvaluator

        g = light.graph
        producer = {o: (k, n) for k, n in enumerate(g.node) for o in n.output if o}
        inits = {t.name: t for t in g.initializer}
        nodes, needed, seen = [], [], set()
        stack = list(frontier)
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in inits:
                t_init = inits[t]
                if t_init.raw_data or _has_values(t_init) or not np.prod(t_init.dims, dtype=np.int64):
                    needed.append(t_init)  # large weights kept no data: arithmetic reading them fails
                continue
            if t not in producer:
                continue
            k, node = producer[t]
            if k in seen:
                continue
            seen.add(k)
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                continue  # control flow: what reads it is left to a real run
            nodes.append((k, node))
            if node.op_type in SHAPE_OPS:
                if node.input[0] in arith:  # shape arithmetic: its value gives its shape
                    stack.append(node.input[0])
                continue  # otherwise its source is fed as zeros of its known shape
            stack.extend(i for i in node.input if i)
        if not nodes:
            return None
        # graph order: operators are only loaded here, and run in the order values are asked for
        nodes = [n for _, n in sorted(nodes, key=lambda kn: kn[0])]
        produced = {o for n in nodes for o in n.output}
        fed = [i for n in nodes for i in n.input if i and i not in produced and i not in inits]
        self_fed = {n.input[0] for n in nodes if n.op_type in SHAPE_OPS and n.input[0] in produced}
        sub = helper.make_model(
            helper.make_graph(nodes, "arith", [onnx.ValueInfoProto(name=i) for i in dict.fromkeys(fed)],
                              [onnx.ValueInfoProto(name=o) for o in produced], needed),
            opset_imports=list(light.opset_import), ir_version=light.ir_version, functions=list(light.functions),
        )
        try:
            ev = ReferenceEvaluator(sub)
            ops = list(ev.rt_nodes_)
            constants = dict(ev.rt_inits_)
        except Exception:
            return None
        if len(ops) != len(sub.graph.node) or any(op.need_context() for op in ops):
            return None
        return cls({o: op for op in ops for o in op.output if o}, constants, self_fed)

    def value(self, target: str, shapes, memo: dict[str, np.ndarray], failed: set[str]) -> np.ndarray | None:
        """``target``'s value at the batch size whose tensor ``shapes`` are given, or None
        (a source of unknown shape, a graph input read directly, or an operator error)."""
        stack = [target]
        while stack:
            t = stack[-1]
            if t in memo or t in self.constants:
                stack.pop()
                continue
            op = self.nodes.get(t)
            if op is None or t in failed:
                failed.update(stack)
                return None
            if op.op_type in SHAPE_OPS and op.input[0] in self.computed:
                src = op.input[0]
                if src not in memo and src not in self.constants:
                    stack.append(src)
                    continue
                inputs = [memo[src] if src in memo else self.constants[src]]
            elif op.op_type in SHAPE_OPS:
                dims, dtype = shapes.get(op.input[0], (None, None))
                if dims is None or not all(isinstance(d, int) for d in dims):
                    failed.update(stack)
                    return None
                try:
                    inputs = [np.zeros(dims, dtype=dtype)]
                except (TypeError, ValueError, MemoryError):  # a dtype numpy lacks
                    failed.update(stack)
                    return None
            else:
                missing = [i for i in op.input if i and i not in memo and i not in self.constants]
                if missing:
                    stack.extend(missing)
                    continue
                inputs = [memo[i] if i in memo else self.constants.get(i) for i in op.input]
            try:
                outputs = op.run(*inputs)
            except Exception:
                failed.update(stack)
                return None
            # an operator on constants alone gives the same value at every batch size
            into = self.constants if op.op_type not in SHAPE_OPS and all(
                not i or i in self.constants for i in op.input) else memo
            for name, v in zip(op.output, outputs):
                if name:
                    into[name] = v
            stack.pop()
        return np.asarray(memo[target] if target in memo else self.constants[target])


def _evaluate_one(target: str, producer, inits, shapes, model: onnx.ModelProto) -> np.ndarray | None:
    """``target``'s value from its arithmetic alone (sources of known shape fed as zeros), or
    None when it is not pure arithmetic over known shapes or ``onnx.reference`` cannot run it."""
    from onnx.reference import ReferenceEvaluator

    plan = _arith_subgraph(target, producer, inits, shapes)
    if plan is None:
        return None
    nodes, sources, needed_inits = plan
    try:
        feeds = {}
        sub_inputs = []
        for src in sources:
            dims, dtype = shapes[src]
            if not all(isinstance(d, int) for d in dims):
                return None  # a symbolic axis 0 that inference did not tie to the input's batch
            feeds[src] = np.zeros(dims, dtype=dtype)
            sub_inputs.append(helper.make_tensor_value_info(src, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims))
        sub = helper.make_model(
            helper.make_graph(nodes, "arith", sub_inputs,
                              [onnx.ValueInfoProto(name=target)], [inits[i] for i in needed_inits]),
            opset_imports=list(model.opset_import), ir_version=model.ir_version,
        )
        return np.asarray(ReferenceEvaluator(sub).run(None, feeds)[0])
    except Exception:
        return None  # an op or dtype the reference evaluator lacks: left to a real run


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


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[list, str]]:
    """Shapes (with symbolic dims as strings, unknown as None) and dtypes from static inference."""
    return _infer(without_data(model))


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


def _concrete_shapes(model: onnx.ModelProto, batches: tuple[int, ...], names: list[str]) -> list:
    """Tensor shapes at each probe batch size (``name -> (dims, dtype)`` views), with every
    shape-arithmetic tensor that feeds a data op evaluated at that size first
    (:func:`_resolve`), so that a Reshape whose target reads the batch size still has a known
    output shape. Whole-graph inference of the folded copies completes what the walk left
    unknown of ``names``."""
    df = dataflow(model.graph, batch_reads=True)  # the batch read is shape arithmetic to evaluate
    values, shapes = data_dependent(df)
    frontier = []
    for n in df.nodes:
        if any(o in values for o in n.outputs):
            frontier.extend(i for i in n.inputs if i in shapes)
    frontier.extend(o for o in df.outputs if o in shapes)
    _, _, copies, types = _resolve(model, list(dict.fromkeys(frontier)), batches, df, shapes)
    views = []
    for k, copy in enumerate(copies):
        view = _ShapeView(types[k]) if types else None
        if view is None or not all(view.known(n) for n in names):
            view = _ShapeView(_inferred_types(copy))
        views.append(view)
    return views


def tensor_shapes(model: onnx.ModelProto, names: list[str], *, unbatched: dict[str, list] | None = None,
                  inputs=None, views: list | None = None) -> dict[str, tuple[list[int], str]]:
    """Per-sample shape (batch dimension dropped) and dtype of each named tensor.

    Static inference first; tensors it cannot size are sized by inference at each probe batch
    size with the shape arithmetic evaluated there; what that cannot size, or sizes without
    the batch leading (a model that may not run at that batch size: the run says), is recorded
    from one run per batch size.

    Args:
        model: the (folded) model.
        names: tensors to size.
        unbatched: when given, tensors whose leading dimension is not the batch are left out of
            the result and recorded here (name -> their shapes at the probe batch sizes) instead
            of raising.
        inputs: sample inputs for the runs (see :func:`run_with_outputs`).
        views: shapes per probe batch size already known (``FoldReport.views``): used where
            they size every unknown tensor.

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
        # shapes at each probe batch size: from inference with the shape arithmetic evaluated
        # at that size, else from a real run (one per batch size)
        found: dict[str, tuple[list[list[int]], str]] = {}
        concrete = views if views is not None and all(v.known(n) for v in views for n in unknown) \
            else _concrete_shapes(model, batches, unknown)
        for name in unknown:
            got = [c.get(name, (None, None)) for c in concrete]
            if all(dims is not None and dtype and all(isinstance(d, int) and d >= 0 for d in dims)
                   for dims, dtype in got):
                dims = [list(d) for d, _ in got]
                if _batch_leads(dims, batches):
                    found[name] = (dims, got[0][1])
        rest = [name for name in unknown if name not in found]
        if rest:
            runs = run_with_outputs(model, rest, batches, inputs=inputs)
            for name in rest:
                arrs = [r[name] for r in runs]
                found[name] = ([list(a.shape) for a in arrs], arrs[0].dtype.name)
        for name in unknown:
            dims, dtype = found[name]
            if not _batch_leads(dims, batches):
                if unbatched is not None:
                    unbatched[name] = dims
                    continue
                raise UserError(
                    f"tensor '{name}' does not have the batch as its leading dimension "
                    f"(shapes {dims} at batch sizes {list(batches)})"
                )
            result[name] = (list(dims[0][1:]), dtype)
    return result


def _batch_leads(dims: list[list[int]], batches: tuple[int, ...]) -> bool:
    """The shapes at each probe batch size lead with that batch size and agree per sample."""
    lead_ok = all(len(d) >= 1 and d[0] == b for d, b in zip(dims, batches))
    return lead_ok and all(d[1:] == dims[0][1:] for d in dims)
