"""onnxruntime, the embedded default backend (CPU execution provider).

Every session made here sets ``session.intra_op.allow_spinning`` to 0: several sessions in one
process (whole model, head and tail during verification; the server's tails later) otherwise
spin their thread pools against each other, which on a 2-core machine made the whole
EfficientNet-B0 2.5x slower.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dsc_export.errors import UserError

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


OPTIMIZATION_LEVELS = ("all", "extended", "basic", "none")


def session_options(threads: int | None = None, optimization: str = "all", arena: bool = True):
    """Return SessionOptions for a quiet, non-spinning CPU session.

    ``optimization`` is onnxruntime's graph optimisation level. ``all`` adds the NCHWc layout
    transform: fastest to run, but building it holds extra reordered copies of the conv weights
    (V2-L: 1.22 GB peak against 0.80 GB with ``extended``); one-off sessions use ``extended``.
    """
    import onnxruntime as ort

    levels = dict(zip(OPTIMIZATION_LEVELS, (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)))

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not arena:  # one-off runs (probes, verification): lower peak memory beats reuse
        opts.enable_cpu_mem_arena = False
    opts.graph_optimization_level = levels[optimization]
    return opts


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all",
                 arena: bool = True):
    """Create a CPU inference session for an ONNX file path or serialized model bytes.

    Args:
        model: path to an ONNX file (external data is found beside it) or its bytes.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        optimization: graph optimisation level, one of ``OPTIMIZATION_LEVELS``.
        arena: use onnxruntime's CPU memory arena (off: lower peak memory for one-off runs).

    Returns:
        An ``onnxruntime.InferenceSession`` running on ``CPUExecutionProvider``.
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else os.fspath(model),
            sess_options=session_options(threads, optimization, arena),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load the model: {first}") from exc


def random_inputs(session, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random feeds for every input of ``session`` with the batch dimension set to ``batch``.

    Integer inputs (raw uint8 images) get the full range of their type, float inputs a
    standard normal; no input is ever all zeros. Symbolic non-batch dimensions are an error.
    """
    feeds = {}
    for inp in session.get_inputs():
        dtype = ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise UserError(f"input '{inp.name}' has unsupported type {inp.type}")
        shape = []
        for axis, dim in enumerate(inp.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                raise UserError(
                    f"input '{inp.name}' has a symbolic dimension '{dim}' at axis {axis}; "
                    "only the batch dimension (axis 0) may be dynamic"
                )
        feeds[inp.name] = random_array(shape, dtype, rng)
    return feeds


def random_array(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """A random array of ``dtype``: the full range for integers, N(0, 1) for floats."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -128), min(info.max, 255)
        return rng.integers(lo, hi + 1, size=shape, dtype=dtype)
    return rng.standard_normal(size=shape).astype(dtype)
