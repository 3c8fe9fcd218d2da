"""onnxruntime sessions, random feeds and host facts: the leaf every layer may use.

``graph/`` (shape probes, float16 activation ranges), ``inputs``, ``splitting``, ``engines``,
``profiling`` and ``serving`` all run ONNX models through onnxruntime; the helpers they share
live here, importing nothing of the package but :mod:`dsc_export.errors`, so no layer has to
import the onnxruntime *backend* (``backends/onnxruntime.py``, which builds engines) to run a
model.

Every session made here sets ``session.intra_op.allow_spinning`` to 0: several sessions in one
process (whole model, head and tail during verification; the server's tails, the client's heads)
otherwise spin their thread pools against each other, which on a 2-core machine made the whole
EfficientNet-B0 2.5x slower (``benchmarks/bench_engines.py`` measures it).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.errors import UserError, first_line

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


def session_options(threads: int | None = None, *, optimization: str = "all", arena: bool = True,
                    spinning: bool = False):
    """Return SessionOptions for a quiet, non-spinning CPU session.

    ``optimization`` is onnxruntime's graph optimisation level. ``all`` adds the NCHWc layout
    transform: fastest to run, but building it holds extra reordered copies of the conv weights
    (V2-L: 1.22 GB peak against 0.80 GB with ``extended``); one-off sessions use ``extended``.
    ``spinning`` is onnxruntime's own default, kept only so the benchmark can show its cost.
    """
    import onnxruntime as ort

    levels = dict(zip(OPTIMIZATION_LEVELS, (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)))

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failed run is reported by us in one line
    spin = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not arena:  # one-off runs (probes, verification): lower peak memory beats reuse
        opts.enable_cpu_mem_arena = False
    opts.graph_optimization_level = levels[optimization]
    return opts


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, *, optimization: str = "all",
                 arena: bool = True, providers: list[str] | None = None, spinning: bool = False):
    """Create a CPU inference session for an ONNX file path or serialized model bytes.

    Args:
        model: path to an ONNX file (external data is found beside it) or its bytes.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        optimization: graph optimisation level, one of ``OPTIMIZATION_LEVELS``.
        arena: use onnxruntime's CPU memory arena (off: lower peak memory for one-off runs).
        providers: execution providers in order of preference [default: CPU only]. The first
            one must be what the session runs on: onnxruntime silently falls back to the next,
            so this checks ``session.get_providers()`` and refuses a session that fell back.
        spinning: let idle threads spin (onnxruntime's default; see the module docstring).

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        UserError: onnxruntime cannot load the model, or did not load the requested provider.
    """
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(
            model if isinstance(model, bytes) else os.fspath(model),
            sess_options=session_options(threads, optimization=optimization, arena=arena, spinning=spinning),
            providers=providers,
        )
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise UserError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc
    if sess.get_providers()[0] != providers[0]:
        raise UserError(f"onnxruntime did not load {providers[0]} (the session runs on "
                        f"{', '.join(sess.get_providers())}); check the CUDA/TensorRT libraries "
                        "onnxruntime-gpu needs")
    return sess


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest vector instruction set onnxruntime's CPU kernels pick (NCHWc block size follows it)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    for isa in ("avx512f", "avx2", "avx", "sse4_1"):
        if f" {isa}" in flags:
            return isa
    return platform.machine()


def random_inputs(session, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random feeds for every input of ``session`` with the batch dimension set to ``batch``.

    Integer inputs (raw uint8 images) get the full range of their type, float inputs a
    standard normal; no input is ever all zeros. Symbolic non-batch dimensions are an error.

    Raises:
        UserError: an input of an unsupported type, or a symbolic dimension other than the batch.
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
