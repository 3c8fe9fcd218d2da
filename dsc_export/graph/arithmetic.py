"""Values of shape arithmetic at each probe batch size, without running the network.

One weightless copy of the model per probe batch size; static shape inference alternates with
``onnx.reference`` on the arithmetic alone (:func:`evaluate_statically`); :func:`concrete_shapes`
gives the tensor shapes at each probe batch size with that arithmetic evaluated. Used by
:mod:`.folding` and :mod:`.shapes`. Pure: onnx and numpy only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dsc_export.graph.model import (
    SHAPE_OPS,
    Dataflow,
    data_dependent,
    dataflow,
    has_subgraph,
    topological_nodes,
    topological_order,
    without_data,
)
from dsc_export.graph.signature import infer_types, np_dtype_name


def all_equal(values: list[np.ndarray]) -> bool:
    """True when a value is the same at every probe batch size (so a constant)."""
    return all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values[1:])

def evaluate_statically(model: onnx.ModelProto, frontier: list[str], batches: tuple[int, ...]):
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
        if all_equal(per_batch):
            constant[t] = per_batch[0]
        else:
            dependent.append(t)
    return constant, dependent, pending, ([ShapeView(t) for t in types] if types else None)

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
             if not has_subgraph(nodes[k])
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
            fold_into(copy, {t: v[k] for t, v in progress.items()})
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
    types = infer_types(copy)
    shapes = ShapeView(types)
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

class ShapeView:
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
            if has_subgraph(node):
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
            sub_inputs.append(
                helper.make_tensor_value_info(src, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims))
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
        if has_subgraph(node):
            return None
        stack.extend(i for i in node.input if i)
    order, stuck = topological_order([n.input for n in nodes], [n.output for n in nodes])
    return (nodes if stuck is not None else [nodes[k] for k in order]), sources, needed

def fold_into(model: onnx.ModelProto, constant: dict[str, np.ndarray]) -> None:
    g = model.graph
    for node in g.node:
        for k, o in enumerate(node.output):
            if o in constant:
                node.output[k] = f"{o}__dsc_unfolded"
    for name, value in constant.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))

def concrete_shapes(model: onnx.ModelProto, batches: tuple[int, ...], names: list[str]) -> list:
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
        view = ShapeView(types[k]) if types else None
        if view is None or not all(view.known(n) for n in names):
            view = ShapeView(infer_types(copy))
        views.append(view)
    return views
