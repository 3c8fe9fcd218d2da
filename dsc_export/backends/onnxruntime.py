"""onnxruntime, the embedded default backend (CPU execution provider; CUDA and TensorRT
execution providers where onnxruntime-gpu is installed).

An onnxruntime *engine* is the model with its batch dimension fixed and onnxruntime's graph
optimisations applied and saved (``optimized_model_filepath``): loading it skips the
optimisation, and at level ``all`` it holds the CPU-specific NCHWc layout, so like a TensorRT
engine it is tied to the instruction set and the onnxruntime version it was built with.

Every session made here sets ``session.intra_op.allow_spinning`` to 0: several sessions in one
process (whole model, head and tail during verification; the server's tails, the client's heads)
otherwise spin their thread pools against each other, which on a 2-core machine made the whole
EfficientNet-B0 2.5x slower (``benchmarks/bench_engines.py`` measures it).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.backends.base import Backend, BuildOptions, Runner, TensorSpec
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


def session_options(threads: int | None = None, optimization: str = "all", arena: bool = True,
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


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all",
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
    """
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(
            model if isinstance(model, bytes) else os.fspath(model),
            sess_options=session_options(threads, optimization, arena, spinning),
            providers=providers,
        )
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise UserError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
    if sess.get_providers()[0] != providers[0]:
        raise UserError(f"onnxruntime did not load {providers[0]} (the session runs on "
                        f"{', '.join(sess.get_providers())}); check the CUDA/TensorRT libraries "
                        "onnxruntime-gpu needs")
    return sess


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


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


def fix_batch(model, batch: int):
    """Set the batch dimension (axis 0) of every input of ``model`` to ``batch``, and every output
    dimension named like an input's batch dimension, in place.

    Other output dimensions are left as declared: an output may hold its batch on another axis
    (``[classes, N]``) or none at all (a constant table), and a fixed size there is not a batch.

    Raises:
        UserError: an input's batch dimension is fixed to another size.
    """
    inits = {t.name for t in model.graph.initializer}
    names = set()
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        if dims[0].HasField("dim_value") and dims[0].dim_value not in (0, batch):
            raise UserError(f"input '{vi.name}' has a fixed batch size {dims[0].dim_value}; cannot build for {batch}")
        if dims[0].dim_param:
            names.add(dims[0].dim_param)
        dims[0].dim_value = batch
    for vi in model.graph.output:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in names:
                d.dim_value = batch
    return model


class OnnxruntimeRunner(Runner):
    """Runs an ONNX file or an onnxruntime engine in one session."""

    providers: list[str] | None = None
    optimization: str = "none"

    def activate_impl(self) -> None:
        self.session = make_session(self.path, self.threads, self.optimization, providers=self.providers)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), np.dtype(ORT_DTYPES.get(i.type, np.float32)))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), np.dtype(ORT_DTYPES.get(o.type, np.float32)))
                        for o in self.session.get_outputs()]
        self._names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self.session.run(None, feeds)))

    def deactivate_impl(self) -> None:
        del self.session


class OnnxruntimeBackend(Backend):
    """onnxruntime engines: batch fixed, graph optimisations applied and saved; the weights in
    the engine folder's shared store (``weights/<sha256>.bin``, ONNX external data)."""

    suffix = ".onnx"
    extra = ""
    runs_onnx = True

    def __init__(self, name: str = "onnxruntime"):
        self.name = name
        self.providers = PROVIDERS[name]

    def available(self) -> str | None:
        import onnxruntime as ort

        if self.providers[0] not in ort.get_available_providers():
            return (f"{self.name} needs {self.providers[0]}, which this onnxruntime does not have "
                    f"({ort.__version__}, {', '.join(ort.get_available_providers())}); install "
                    "onnxruntime-gpu instead of onnxruntime (never both)")
        return None

    def target(self) -> dict[str, Any]:
        import onnxruntime as ort

        t = {"backend": self.name, "version": ort.__version__, "provider": self.providers[0]}
        if self.providers[0] == "CPUExecutionProvider":
            t.update(device=cpu_name(), isa=cpu_isa())
        else:
            t.update(_gpu_target())
        return t

    def compatible(self, target: dict[str, Any], options: dict[str, Any]) -> str | None:
        """None when an engine built for ``target`` runs here as built, else what differs."""
        now = self.target()
        for key in ("version", "isa", "compute_capability"):
            if key in target and target.get(key) != now.get(key):
                return f"{key} {target.get(key)} (built) != {now.get(key)} (here)"
        return None

    def build(self, onnx_path, engine_path, batch, precision, options: BuildOptions, cache_dir=None,
              log=lambda s: None) -> None:
        import onnx

        from dsc_export.graph.model import load_model
        from dsc_export.graph.precision import to_float16_for_build

        self.check()
        model = fix_batch(load_model(onnx_path), batch)
        if precision == "fp16":
            model = to_float16_for_build(model, log=log)
        engine_path = Path(engine_path)
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=engine_path.parent, prefix=f".{engine_path.name}.tmp-"))
        try:
            src = tmp / "src.onnx"
            large = model.ByteSize() > 1_500_000_000 if model.ByteSize() >= 0 else True
            onnx.save(model, os.fspath(src), save_as_external_data=large, location="src.onnx.data")
            del model
            level = options.optimization if self.providers[0] == "CPUExecutionProvider" else "basic"
            opts = session_options(optimization=level, arena=False)
            out = tmp / engine_path.name
            opts.optimized_model_filepath = os.fspath(out)
            if large:  # over protobuf's 2 GB: onnxruntime writes the weights to a file beside it first
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              engine_path.name + ".data")
            import onnxruntime as ort

            try:
                ort.InferenceSession(os.fspath(src), sess_options=opts, providers=self.providers)
            except Exception as exc:
                raise UserError(f"onnxruntime cannot build {onnx_path} at batch {batch}: {_first_line(exc)}") from exc
            # The weights go to the engine folder's shared store (dsc_export.weight_store): engines of
            # other batch sizes and parts hold the same optimised tensors and share them.
            from dsc_export.weight_store import externalize, write_blobs

            engine = onnx.load_model(os.fspath(out))
            write_blobs(engine_path.parent, externalize(engine))
            onnx.save_model(engine, os.fspath(out))
            os.replace(out, engine_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, engine_path, threads=None) -> Runner:
        self.check()
        r = OnnxruntimeRunner(os.fspath(engine_path), threads)
        r.providers, r.optimization = self.providers, "none"  # optimised when built
        return r

    def load_onnx(self, onnx_path, threads=None) -> Runner:
        self.check()
        r = OnnxruntimeRunner(os.fspath(onnx_path), threads)
        r.providers, r.optimization = self.providers, "all"
        return r


def _gpu_target() -> dict[str, Any]:
    from dsc_export.backends.cuda import device_info

    try:
        return device_info()
    except UserError:
        return {}


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
