"""Native TensorRT engines (TensorRT 10 and 11 Python APIs), memory and streams via cuda-python.

Build: the ONNX parser fills a strongly typed network (the only kind TensorRT 11 has; on 10 the
``STRONGLY_TYPED`` creation flag gives the same meaning), so the ONNX types are the precision:
fp16 is :func:`dsc_export.graph.precision.to_float16_for_build` applied before the build, never the FP16
builder flag that 11 removed. One optimisation profile with min = opt = max = the batch size, a
workspace limit, a timing cache shared by every build of one model and kept on disk, and
optional version-compatible / hardware-compatible engines. The engine is serialised to ``.plan``.

Run: ``execute_async_v3`` with named tensor addresses, device buffers and a stream from
:mod:`dsc_export.backends.cuda`; ``time_ms`` times the execution alone with CUDA events.

Both ``tensorrt`` and ``cuda`` are imported lazily; without them the backend reports a one-line
reason naming the ``tensorrt`` extra.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.backends.base import Backend, BuildOptions, Runner, TensorSpec
from dsc_export.errors import UserError, lazy_import

TIMING_CACHE = "tensorrt.timing-cache"


def _trt():
    return lazy_import("tensorrt", "tensorrt")


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


class _Logger:
    """A TensorRT logger that keeps the errors so a failed build can say why in one line."""

    def __init__(self, trt):
        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(str(msg))

        self.logger = L()

    def last(self) -> str:
        return self.logger.errors[-1] if self.logger.errors else "no message from TensorRT"


class TensorrtRunner(Runner):
    """Runs a deserialised engine with ``execute_async_v3`` on one stream."""

    def activate_impl(self) -> None:
        from dsc_export.backends import cuda

        trt = _trt()
        self._log = _Logger(trt)
        self._runtime = trt.Runtime(self._log.logger)
        if hasattr(self._runtime, "engine_host_code_allowed"):  # version-compatible engines carry a lean runtime
            self._runtime.engine_host_code_allowed = True
        data = Path(self.path).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise UserError(f"TensorRT cannot load '{self.path}': {self._log.last()} "
                            "(engines are tied to the GPU and TensorRT version they were built with)")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._timer = cuda.EventTimer()
        self._buffers: dict[str, Any] = {}
        self._host_out: dict[str, np.ndarray] = {}
        self.inputs, self.outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._engine.get_tensor_shape(name))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and any(d < 0 for d in shape):  # a dynamic dim: the profile fixes it (min = max)
                shape = tuple(self._engine.get_tensor_profile_shape(name, 0)[2])
                self._context.set_input_shape(name, shape)
            spec = TensorSpec(name, shape, dtype)
            (self.inputs if is_input else self.outputs).append(spec)
        for spec in self.outputs:  # output shapes are known once every input shape is set
            shape = tuple(self._context.get_tensor_shape(spec.name))
            self.outputs[self.outputs.index(spec)] = TensorSpec(spec.name, shape, spec.dtype)
        for spec in self.inputs + self.outputs:
            nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
            self._buffers[spec.name] = cuda.DeviceBuffer(nbytes)
            self._context.set_tensor_address(spec.name, int(self._buffers[spec.name]))
        for spec in self.outputs:
            self._host_out[spec.name] = np.empty(spec.shape, spec.dtype)

    def device_addresses(self) -> dict[str, int]:
        """Device pointers of every input and output (to feed or read device memory directly)."""
        return {name: int(buf) for name, buf in self._buffers.items()}

    def _upload(self, feeds: dict[str, np.ndarray]) -> None:
        for spec in self.inputs:
            arr = feeds[spec.name]
            if tuple(arr.shape) != spec.shape or arr.dtype != spec.dtype:
                raise UserError(f"'{spec.name}' must be {spec.dtype} {list(spec.shape)}, got "
                                f"{arr.dtype} {list(arr.shape)} (an engine has a fixed batch size)")
            self._buffers[spec.name].upload(arr, self._stream)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream.handle)):
            raise UserError(f"TensorRT execution failed for '{self.path}': {self._log.last()}")

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._upload(feeds)
        self._execute()
        for spec in self.outputs:
            self._buffers[spec.name].download(self._host_out[spec.name], self._stream)
        self._stream.synchronize()
        return {k: v.copy() for k, v in self._host_out.items()}

    def time_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """Device time of one execution (CUDA events around ``execute_async_v3``; copies excluded)."""
        self._upload(feeds)
        self._timer.record_start(self._stream)
        self._execute()
        self._timer.record_end(self._stream)
        return self._timer.elapsed_ms()

    def deactivate_impl(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._timer.close()
        self._stream.close()
        del self._context, self._engine, self._runtime


class TensorrtBackend(Backend):
    name = "tensorrt"
    suffix = ".plan"
    extra = "tensorrt"

    def available(self) -> str | None:
        try:
            _trt()
            from dsc_export.backends import cuda

            cuda.cudart()
            if cuda.device_count() == 0:
                return "the tensorrt backend needs an NVIDIA GPU and its driver; none is visible here"
        except UserError as exc:
            return str(exc)
        return None

    def target(self) -> dict[str, Any]:
        from dsc_export.backends.cuda import device_info

        trt = _trt()
        return {"backend": self.name, "version": str(trt.__version__), **device_info()}

    def compatible(self, target: dict[str, Any], options: dict[str, Any]) -> str | None:
        now = self.target()
        if options.get("version_compatible"):
            if trt_major(_trt()) < int(str(target.get("version", "0")).split(".")[0]):
                return f"TensorRT {target.get('version')} (built) is newer than {now['version']} (here)"
        elif target.get("version") != now["version"]:
            return f"TensorRT {target.get('version')} (built) != {now['version']} (here)"
        if not options.get("hardware_compatible") and target.get("compute_capability") != now["compute_capability"]:
            return f"compute capability {target.get('compute_capability')} (built) != {now['compute_capability']} (here)"
        return None

    def build(self, onnx_path, engine_path, batch, precision, options: BuildOptions, cache_dir=None,
              log=lambda s: None) -> None:
        from dsc_export.backends.cuda import OutOfDeviceMemory

        self.check()
        trt = _trt()
        log = _Logger(trt)
        src = Path(onnx_path)
        tmpdir = Path(tempfile.mkdtemp(prefix="dsc-trt-"))
        try:
            if precision == "fp16":  # TensorRT 11 has no FP16 flag: precision is in the ONNX types
                import onnx

                from dsc_export.graph.model import load_model
                from dsc_export.graph.precision import to_float16_for_build

                model = to_float16_for_build(load_model(src), log=log)
                src = tmpdir / "fp16.onnx"
                onnx.save(model, os.fspath(src), save_as_external_data=model.ByteSize() > 1_500_000_000,
                          location="fp16.onnx.data")
                del model
            builder = trt.Builder(log.logger)
            flags = 0
            strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if strongly is not None and trt_major(trt) < 11:
                flags |= 1 << int(strongly)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, log.logger)
            if not parser.parse_from_file(os.fspath(src)):
                errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise UserError(f"TensorRT's ONNX parser rejects {onnx_path}: {errs[0] if errs else log.last()}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb * 2**20)
            if precision == "fp32":  # TF32 is on by default on Ampere and newer: fp32 must mean fp32
                config.clear_flag(trt.BuilderFlag.TF32)
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                t = network.get_input(i)
                shape = list(t.shape)
                if shape and shape[0] < 0:
                    shape[0] = batch
                if any(d < 0 for d in shape):
                    raise UserError(f"input '{t.name}' of {onnx_path} has dynamic dims other than the batch: {shape}")
                profile.set_shape(t.name, shape, shape, shape)
            config.add_optimization_profile(profile)
            if options.version_compatible:
                config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if options.hardware_compatible:
                config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
            cache_file = Path(cache_dir) / TIMING_CACHE if cache_dir else None
            cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=True)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                last = log.last()
                if "memory" in last.lower():
                    raise OutOfDeviceMemory(f"out of GPU memory building {onnx_path} at batch {batch}: {last}")
                raise UserError(f"TensorRT could not build {onnx_path} at batch {batch}: {last}")
            engine_path = Path(engine_path)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_name(f".{engine_path.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(plan))
            os.replace(tmp, engine_path)
            if cache_file:  # the timing cache grows with every build; keep it for the next one
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                ctmp = cache_file.with_name(f".{cache_file.name}.tmp")
                ctmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
                os.replace(ctmp, cache_file)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def load(self, engine_path, threads=None) -> Runner:
        self.check()
        return TensorrtRunner(os.fspath(engine_path), threads)

    def trtexec_command(self, onnx_path, engine_path, input_name, input_shape, precision, options, cache_path) -> str:
        """One ``trtexec`` command line, every argument quoted for ``sh`` (:func:`shlex.join`).

        ``input_name`` None: the input is fully static and ``--shapes`` is left out (trtexec
        refuses it then). fp32 engines get ``--noTF32``: TensorRT would otherwise compute float32
        convolutions and matrix products in TF32 (10 mantissa bits) on Ampere and newer.
        """
        import shlex

        argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
        if input_name is not None:
            argv.append(f"--shapes={shape_spec(input_name, input_shape)}")
        argv += [f"--memPoolSize=workspace:{options.workspace_mb}M", f"--timingCacheFile={cache_path}",
                 "--stronglyTyped"]
        if precision == "fp32":
            argv.append("--noTF32")
        if options.version_compatible:
            argv.append("--versionCompatible")
        if options.hardware_compatible:
            argv.append("--hardwareCompatibilityLevel=ampere+")
        return shlex.join(argv)


def shape_spec(name: str, shape: list[int]) -> str:
    """trtexec's ``NAME:DxDxD`` for ``--shapes`` / ``--minShapes``: the name in single quotes, so
    that trtexec takes ``:`` and spaces as part of it (it splits a spec on the last ``:``).

    Raises:
        UserError: the name holds a ``,`` or a ``'``, which trtexec's shape specs cannot carry.
    """
    if "," in name or "'" in name:
        raise UserError(f"input '{name}' has a ',' or a \"'\" in its name, which trtexec's --shapes cannot "
                        "express; build with --backend tensorrt (the Python API) instead of --emit-trtexec")
    return f"'{name}':" + "x".join(str(int(d)) for d in shape)
