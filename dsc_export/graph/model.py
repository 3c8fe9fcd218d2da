"""Loading ONNX models and the data-flow view the analysis works on."""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from dsc_export.errors import UserError

# Ops whose output depends only on the *shape* of their input, never on its values.
SHAPE_OPS = {"Shape", "Size"}
# Name prefix of the Shape nodes that read only the batch size (written by
# :func:`dsc_export.graph.folding.rewrite_batch_reads`). Every batched tensor carries the batch
# size on axis 0, so such a read is not a data-flow edge: a head reads it from the model input,
# a tail from the cut tensor (:mod:`dsc_export.graph.surgery` rewires it).
BATCH_READ = "dsc_export/batch_read"


def is_batch_read(node) -> bool:
    """True for a Shape node written to read the batch size (see :data:`BATCH_READ`)."""
    return node.op_type == "Shape" and node.name.startswith(BATCH_READ)


def load_model(path: str | os.PathLike, load_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with one-line errors for every way it can be unusable.

    Args:
        path: the ``.onnx`` file; external data files are looked up beside it.
        load_data: also load external tensor data (False: only check that it exists).

    Returns:
        The model.
    """
    return load_model_and_data_files(path, load_data)[0]


def load_model_and_data_files(path: str | os.PathLike, load_data: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """:func:`load_model`, also returning the external data files (relative to the model's folder).

    Raises:
        UserError: the file is missing, a directory, not a readable ONNX model, or its external
            data files are missing or unreadable (one line).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist")
    if path.is_dir():
        raise UserError(f"'{path}' is a directory, not an ONNX file")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:
        raise UserError(
            f"'{path}' is not a readable ONNX model (not ONNX, or truncated): "
            f"{type(exc).__name__}"
        ) from exc
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise UserError(f"'{path}' is not an ONNX model (no graph or no nodes; truncated?)")
    files = sorted(
        {
            external_data_helper.ExternalDataInfo(t).location
            for t in all_initializers(model.graph)
            if external_data_helper.uses_external_data(t)
        }
    )
    missing = [f for f in files if not (path.parent / f).is_file()]
    if missing:
        raise UserError(
            f"'{path}' stores weights in external data file(s) that are missing: "
            f"{', '.join(missing)} (expected beside the model)"
        )
    if load_data:
        try:
            external_data_helper.load_external_data_for_model(model, os.fspath(path.parent))
        except Exception as exc:
            raise UserError(f"cannot read the external data of '{path}': {exc}") from exc
    return model, files


def empty_like(model: onnx.ModelProto, graph_name: str) -> onnx.ModelProto:
    """A model with ``model``'s header (IR version, opsets, functions, metadata) and an empty graph."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.producer_name = "dsc-export"
    out.producer_version = model.producer_version
    out.domain = model.domain
    out.model_version = model.model_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.metadata_props.extend(model.metadata_props)
    out.graph.name = graph_name
    return out


def without_data(model: onnx.ModelProto) -> onnx.ModelProto:
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


def all_initializers(graph: onnx.GraphProto):
    """Every initializer of ``graph`` and of its subgraphs (If/Loop/Scan bodies), recursively."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                yield from all_initializers(sub)


def has_subgraph(node: onnx.NodeProto) -> bool:
    """True when ``node`` holds a graph attribute (If/Loop/Scan bodies: control flow)."""
    graph_kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_kinds for a in node.attribute)


def _attr_graphs(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def outer_scope_inputs(node: onnx.NodeProto) -> list[str]:
    """Tensors a control-flow node's subgraphs (If/Loop/Scan bodies) read from the outer scope.

    They are real data-flow edges into the node, although they are not in ``node.input``.
    """
    refs: list[str] = []
    for attr in node.attribute:
        for sub in _attr_graphs(attr):
            refs.extend(_free_names(sub))
    return list(dict.fromkeys(refs))


def _free_names(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    free: list[str] = []
    for node in graph.node:
        for name in list(node.input) + outer_scope_inputs(node):
            if name and name not in defined:
                free.append(name)
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            free.append(out.name)
    return free


@dataclass(frozen=True)
class OpNode:
    """One ONNX node in the data-flow view: explicit and outer-scope inputs, outputs."""

    index: int  # position in graph.node
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class Dataflow:
    """The data-flow view of a graph used by the cut analysis.

    Attributes:
        inputs: graph inputs that carry data (initializer-backed inputs excluded).
        outputs: graph outputs.
        nodes: every node, with outer-scope references of subgraphs as inputs.
        constants: initializer names (and sparse initializers).
    """

    inputs: list[str]
    outputs: list[str]
    nodes: list[OpNode]
    constants: set[str]

    def producers(self) -> dict[str, OpNode]:
        """Tensor name -> the node that produces it."""
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[OpNode]]:
        """Tensor name -> the nodes that read it (each node once)."""
        cons: dict[str, list[OpNode]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs):
                if i:
                    cons.setdefault(i, []).append(n)
        return cons


def dataflow(graph: onnx.GraphProto, batch_reads: bool = False) -> Dataflow:
    """Build the :class:`Dataflow` of ``graph`` (linear in its size).

    Args:
        batch_reads: keep the input edge of batch-size reads (:func:`is_batch_read`); the cut
            analysis leaves it out, shape evaluation needs it.
    """
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    nodes = [
        OpNode(k, n.name or f"{n.op_type}_{k}", n.op_type,
               () if is_batch_read(n) and not batch_reads
               else tuple(x for x in n.input if x) + tuple(outer_scope_inputs(n)),
               tuple(n.output))
        for k, n in enumerate(graph.node)
    ]
    return Dataflow(inputs, [o.name for o in graph.output], nodes, constants)


def data_dependent(df: Dataflow) -> tuple[set[str], set[str]]:
    """Split the tensors that depend on the graph inputs by *how* they depend on them.

    Returns:
        ``(values, shapes)``: tensors whose values depend on the inputs' values, and tensors
        that depend on the inputs only through the shape of some tensor (outputs of
        Shape/Size and everything computed from those alone). Everything else is constant.
    """
    values = set(df.inputs)
    shapes: set[str] = set()
    for node in topological_nodes(df):
        ins = node.inputs
        if node.op_type in SHAPE_OPS:
            if any(i in values or i in shapes for i in ins):
                shapes.update(o for o in node.outputs if o)
        elif any(i in values for i in ins):
            values.update(o for o in node.outputs if o)
        elif any(i in shapes for i in ins):
            shapes.update(o for o in node.outputs if o)
    return values, shapes


def topological_nodes(df: Dataflow) -> list[OpNode]:
    """The nodes in a topological order (Kahn's algorithm; stable for sorted graphs).

    Raises:
        UserError: the graph has a cycle (naming a node on it) or reads a tensor nothing defines.
    """
    producers = df.producers()
    known = set(df.inputs) | df.constants
    for n in df.nodes:
        for i in n.inputs:
            if i not in producers and i not in known:
                raise UserError(f"node '{n.name}' reads tensor '{i}', which nothing in the graph defines")
    order, stuck = topological_order([n.inputs for n in df.nodes], [n.outputs for n in df.nodes])
    if stuck is not None:
        raise UserError(f"the graph has a cycle through node '{df.nodes[stuck].name}'; it is not a "
                        "valid ONNX model")
    return [df.nodes[k] for k in order]


def topological_order(reads: list, writes: list) -> tuple[list[int], int | None]:
    """The one topological sort of the package: node positions in an order where every node
    comes after the nodes whose outputs it reads (Kahn's algorithm, the earliest ready node
    first, so a sorted list keeps its order).

    Args:
        reads: per node, the tensor names it reads (names no node writes are ignored: graph
            inputs, initializers, tensors from outside a node subset).
        writes: per node, the tensor names it writes.

    Returns:
        ``(order, stuck)``: the positions in order, and None; or, on a cycle, the positions
        ordered so far and one position of a node on (or behind) the cycle.
    """
    producer = {o: k for k, outs in enumerate(writes) for o in outs if o}
    deps = [{producer[i] for i in ins if i in producer} - {k} for k, ins in enumerate(reads)]
    users: dict[int, list[int]] = {}
    for k, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(k)
    missing = [len(ds) for ds in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, ()):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(reads):
        return order, next(k for k, m in enumerate(missing) if m > 0)
    return order, None


def sort_nodes(model: onnx.ModelProto) -> bool:
    """Put the graph's nodes in a topological order, in place, when they are not already
    (graph editors append nodes anywhere; onnxruntime runs such graphs, onnx.checker and every
    part cut from them would not). Stable: a sorted graph keeps its order.

    Returns:
        True when the order changed.

    Raises:
        UserError: a cycle, or a tensor read that nothing defines.
    """
    order = topological_nodes(dataflow(model.graph))
    if all(n.index == k for k, n in enumerate(order)):
        return False
    nodes = [model.graph.node[n.index] for n in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    return True
