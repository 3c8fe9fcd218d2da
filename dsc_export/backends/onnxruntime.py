"""onnxruntime, the embedded default backend (CPU execution provider; CUDA and TensorRT
execution providers where onnxruntime-gpu is installed).

An onnxruntime *engine* is the model with its batch dimension fixed and onnxruntime's graph
optimisations applied and saved (``optimized_model_filepath``): loading it skips the
optimisation, and at level ``all`` it holds the CPU-specific NCHWc layout, so like a TensorRT
engine it is tied to the instruction set and the onnxruntime version it was built with.

Sessions come from :func:`dsc_export.ort.make_session` (non-spinning; see that module).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.backends.base import Backend, BuildOptions, Runner, TensorSpec
from dsc_export.errors import BuildError, UserError, first_line
from dsc_export.graph.model import load_model
from dsc_export.graph.precision import to_float16_for_build
from dsc_export.inputs import SampleInputs
from dsc_export.ort import (  # noqa: F401  (re-exported: the backend's public names)
    OPTIMIZATION_LEVELS,
    ORT_DTYPES,
    cpu_isa,
    cpu_name,
    make_session,
    random_array,
    random_inputs,
    session_options,
)
from dsc_export.weight_store import externalize, write_blobs

PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


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
        """Open the onnxruntime session and read its input and output signatures."""
        self.session = make_session(self.path, self.threads, optimization=self.optimization, providers=self.providers)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), np.dtype(ORT_DTYPES.get(i.type, np.float32)))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), np.dtype(ORT_DTYPES.get(o.type, np.float32)))
                        for o in self.session.get_outputs()]
        self._names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on ``feeds``; every output by name."""
        return dict(zip(self._names, self.session.run(None, feeds)))

    def deactivate_impl(self) -> None:
        """Drop the session."""
        del self.session


class OnnxruntimeBackend(Backend):
    """onnxruntime engines: batch fixed, graph optimisations applied and saved; the weights in
    the shared store of the engine file's folder (``weights/<sha256>.bin``, ONNX external data;
    the split dir's own store, since engines sit beside the parts)."""

    suffix = ".onnx"
    extra = ""
    runs_onnx = True

    def __init__(self, name: str = "onnxruntime"):
        self.name = name
        self.providers = PROVIDERS[name]

    def available(self) -> str | None:
        """None when onnxruntime has this backend's execution provider, else the one-line reason."""
        import onnxruntime as ort

        if self.providers[0] not in ort.get_available_providers():
            return (f"{self.name} needs {self.providers[0]}, which this onnxruntime does not have "
                    f"({ort.__version__}, {', '.join(ort.get_available_providers())}); install "
                    "onnxruntime-gpu instead of onnxruntime (never both)")
        return None

    def target(self) -> dict[str, Any]:
        """Backend, onnxruntime version and execution provider, plus the CPU (name, ISA) or GPU
        the engines are optimised for.
        """
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

    def build(self, onnx_path, engine_path, *, batch, precision, options: BuildOptions, cache_dir=None,
              log=lambda s: None) -> None:
        """Save onnxruntime's optimised model of ``onnx_path`` at ``batch`` as the engine (see
        :meth:`Backend.build`); its weights go to the shared store of the engine's folder.

        Raises:
            BackendUnavailable: the execution provider is missing.
            BuildError: onnxruntime rejects the model.
        """
        import onnx


        self.check()
        model = fix_batch(load_model(onnx_path), batch)
        if precision == "fp16":
            model = to_float16_for_build(model, SampleInputs.random(model), log=log)
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
                raise BuildError(f"onnxruntime cannot build {onnx_path} at batch {batch}: {first_line(exc)}") from exc
            # The weights go to the shared store of the engine's folder (dsc_export.weight_store): engines of
            # other batch sizes and parts hold the same optimised tensors and share them.

            engine = onnx.load_model(os.fspath(out))
            write_blobs(engine_path.parent, externalize(engine))
            onnx.save_model(engine, os.fspath(out))
            os.replace(out, engine_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, engine_path, threads=None, *, profile=None) -> Runner:
        """A runner for an engine built by :meth:`build` (not yet active).

        Raises:
            BackendUnavailable: the execution provider is missing.
        """
        self.check()  # batch-fixed engines: no profiles (``profile`` is None)
        r = OnnxruntimeRunner(os.fspath(engine_path), threads)
        r.providers, r.optimization = self.providers, "none"  # optimised when built
        return r

    def load_onnx(self, onnx_path, threads=None) -> Runner:
        """A runner for an ONNX file as it is, fully optimised when activated.

        Raises:
            BackendUnavailable: the execution provider is missing.
        """
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


