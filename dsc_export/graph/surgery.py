"""Head/tail extraction at a cut point, with the cut tensor's wire form at the seam
(:mod:`dsc_export.graph.wire`), and structure checks (numerical verification of the parts is
:mod:`dsc_export.splitting`'s).

The head is every node the cut tensor depends on (inputs -> cut tensor); the tail is every
node the outputs depend on, walking back until the cut tensor (cut tensor -> outputs).
Constant subgraphs are copied into whichever side reads them. Both keep the model's opset,
IR version, functions and metadata, and the dynamic batch dimension.

Extraction works directly on the protobuf with one backward walk per side, from the original
model each time (nothing is shared between head and tail). ``onnx.utils.extract_model`` is not
used because it does not follow outer-scope references of If/Loop bodies and re-infers shapes
of the whole model on every call; onnx-graphsurgeon's ``cleanup()`` mutates tensors shared
between graphs imported from one model.

The serving form (:func:`serve_form`, :func:`rename_io`) renames a tail's input and outputs and
moves an output's batch to axis 0, as a server bundle's Triton repository serves it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from dsc_export.errors import UserError, first_line
from dsc_export.graph import wire
from dsc_export.graph.model import empty_like, is_batch_read, outer_scope_inputs
from dsc_export.graph.signature import TWO_GB, batch_dim


@dataclass(frozen=True)
class CutSpec:
    """Where and how to cut: the tensor, its per-sample shape and dtype, and the wire form
    (:mod:`dsc_export.graph.wire`: ``float32``, ``float16``, ``int8`` with its ``quant``)."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str
    wire_dtype: str = "float32"
    quant: wire.Quant | None = None

    @property
    def cast(self) -> bool:
        """True when the head converts the tensor for the wire (float16 or int8 form)."""
        return wire.converts(self.dtype, self.wire_dtype)

    @property
    def wire_tensor(self) -> str:
        """Name of the tensor that crosses the wire (head output = tail input)."""
        return wire.wire_name(self.tensor, self.dtype, self.wire_dtype)

    @property
    def wire_elem_dtype(self) -> str:
        """The cut tensor's dtype on the wire: the form's dtype when it converts, else its own."""
        return wire.wire_elem_dtype(self.dtype, self.wire_dtype)


def _elem(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _value_info(name: str, dtype: str, shape, batch) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _elem(dtype), [batch, *shape])


def _backward(graph: onnx.GraphProto, targets: list[str], stop: set[str],
              skip_batch_reads: bool = False) -> tuple[list[int], set[str]]:
    """Indices of the nodes that ``targets`` depend on, not walking past ``stop``; and every tensor read.

    With ``skip_batch_reads`` the input of a batch-size read (:func:`is_batch_read`) is not
    followed: the caller gives it another batched tensor.
    """
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    needed: set[int] = set()
    seen: set[str] = set()
    stack = [t for t in targets if t not in stop]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        k = producer.get(t)
        if k is None or k in needed:
            continue
        needed.add(k)
        node = graph.node[k]
        if skip_batch_reads and is_batch_read(node):
            continue
        for i in list(node.input) + outer_scope_inputs(node):
            if i and i not in stop and i not in seen:
                stack.append(i)
    return sorted(needed), seen


@dataclass
class Part:
    """A head or tail: its graph without initializers, and the initializers it reads.

    The initializers are the source model's own messages, not copies: :func:`save_part` streams
    them to the file one at a time, so cutting a part never holds a second copy of its weights.
    """

    model: onnx.ModelProto
    initializers: list[onnx.TensorProto]

    def byte_size(self) -> int:
        """Serialised size of the part in bytes, graph and initializers together."""
        return self.model.ByteSize() + sum(t.ByteSize() for t in self.initializers)

    def to_model(self) -> onnx.ModelProto:
        """The whole part as one ModelProto (copies the weights)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        out.graph.initializer.extend(self.initializers)
        return out


def _subgraph(model: onnx.ModelProto, node_ids: list[int], reads: set[str], name: str) -> Part:
    src = model.graph
    out = empty_like(model, name)
    g = out.graph
    g.node.extend(src.node[k] for k in node_ids)
    g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in reads)
    produced = {o for k in node_ids for o in src.node[k].output}
    g.value_info.extend(v for v in src.value_info if v.name in produced)
    return Part(out, [t for t in src.initializer if t.name in reads])


def _initializer_inputs(model: onnx.ModelProto, part: Part) -> Part:
    """Before IR 4 every initializer must also be a graph input: list them after the data input."""
    if model.ir_version < 4:
        listed = {i.name: i for i in model.graph.input}
        part.model.graph.input.extend(listed[t.name] for t in part.initializers if t.name in listed)
    return part


def extract_head(model: onnx.ModelProto, cut: CutSpec) -> Part:
    """The head: the model's inputs -> the cut tensor in its wire form (:func:`wire.encode`).

    A cut tensor that is also a graph output is returned as the model has it as well (the
    device keeps it): with a converting wire form the head has two outputs, the wire tensor first.
    """
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    ids, reads = _backward(model.graph, [cut.tensor], set())
    head = _subgraph(model, ids, reads, "head")
    hg = head.model.graph
    hg.input.extend(i for i in inputs if i.name in reads)
    batch = batch_dim(model)
    nodes, inits = wire.encode(cut.tensor, cut.dtype, cut.wire_dtype, cut.quant)
    hg.node.extend(nodes)
    head.initializers.extend(inits)
    hg.output.append(_value_info(cut.wire_tensor, cut.wire_elem_dtype, cut.shape, batch))
    if cut.cast:
        hg.output.extend(o for o in model.graph.output if o.name == cut.tensor)
    return _initializer_inputs(model, head)


def extract_tail(model: onnx.ModelProto, cut: CutSpec) -> Part:
    """The tail: the cut tensor in its wire form (decoded first, :func:`wire.decode`) -> the
    model's outputs.

    A cut tensor that is also a graph output is not among the tail's outputs: the head returns
    it (:func:`extract_head`), the tail computes the others from it.

    Raises:
        UserError: the outputs need a graph input other than through the cut tensor (not a cut point).
    """
    outputs = [o.name for o in model.graph.output if o.name != cut.tensor]
    ids, reads = _backward(model.graph, outputs, {cut.tensor}, skip_batch_reads=True)
    data_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    leaked = sorted(reads & data_inputs)
    if leaked:
        raise UserError(f"'{cut.tensor}' is not a cut point: the outputs also read {', '.join(leaked)}")
    tail = _subgraph(model, ids, reads, "tail")
    tg = tail.model.graph
    for node in tg.node:  # the batch size, read from the cut tensor (batched on axis 0, as the input)
        if is_batch_read(node):
            node.input[0] = cut.tensor
    batch = batch_dim(model)
    tg.input.append(_value_info(cut.wire_tensor, cut.wire_elem_dtype, cut.shape, batch))
    nodes, inits = wire.decode(cut.tensor, cut.dtype, cut.wire_dtype, cut.quant)
    for k, node in enumerate(nodes):
        tg.node.insert(k, node)
    tail.initializers.extend(inits)
    tg.output.extend(o for o in model.graph.output if o.name != cut.tensor)
    return _initializer_inputs(model, tail)


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)  # wire type 2: length-delimited


def _write_streaming(part: Part, path: Path) -> None:
    """Write ``part`` as one ONNX file, serializing one initializer at a time.

    Protobuf fields may come in any order and repeated fields may be split, so the file is the
    model header, then the graph field: the graph without initializers followed by each
    initializer as its own ``initializer`` field. It parses to exactly ``part.to_model()``.
    """
    header = onnx.ModelProto()
    header.CopyFrom(part.model)
    header.ClearField("graph")
    graph = part.model.graph.SerializeToString()
    sizes = [t.ByteSize() for t in part.initializers]
    inits_len = sum(len(_field_header(_INITIALIZER_FIELD, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(header.SerializeToString())
        f.write(_field_header(_GRAPH_FIELD, len(graph) + inits_len))
        f.write(graph)
        for t, n in zip(part.initializers, sizes):
            f.write(_field_header(_INITIALIZER_FIELD, n))
            f.write(t.SerializeToString())


def check_structure(part: Part, name: str) -> None:
    """``onnx.checker`` on the part with each initializer replaced by a one-element stand-in of
    its dtype and rank: nodes, opsets, types and topology are checked without a copy of the
    weights (which are the source model's, byte for byte).

    Raises:
        UserError: the graph fails ``onnx.checker``.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(part.model)
    for t in part.initializers:
        if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            probe.graph.initializer.append(t)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        probe.graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros([1] * len(t.dims), dtype=dtype), t.name))
    try:
        onnx.checker.check_model(probe)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the extracted graph {name} fails onnx.checker: {first_line(exc)}") from exc


def save_part(part: Part, path: str | os.PathLike, check: bool = True) -> None:
    """Save a head or tail (external data beside it when over 2 GB), after ``onnx.checker``."""
    path = Path(path)
    if check:
        check_structure(part, path.name)
    if part.byte_size() > TWO_GB:
        onnx.save(part.to_model(), os.fspath(path), save_as_external_data=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        _write_streaming(part, path)


# --- the serving form: a tail as a server answers it (bundle's Triton repository) ----------------

def serve_form(model, input_name: str, contract) -> None:
    """Give a tail the form the output contract serves, in place: its input named
    ``input_name``, its outputs named as served, batch moved to axis 0 where it is elsewhere,
    constants dropped.

    Args:
        model: the tail (graph only is enough), changed in place.
        input_name: the served input name (:data:`dsc_export.contract.INPUT`).
        contract: the output contract, one entry per model output, each with ``name``,
            ``wire_name``, ``kind`` (``batched``, ``constant``, ``whole``) and ``batch_axis``
            (:class:`dsc_export.contract.OutputContract`).
    """
    by_name = {c.name: c for c in contract}
    renames = {model.graph.input[0].name: input_name}
    outputs, moves = [], []
    for o in model.graph.output:
        c = by_name.get(o.name)
        if c is None or c.kind == "constant":
            continue
        tt = o.type.tensor_type
        if c.kind == "batched" and c.batch_axis:
            inner = f"{o.name}__batch_on_axis_{c.batch_axis}"
            renames[o.name] = inner
            perm = [c.batch_axis] + [k for k in range(len(tt.shape.dim)) if k != c.batch_axis]
            dims = [tt.shape.dim[k].dim_param or tt.shape.dim[k].dim_value or None for k in perm]
            moves.append(helper.make_node("Transpose", [inner], [c.wire_name], perm=perm,
                                          name=f"{c.wire_name}__to_batch_first"))
            outputs.append(helper.make_tensor_value_info(c.wire_name, tt.elem_type, dims))
        else:
            renames[o.name] = c.wire_name
            outputs.append(o)
    rename_io(model, renames)
    model.graph.node.extend(moves)
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def rename_io(model, renames: dict[str, str]) -> None:
    """Rename tensors in place: every reader, producer, graph input and output follows. An inner
    tensor that already has one of the new names (older torch exports name one ``input``) is
    renamed out of the way first."""
    taken = {t for n in model.graph.node for t in list(n.input) + list(n.output)} | \
        {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    targets = set(renames.values())
    for name in sorted(taken & targets - set(renames)):
        k = 1
        while f"{name}__{k}" in taken:
            k += 1
        renames = {**renames, name: f"{name}__{k}"}
        for t in model.graph.initializer:
            if t.name == name:
                t.name = f"{name}__{k}"
    for n in model.graph.node:
        n.input[:] = [renames.get(x, x) for x in n.input]
        n.output[:] = [renames.get(x, x) for x in n.output]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        vi.name = renames.get(vi.name, vi.name)
