"""Folding of static shape arithmetic, and one read of the batch size.

Static shape inference is not enough: timm's ``tf_`` EfficientNets pad "same" at run time
(Shape -> Gather -> arithmetic -> Pad), and ``onnx.shape_inference`` leaves every spatial
dimension after the stem unknown. So :func:`fold_shape_arithmetic` evaluates the shape-arithmetic
tensors that feed data ops (Pad's pads, Reshape's shape, ...) at batch sizes 1 and 2: with
``onnx.reference`` on the arithmetic alone, alternating with static inference on a weightless
copy (:mod:`.arithmetic`), and, only for what that cannot size, from real runs with those
tensors as extra outputs (:mod:`.probe`). A value equal at both batch sizes is a constant for
this input size and is folded into an initializer; the Shape nodes behind it disappear. A value
that changes with the batch size (it reads the batch dimension) is kept, and remains a path in
the cut analysis. :func:`dsc_export.graph.shapes.tensor_shapes` then sizes the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dsc_export.graph import probe
from dsc_export.graph.arithmetic import all_equal, concrete_shapes, evaluate_statically, fold_into
from dsc_export.graph.model import (
    BATCH_READ,
    SHAPE_OPS,
    data_dependent,
    dataflow,
    is_batch_read,
    outer_scope_inputs,
    topological_nodes,
)
from dsc_export.graph.signature import input_signature, probe_batches


@dataclass
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

def fold_shape_arithmetic(model: onnx.ModelProto, inplace: bool = False,
                          inputs=None) -> tuple[onnx.ModelProto, FoldReport]:
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
    constant, dependent, unresolved, views = evaluate_statically(model, frontier, batches)
    report.views = views
    # a data-dependent shape is never a constant, whatever inference said or two probe runs
    # happened to give
    producer = {o: n for n in model.graph.node for o in n.output if o}
    data_shaped = {t for t in list(constant) + unresolved if tainted & set(shape_sources(t, producer))}
    dependent += [t for t in list(constant) + unresolved if t in data_shaped]
    constant = {t: v for t, v in constant.items() if t not in data_shaped}
    unresolved = [t for t in unresolved if t not in data_shaped]
    if unresolved:  # shapes static inference cannot size: record them from real runs
        runs = probe.run_with_outputs(model, unresolved, batches, inputs=inputs)
        for name in unresolved:
            vals = [r[name] for r in runs]
            if all_equal(vals):
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
        fold_into(folded, constant)
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
    evaluated at each, :func:`dsc_export.graph.arithmetic.concrete_shapes`, else from one run): a
    dimension equal at every probe is a constant, one equal to the batch size at every probe is
    the batch; a read with any other dimension is kept as it is.

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
    to_run = []
    # the sources' shapes at each probe batch size, with the shape arithmetic evaluated there
    sources = list(dict.fromkeys(n.input[0] for n in reads))
    if views is None or not all(v.known(x) for v in views for x in sources):
        views = concrete_shapes(model, batches, sources)
    for n in reads:
        full = [v.get(n.input[0], (None, None))[0] for v in views]
        if any(f is None or not all(isinstance(d, int) and d >= 0 for d in f) for f in full):
            to_run.append(n.output[0])
        elif n.op_type == "Size":
            at[n.output[0]] = [np.array(np.prod(f, dtype=np.int64)) for f in full]
        else:
            attrs = {a.name: a.i for a in n.attribute}
            sl = slice(attrs.get("start", 0), attrs.get("end", None))
            at[n.output[0]] = [np.array(f[sl], dtype=np.int64) for f in full]
    if to_run:
        runs = probe.run_with_outputs(model, to_run, batches, inputs=inputs)
        for name in to_run:
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
