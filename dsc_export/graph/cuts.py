"""Cut points, bytes on the wire, natural and compressive bottlenecks (paper Section 3).

A **cut point** is a tensor through which every path from the graph inputs to the graph
outputs passes: it dominates the outputs in the data-flow graph, so the head can end there and
the tail can start there with that one tensor sent between them. Constant subgraphs
(initializers, Constant nodes, shape arithmetic that was folded) are not paths.

Dominance is decided exactly, in linear time, from any one topological order of the
data-flow graph restricted to the vertices that lie on some input→output path: a vertex v
dominates the sink iff no edge (a, b) of that subgraph jumps over it (pos(a) < pos(v) < pos(b)).
Proof: a jumping edge lies on an input→output path whose part before a and after b is
monotone in position, so that path misses v; conversely, with no jumping edge, a path whose
positions climb from before v to after v must step on v. The result does not depend on which
topological order is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsc_export.artifacts import CUT_FORMS, CutPoint
from dsc_export.graph import wire
from dsc_export.graph.model import Dataflow, data_dependent, topological_nodes
from dsc_export.graph.wire import FLOAT_DTYPES  # noqa: F401  (its home is graph/wire.py)


@dataclass
class _Layout:
    """Positions of the relevant subgraph in one topological order, and its edges."""

    position: dict[str, int]  # tensor name -> position
    tensors: list[str]  # relevant tensors in position order
    edges: list[tuple[int, int, str, str]]  # (from pos, to pos, from label, to label)
    size: int


def _layout(df: Dataflow) -> _Layout:
    values, shapes = data_dependent(df)
    dependent = values | shapes  # unfolded shape arithmetic is a real path (e.g. batch size)
    order = [n for n in topological_nodes(df) if any(i in dependent for i in n.inputs)]
    # backward: which dependent tensors reach an output
    live = {o for o in df.outputs if o in dependent}
    live_nodes = []
    for n in reversed(order):
        if any(o in live for o in n.outputs):
            live_nodes.append(n)
            live.update(i for i in n.inputs if i in dependent)
    live_nodes.reverse()

    position: dict[str, int] = {}
    tensors: list[str] = []
    edges: list[tuple[int, int, str, str]] = []
    pos = 1  # position 0 is the virtual source
    for name in df.inputs:
        if name in live:
            position[name] = pos
            tensors.append(name)
            edges.append((0, pos, "<inputs>", name))
            pos += 1
    for n in live_nodes:
        npos = pos
        pos += 1
        for i in dict.fromkeys(n.inputs):
            if i in live:
                edges.append((position[i], npos, i, n.name))
        for o in n.outputs:
            if o in live:
                position[o] = pos
                tensors.append(o)
                edges.append((npos, pos, n.name, o))
                pos += 1
    sink = pos
    for o in dict.fromkeys(df.outputs):
        if o in position:
            edges.append((position[o], sink, o, "<outputs>"))
    return _Layout(position, tensors, edges, sink + 1)


def find_cut_points(df: Dataflow) -> list[str]:
    """Every cut point of the graph, in topological order.

    The graph inputs are not listed (cutting there is the ``offload`` candidate), nor are the
    graph outputs that feed nothing further (``local``). A graph output that also feeds the
    nodes of the other outputs and dominates them is a cut point: the head returns it (the
    device keeps it as an output and sends it), the tail computes the rest from it.

    Args:
        df: the data-flow view; static shape arithmetic should be folded first
            (:func:`dsc_export.graph.folding.fold_shape_arithmetic`), otherwise a Shape node
            reading an early tensor counts as a path around every tensor after it.

    Returns:
        Tensor names.
    """
    lay = _layout(df)
    cover = np.zeros(lay.size + 1, dtype=np.int64)
    for a, b, _, _ in lay.edges:
        if b > a + 1:
            cover[a + 1] += 1
            cover[b] -= 1
    cover = np.cumsum(cover)
    sink = lay.size - 1
    feeding = {a for a, b, _, _ in lay.edges if b != sink}  # positions read by a live node
    ends = set(df.inputs) | {o for o in df.outputs if lay.position.get(o) not in feeding}
    return [t for t in lay.tensors if cover[lay.position[t]] == 0 and t not in ends]


def why_not_cut(df: Dataflow, tensor: str) -> str:
    """Explain in one sentence why ``tensor`` is not a cut point."""
    lay = _layout(df)
    if tensor not in lay.position:
        values, shapes = data_dependent(df)
        if tensor in values or tensor in shapes:
            return f"'{tensor}' does not lead to any graph output"
        return f"'{tensor}' is not computed from the graph input (constant or unknown)"
    p = lay.position[tensor]
    for a, b, src, dst in lay.edges:
        if a < p < b:
            if src == "<inputs>":
                return f"the graph input '{dst}' reaches the outputs without passing through it"
            if dst == "<outputs>":
                return f"the graph output '{src}' is computed without passing through it"
            return f"'{dst}' reads '{src}', which bypasses it on the way to the outputs"
    return f"'{tensor}' is a cut point"


def nearest_cut_points(df: Dataflow, tensor: str, cuts: list[str]) -> tuple[str | None, str | None]:
    """The cut points just before and just after ``tensor`` in topological order."""
    lay = _layout(df)
    if tensor not in lay.position:
        return None, None
    p = lay.position[tensor]
    before = [c for c in cuts if lay.position[c] < p]
    after = [c for c in cuts if lay.position[c] > p]
    return (before[-1] if before else None), (after[0] if after else None)


def wire_itemsize(dtype: str, wire_dtype: str) -> int:
    """Bytes per element of a tensor of ``dtype`` on the wire in form ``wire_dtype``
    (:mod:`dsc_export.graph.wire`): float16 and int8 apply to wider floating tensors, other
    tensors travel as they are.

    Raises:
        ValueError: ``wire_dtype`` is not one of ``CUT_FORMS``.
    """
    if wire_dtype not in CUT_FORMS:
        raise ValueError(f"wire form must be one of {CUT_FORMS}")
    return wire.itemsize(dtype, wire_dtype)


def compression_ratio(cut_bytes: int, input_bytes: int) -> float:
    """c_l: the bytes a cut point sends per sample over the bytes of one input sample.

    The paper defines c_l in elements (its D·c_l is the cut tensor's size); here both sizes are
    bytes on the wire, so a float32 cut of a uint8 image counts 4 bytes per element (see
    docs/concepts.md, "Bytes, not elements"). c_l < 1 makes cut point l a natural bottleneck.

    Raises:
        ValueError: ``input_bytes`` is not positive.
    """
    if input_bytes <= 0:
        raise ValueError(f"input size must be positive, got {input_bytes} bytes")
    return cut_bytes / input_bytes


def compressive_mask(ratios: list[float]) -> list[bool]:
    """The compressive bottlenecks among cut points in graph order, given their ratios c_l
    (:func:`compression_ratio`): the paper's Eq. 3, C = { j | c_j < 1 and c_j < c_i for all i < j }
    (strictly below every earlier ratio). Its Eq. 1-2 are the argument: of two cut points with the
    same ratio the earlier is never slower, as it sends as much and runs less on the device."""
    mask, best = [], 1.0
    for c in ratios:
        is_c = c < best  # best starts at 1, so this also requires c < 1
        mask.append(is_c)
        if c < best:
            best = c
    return mask


def describe_cut_points(
    names: list[str],
    shapes: dict[str, tuple[list[int], str]],
    *,
    input_bytes: int,
    input_elements: int,
    wire_dtype: str,
    scopes: dict[str, str | None] | None = None,
    forms: list[str] | None = None,
) -> list[CutPoint]:
    """Sizes, ratios and bottleneck flags of the cut points (pure).

    Args:
        names: cut point tensors in topological order.
        shapes: tensor -> (per-sample shape, dtype name).
        input_bytes, input_elements: per-sample size of the model input.
        wire_dtype: the first wire form (``float32``, ``float16``, ``int8``): the point's own
            ``bytes``, ``ratio``, ``natural``, ``compressive``.
        scopes: tensor -> module scope, where known.
        forms: every wire form to size (``CutPoint.forms``, Eq. 3 per form; see
            :func:`mark_compressive`) [default: ``[wire_dtype]``].
    """
    forms = list(forms or [wire_dtype])
    if wire_dtype not in forms:
        forms.insert(0, wire_dtype)
    points = []
    for k, name in enumerate(names):
        shape, dtype = shapes[name]
        elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
        per_form = {}
        for f in forms:
            nbytes = elements * wire_itemsize(dtype, f)
            ratio = compression_ratio(nbytes, input_bytes)
            per_form[f] = {"bytes": nbytes, "ratio": ratio, "natural": ratio < 1,
                           "compressive": False,
                           "fits": True, "has": f in wire.forms_of(dtype, [f])}
        first = per_form[wire_dtype]
        points.append(
            CutPoint(
                index=k, tensor=name, shape=list(shape), dtype=dtype, elements=elements,
                bytes=first["bytes"], ratio=first["ratio"],
                element_ratio=compression_ratio(elements, input_elements),
                natural=first["natural"], compressive=False,
                scope=(scopes or {}).get(name), forms=per_form,
            )
        )
    mark_compressive(points, wire_dtype)
    return points


def mark_compressive(points: list[CutPoint], first: str) -> None:
    """Eq. 3 per wire form, on that form's bytes (in place): for each form f of
    ``CutPoint.forms``, the points whose f-form fits the wire (``fits``) are taken in graph order
    and :func:`compressive_mask` applied to their f-form ratios; a point is compressive in f when
    the mask says so and it has an f form of its own (``has``: a 1-byte tensor has no int8 form,
    but its bytes still bound the later points'). A point that does not fit is never compressive
    in that form. The point's own flags follow form ``first``."""
    forms = list(points[0].forms) if points else []
    for f in forms:
        seq = [p for p in points if p.forms[f]["fits"]]
        for p, c in zip(seq, compressive_mask([p.forms[f]["ratio"] for p in seq])):
            p.forms[f]["compressive"] = bool(c and p.forms[f]["has"])
        for p in points:
            if not p.forms[f]["fits"]:
                p.forms[f]["compressive"] = False
    for p in points:
        own = p.forms[first]
        p.compressive, p.fits_wire = own["compressive"], own["fits"]


def scope_of(node_name: str, root: str | None = None) -> str | None:
    """Module path from a TorchScript-exported node name.

    ``/blocks/blocks.3/blocks.3.0/conv_pwl/Conv`` -> ``blocks.3.0.conv_pwl``. ``root`` (a
    wrapper attribute such as ``net``) is dropped from the front. None when the name carries no
    module path.
    """
    if not node_name.startswith("/"):
        return None
    parts = node_name.strip("/").split("/")[:-1]
    scope = ""
    for p in parts:
        head = p.rsplit(".", 1)[0] if "." in p else None
        if head and scope.endswith(head) and (len(scope) == len(head) or scope[-len(head) - 1] == "."):
            scope = scope[: len(scope) - len(head)] + p
        else:
            scope = f"{scope}.{p}" if scope else p
    if root and (scope == root or scope.startswith(root + ".")):
        scope = scope[len(root) + 1:]
    return scope or None
