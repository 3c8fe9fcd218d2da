"""What both ends of the wire agree on: tensor names, the Triton type table, the output contract.

Both ends (``dsc-export serve``, a stock Triton serving a server bundle's repository, and
``dsc-export run``) and the offline pipeline that prepares them (``split``, ``build``,
``bundle``) import this module, so the names and the rules live in one place. It sits below the
pipeline and the run time: it imports only the artifacts (and, to tell a constant output, the
model's graph); the run-time helpers (readiness) are in :mod:`dsc_export.serving.protocol`.

**The output contract** (:func:`output_contract`) says, per model output, how a server answers
it. Triton, like every batching server, splits a batch into the requests it merged along axis 0
of every output, so:

- ``batched``: the output carries one result per sample along one axis: axis 0, or another axis
  named like the input's batch dimension (``[classes, N]``), which the server moves to the front
  and the client moves back. Other symbolic dimensions are served as variable (``-1``).
- ``constant``: the output does not depend on the input (an initializer or a constant
  subgraph that is also a graph output, e.g. a prototype table): the server does not send it, the
  client takes it from its own copy of the model once.
- ``whole``: a model that runs at one batch size only (``fixed_batch``) is served without
  batching (Triton ``max_batch_size: 0``): every output goes back as the model returns it.

An output that fits none of these (no axis follows the batch and it is not a constant; the batch
on several axes; a dtype Triton cannot carry) is a *problem*: ``build``, ``serve``, ``bundle`` and
``run`` refuse the split dir with one line naming the output and the cause, and ``split`` can
refuse it up front with the same function.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsc_export.artifacts import Manifest, TensorSig
from dsc_export.errors import UserError
from dsc_export.graph.model import has_subgraph

INPUT = "input"
# Per request, beside the model's outputs, both measured in the server process with one clock:
# QUEUE_MS from the moment Triton hands the request to dsc-export's handler until the batch it
# joins starts on the tail (the wait for the server's compute), SERVER_MS the tail's run on that
# batch. Triton's own time before the hand-over (its batching delay, max_queue_delay_us, and a
# wait for a free instance when more requests are in flight than instances) is in neither.
SERVER_MS = "server_ms"
QUEUE_MS = "queue_ms"
META = "dsc_meta"
LOAD = "dsc_load"  # the load query: input PING, output LOAD_OUTPUT = ServerLoad.to_array()
PING = "ping"
LOAD_OUTPUT = "load"
# The model's sha256 as each end names it: the META model's one output (``dsc-export serve``),
# and the parameter of every config.pbtxt of a server bundle's Triton repository (stock Triton).
MODEL_SHA256 = "model_sha256"
MODEL_SHA256_PARAMETER = "dsc_model_sha256"

# numpy dtype name -> Triton data type (model_config.proto's DataType)
TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
                "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64"}


@dataclass(frozen=True)
class ServerLoad:
    """The server's load as the load query (:data:`LOAD`) answers it.

    Attributes:
        queue_depth: requests waiting for the server's compute now.
        utilization: share of the recent window the server was computing (0-1).
        q_ms: mean wait (:data:`QUEUE_MS`) of the requests of the recent window, ms.
        s: mean slowdown of those requests' tail runs against the server's profile (the tail's
            time on the batch it ran in over the profiled time for the request's own batch
            size); NaN when the server has no profile.
        window_s: the recent window, seconds.
        requests: requests in the window.
        handover_ms, handover_ms_per_MB: the server's time on a request outside its handler
            (Triton's hand-over to it and back) over the recent window, as a fixed part (ms per
            request) and a part per MB (1e6 bytes) of request (ms per MB)
            (:meth:`~dsc_export.serving.load.HandOver.fit`); NaN when not measured (no
            requests, a stock Triton, or a server from before these fields).
    """

    queue_depth: float
    utilization: float
    q_ms: float
    s: float
    window_s: float
    requests: float
    handover_ms: float = float("nan")
    handover_ms_per_MB: float = float("nan")

    def to_array(self) -> np.ndarray:
        """float64 [8], in field order: what the load query sends."""
        return np.array([self.queue_depth, self.utilization, self.q_ms, self.s, self.window_s, self.requests,
                         self.handover_ms, self.handover_ms_per_MB], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> ServerLoad:
        """The load as the ``dsc_load`` query returns it: eight float64 values in field order
        (six from a server before the hand-over fields: they are then NaN)."""
        return cls(*(float(x) for x in list(a.ravel())[:8]))


def output_names(manifest: Manifest) -> list[str]:
    """The names the outputs travel under: the model's output names made safe for Triton (letters,
    digits, ``_``), unique, and never ``input``, ``server_ms``, ``queue_ms``, ``dsc_meta`` or
    ``dsc_load``."""
    taken = {INPUT, SERVER_MS, QUEUE_MS, META, LOAD}
    names = []
    for k, o in enumerate(manifest.model.outputs or [manifest.model.output]):
        base = re.sub(r"[^A-Za-z0-9_]", "_", o.name).strip("_") or f"output_{k}"
        name, n = base, 1
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def fixed_batch(manifest: Manifest) -> int | None:
    """The only batch size the model runs at, or None (:attr:`ModelRef.only_batch`)."""
    return manifest.model.only_batch


def mergeable(manifest: Manifest) -> bool:
    """True when a server may merge requests into one batch (:attr:`ModelRef.mergeable`)."""
    return manifest.model.mergeable


def why_not_mergeable(manifest: Manifest) -> str | None:
    """Why a server must not merge requests of this model (one phrase), or None when it may."""
    fb = fixed_batch(manifest)
    if fb is not None:
        return f"the model runs at batch size {fb} only"
    if manifest.model.batch_independent is False:
        return "one sample's result depends on the other samples of its batch (batch statistics)"
    return None


@dataclass(frozen=True)
class OutputContract:
    """How a server answers one model output.

    Attributes:
        name: the model's output name.
        wire_name: the name it travels under (:func:`output_names`).
        kind: ``batched``, ``constant`` or ``whole`` (see the module docstring).
        batch_axis: ``batched``: the axis of the model's output that holds the batch.
        dims: the Triton dims: ``batched``: per sample, batch axis left out, -1 for a variable
            dimension; ``whole``: the full shape; ``constant``: the model's shape.
        dtype: numpy dtype name.
        problem: None, or one sentence naming the output and why no server can answer it.
    """

    name: str
    wire_name: str
    kind: str
    batch_axis: int | None
    dims: tuple[int, ...]
    dtype: str
    problem: str | None = None


def _dim(d) -> int:
    return d if isinstance(d, int) and d > 0 else -1


def _one(sig: TensorSig, wire: str, batch, fixed: int | None, constants: set[str] | None) -> OutputContract:
    dims = list(sig.shape)
    shown = "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else repr(d) if isinstance(d, str) else "?"
                            for d in dims) + "]"

    def problem(kind: str, why: str, axis=None, out_dims=()) -> OutputContract:
        return OutputContract(sig.name, wire, kind, axis, tuple(out_dims), sig.dtype, f"output '{sig.name}' {why}")

    if sig.dtype not in TRITON_TYPES:
        return problem("whole", f"has dtype {sig.dtype}, which Triton's protocol cannot carry; cast it in the "
                                f"model to one of {', '.join(TRITON_TYPES)}")
    if fixed is not None:  # served whole at the one batch size, no batching: no axis needs to be the batch
        return OutputContract(sig.name, wire, "whole", None, tuple(_dim(d) for d in dims), sig.dtype)
    if constants is not None and sig.name in constants:
        return OutputContract(sig.name, wire, "constant", None, tuple(_dim(d) for d in dims), sig.dtype)
    named = [k for k, d in enumerate(dims) if isinstance(batch, str) and d == batch]
    if len(named) > 1:
        return problem("batched", f"has shape {shown}: the batch '{batch}' is on axes "
                                  f"{', '.join(map(str, named))}, and a server splits a batch along one axis; "
                                  "return one result per sample along one axis")
    if named:
        axis = named[0]
    elif dims and isinstance(dims[0], str):
        axis = 0  # symbolic axis 0 under another name than the input's batch: the usual export
    elif dims and dims[0] == -1 and any(isinstance(d, int) and d > 0 for d in dims[1:]):
        return problem("batched", f"has shape {shown}: its first axis varies with the data, not with the batch "
                                  "size (e.g. NonZero or NonMaxSuppression detections), so a server cannot split "
                                  "it per request; return a fixed number of results per sample (padded), or "
                                  "drop the output")
    elif any(not isinstance(d, int) or d <= 0 for d in dims):
        return problem("batched", f"has shape {shown}: no axis is named like the input's batch '{batch}', so a "
                                  "server cannot tell which axis holds the samples; name the output's batch "
                                  "dimension like the input's when exporting (dynamic_axes / dynamic_shapes)")
    else:
        checked = ("it depends on the input (computed across the batch?)" if constants is not None
                   else "it was not checked whether it is a constant")
        return problem("batched", f"has shape {shown}: no axis follows the batch size and {checked}, so a server "
                                  "cannot answer it per request; re-export it with one result per sample along an "
                                  "axis, or drop the output")
    per_sample = [_dim(d) for k, d in enumerate(dims) if k != axis]
    return OutputContract(sig.name, wire, "batched", axis, tuple(per_sample), sig.dtype)


def output_contract(manifest: Manifest, constants: Iterable[str] | None = None) -> list[OutputContract]:
    """The contract of every model output, in the model's output order (pure; no file is read).

    Args:
        manifest: a split dir's manifest; its ``model.outputs`` shapes, its input's batch
            dimension, ``model.fixed_batch``.
        constants: names of the outputs that do not depend on the input
            (:func:`constant_outputs` of the model) [default None: not known, so an output
            without a batch axis is a problem].

    Returns:
        One :class:`OutputContract` per output; ``problem`` is set on each output no server can
        answer. Call it at split time to refuse such a model up front.
    """
    batch = manifest.model.input.shape[0] if manifest.model.input.shape else None
    fixed = fixed_batch(manifest)
    consts = set(constants) if constants is not None else None
    sigs = manifest.model.outputs or [manifest.model.output]
    return [_one(sig, wire, batch, fixed, consts) for sig, wire in zip(sigs, output_names(manifest))]


def head_outputs(manifest: Manifest, split) -> list[str]:
    """The model outputs the head of ``split`` returns itself: its cut tensor when that is also a
    graph output (the device keeps it and sends it; the tail computes the other outputs)."""
    names = {o.name for o in manifest.model.outputs or [manifest.model.output]}
    return [split.tensor] if split.kind == "split" and split.tensor in names else []


def tail_contract(contract: list[OutputContract], manifest: Manifest, split) -> list[OutputContract]:
    """The outputs a server sends for ``split``: neither constants (the client has them) nor
    those the head returns (:func:`head_outputs`)."""
    kept = set(head_outputs(manifest, split))
    return [c for c in contract if c.kind != "constant" and c.name not in kept]


def constant_outputs(model) -> set[str]:
    """Names of the graph outputs of ``model`` (an ``onnx.ModelProto``) that no graph input
    reaches: initializers, Constant nodes and subgraphs computed from them only.

    A node with a subgraph (If, Loop, Scan) counts as reached, whatever its inputs: its body may
    read the input from the outer scope.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    reached = {i.name for i in g.input if i.name not in inits}
    consumers: dict[str, list] = {}
    stack = list(reached)
    for n in g.node:
        if has_subgraph(n):
            stack.extend(o for o in n.output if o)
            reached.update(o for o in n.output if o)
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
    while stack:
        t = stack.pop()
        for n in consumers.get(t, []):
            for o in n.output:
                if o and o not in reached:
                    reached.add(o)
                    stack.append(o)
    return {o.name for o in g.output if o.name not in reached}


def served_outputs(split_dir: str | os.PathLike, manifest: Manifest) -> list[OutputContract]:
    """The output contract of a split dir, refusing it when any output cannot be served.

    The whole model is read (graph only) only when some output has no batch axis, to tell a
    constant from an output computed across the batch.

    Raises:
        UserError: one line naming the first output no server can answer, and why.
    """
    contract = output_contract(manifest)
    if any(c.problem for c in contract) and fixed_batch(manifest) is None:
        from dsc_export.graph.model import load_model

        path = Path(split_dir) / manifest.model.path
        if path.is_file():
            contract = output_contract(manifest, constant_outputs(load_model(path, load_data=False)))
    for c in contract:
        if c.problem:
            raise UserError(c.problem)
    return contract
