"""Native TensorRT engines (TensorRT 10 and 11 Python APIs), memory and streams via cuda-python.

Build: the ONNX parser fills a strongly typed network (the only kind TensorRT 11 has; on 10 the
``STRONGLY_TYPED`` creation flag gives the same meaning), so the ONNX types are the precision:
fp16 is :func:`dsc_export.graph.precision.to_float16_for_build` applied before the build, never the FP16
builder flag that 11 removed. One engine per part serves every batch size: one ``IBuilderConfig``
with one optimisation profile per batch size (min = opt = max = that batch, profile ``k`` for the
``k``-th size), so the weights are in the engine once (TensorRT shares them across the profiles
of one engine). A workspace limit, a timing cache shared by every build of one model and kept on
disk, and optional version-compatible / hardware-compatible engines. The engine is serialised to
``.plan``.

Run: a runner runs one profile (the one serving its batch size, recorded in the manifest): it
selects it with ``set_optimization_profile_async(index, stream)`` and then sets the input shapes,
as Polygraphy's ``TrtRunner`` and trtexec do; runners of one file share the deserialised engine
(one copy of the weights on the GPU), each with its own execution context (TensorRT: each
context in concurrent use needs its own profile). ``execute_async_v3`` with named tensor
addresses, device buffers and a stream from :mod:`dsc_export.backends.cuda`; ``time_ms`` times
the execution alone with CUDA events. Source: TensorRT developer guide, "Working with Dynamic
Shapes" / "Optimization Profiles", and the Python API (``IOptimizationProfile``,
``IExecutionContext.set_optimization_profile_async``, ``ICudaEngine.get_tensor_profile_shape``).

Both ``tensorrt`` and ``cuda`` are imported lazily; without them the backend reports a one-line
reason naming the ``tensorrt`` extra.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsc_export.backends.base import Backend, BackendOptions, BuildOptions, Runner, TensorSpec
from dsc_export.errors import BuildError, EngineLoadError, InferenceError, UserError, lazy_import
from dsc_export.graph.model import load_model
from dsc_export.graph.precision import to_float16_for_build
from dsc_export.inputs import SampleInputs

TIMING_CACHE = "tensorrt.timing-cache"


def _trt():
    return lazy_import("tensorrt", "tensorrt")


def trt_major(trt) -> int:
    """The major version of the ``tensorrt`` module ``trt``."""
    return version_tuple(trt.__version__)[0]


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"10.13.0.35"`` -> ``(10, 13, 0)``: (major, minor, patch), missing parts 0, the build left out."""
    nums = [int(n) for n in re.findall(r"\d+", str(version))[:3]]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


class ErrorLog:
    """The one TensorRT logger of this process, keeping the errors it receives.

    TensorRT keeps one logger per process while any builder or runtime lives (``createInferBuilder``
    / ``createInferRuntime``: a different logger passed later is ignored with a warning), so
    every builder, runtime and parser here gets this one. A call reads only the errors it added:
    ``mark = log.mark()`` before, ``log.reason(mark)`` after. Calls running in parallel threads
    may see each other's errors.
    """

    def __init__(self, trt):
        errors: list[str] = []
        lock = threading.Lock()
        severe = (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in severe:
                    with lock:
                        errors.append(" ".join(str(msg).split()))

        self.trt = trt
        self.errors = errors
        self.logger = Logger()

    def mark(self) -> int:
        """Where the errors of the call about to be made will start."""
        return len(self.errors)

    def reason(self, mark: int) -> str:
        """The first error logged since ``mark`` (and how many more), on one line."""
        new = self.errors[mark:]
        if not new:
            return "no message from TensorRT"
        return new[0] + (f" (and {len(new) - 1} more)" if len(new) > 1 else "")


_ERROR_LOG: ErrorLog | None = None


def error_log(trt) -> ErrorLog:
    """This process's :class:`ErrorLog` (made on first use; a new one if ``tensorrt`` was re-imported)."""
    global _ERROR_LOG
    if _ERROR_LOG is None or _ERROR_LOG.trt is not trt:
        _ERROR_LOG = ErrorLog(trt)
    return _ERROR_LOG


class _Engines:
    """Deserialised engines shared by the runners of one file (one copy of the weights on the
    GPU however many profiles run): file -> [runtime, engine, users]."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: dict[tuple, list] = {}

    def acquire(self, trt, path: str, log: ErrorLog) -> tuple[tuple, Any]:
        """The deserialised engine of ``path`` (loaded on first use) and the key to release it.

        Raises:
            EngineLoadError: TensorRT cannot deserialise the file (its first error, one line).
        """
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, id(trt))
        with self.lock:
            if key not in self.held:
                mark = log.mark()
                runtime = trt.Runtime(log.logger)
                runtime.engine_host_code_allowed = True  # version-compatible engines carry a lean runtime
                engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
                if engine is None:
                    raise EngineLoadError(f"TensorRT cannot load '{path}': {log.reason(mark)} "
                                          "(engines are tied to the GPU and TensorRT version they were built with)")
                self.held[key] = [runtime, engine, 0]
            self.held[key][2] += 1
            return key, self.held[key][1]

    def release(self, key: tuple) -> None:
        """One user fewer of ``key``'s engine; the last one frees the engine, then its runtime."""
        with self.lock:
            held = self.held.get(key)
            if held is not None:
                held[2] -= 1
                if held[2] <= 0:  # the engine before the runtime, as TensorRT requires
                    held[1] = None
                    del self.held[key]


_ENGINES = _Engines()


class TensorrtRunner(Runner):
    """Runs one optimisation profile of a deserialised engine with ``execute_async_v3`` on one stream.

    ``profile``: the profile to run (None: profile 0, an engine of one profile). Every input and
    output is staged through page-locked host memory (as NVIDIA's samples do) and has one device
    buffer; what activation made is released if it fails part-way.
    """

    _engine_key = _engine = _context = _stream = _timer = None
    profile: int | None = None

    def activate_impl(self) -> None:
        """Deserialise the engine, select its profile, and allocate device buffers and pinned
        host arrays for every input and output.

        Raises:
            EngineLoadError: TensorRT cannot load the engine or refuses the profile or a shape.
        """
        from dsc_export.backends import cuda

        self._buffers: dict[str, Any] = {}
        self._pinned: dict[str, Any] = {}
        try:
            self._activate(_trt(), cuda)
        except BaseException:
            self.deactivate_impl()
            raise

    def _activate(self, trt, cuda) -> None:
        log = error_log(trt)
        mark = log.mark()
        self._engine_key, self._engine = _ENGINES.acquire(trt, self.path, log)
        count = self._engine.num_optimization_profiles
        k = 0 if self.profile is None else self.profile
        if not (isinstance(k, int) and 0 <= k < count):
            raise EngineLoadError(f"'{self.path}' has {count} optimisation profile(s), not profile {k}; the "
                                  "manifest and the engine disagree (rebuild with dsc-export build)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineLoadError(f"TensorRT cannot create an execution context for '{self.path}' "
                            f"(out of GPU memory?): {log.reason(mark)}")
        self._stream = cuda.Stream()
        self._timer = cuda.EventTimer()
        # the profile first, then the input shapes within it (TensorRT: selecting a profile
        # invalidates the shapes set before)
        if self.profile is not None and not self._context.set_optimization_profile_async(k, int(self._stream.handle)):
            raise EngineLoadError(f"TensorRT refuses optimisation profile {k} of '{self.path}': {log.reason(mark)}")
        self.inputs, self.outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._engine.get_tensor_shape(name))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and any(d < 0 for d in shape):  # a dynamic dim: the profile fixes it (min = max)
                shape = tuple(self._engine.get_tensor_profile_shape(name, k)[2])
                if not self._context.set_input_shape(name, shape):
                    raise EngineLoadError(f"TensorRT refuses shape {list(shape)} for input '{name}' of "
                                    f"'{self.path}': {log.reason(mark)}")
            (self.inputs if is_input else self.outputs).append(TensorSpec(name, shape, dtype))
        # output shapes are known once every input shape is set
        self.outputs = [TensorSpec(s.name, tuple(self._context.get_tensor_shape(s.name)), s.dtype)
                        for s in self.outputs]
        for spec in self.inputs + self.outputs:
            nbytes = int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
            self._buffers[spec.name] = cuda.DeviceBuffer(nbytes)
            self._pinned[spec.name] = cuda.PinnedArray(spec.shape, spec.dtype)
            if not self._context.set_tensor_address(spec.name, int(self._buffers[spec.name])):
                raise EngineLoadError(f"TensorRT refuses the device address of '{spec.name}' in '{self.path}': "
                                f"{log.reason(mark)}")

    def device_addresses(self) -> dict[str, int]:
        """Device pointers of every input and output (to feed or read device memory directly)."""
        return {name: int(buf) for name, buf in self._buffers.items()}

    def _upload(self, feeds: dict[str, np.ndarray]) -> None:
        for spec in self.inputs:
            arr = feeds[spec.name]
            if tuple(arr.shape) != spec.shape or arr.dtype != spec.dtype:
                raise InferenceError(f"'{spec.name}' must be {spec.dtype} {list(spec.shape)}, got "
                                f"{arr.dtype} {list(arr.shape)} (an engine has a fixed batch size)")
            staged = self._pinned[spec.name].array
            np.copyto(staged, arr)
            self._buffers[spec.name].upload(staged, self._stream)

    def _execute(self) -> None:
        log = error_log(_trt())
        mark = log.mark()
        if not self._context.execute_async_v3(int(self._stream.handle)):
            raise InferenceError(f"TensorRT execution failed for '{self.path}': {log.reason(mark)}")

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``feeds`` to the device, execute, copy every output back; outputs by name.

        Raises:
            InferenceError: an input of the wrong dtype or shape, or a failed execution.
        """
        self._upload(feeds)
        self._execute()
        for spec in self.outputs:
            self._buffers[spec.name].download(self._pinned[spec.name].array, self._stream)
        self._stream.synchronize()
        return {spec.name: self._pinned[spec.name].array.copy() for spec in self.outputs}

    def time_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """Device time of one execution (CUDA events around ``execute_async_v3``; copies excluded)."""
        self._upload(feeds)
        self._timer.record_start(self._stream)
        self._execute()
        self._timer.record_end(self._stream)
        ms = self._timer.elapsed_ms()
        self._stream.synchronize()
        return ms

    def deactivate_impl(self) -> None:
        """Release what activation made, whatever it got to: buffers, stream, event, context, engine."""
        for buf in [*self._buffers.values(), *self._pinned.values()]:
            buf.free()
        self._buffers, self._pinned = {}, {}
        for res in (self._timer, self._stream):
            if res is not None:
                res.close()
        # the context before the engine before the runtime, as TensorRT requires
        self._timer = self._stream = self._context = None
        self._engine = None
        if self._engine_key is not None:
            _ENGINES.release(self._engine_key)
        self._engine_key = None


def engine_compatibility(built: dict[str, Any], here: dict[str, Any], options: dict[str, Any]) -> str | None:
    """Whether an engine built for ``built`` with ``options`` runs on ``here``: None, or what differs.

    Args:
        built, here: targets (``version``: TensorRT version, ``compute_capability``: ``"8.6"``).
        options: the engine's build options (``version_compatible``, ``hardware_compatible``).

    A version-compatible engine runs on the same or a later TensorRT, compared as
    (major, minor, patch); any other engine on the exact version it was built with. A
    hardware-compatible engine (``AMPERE_PLUS``) runs on compute capability 8.0 and newer, any
    other on the compute capability it was built on. Source: TensorRT developer guide, "Version
    Compatibility" and "Hardware Compatibility" (10.x, 11.x).
    """
    b_ver, h_ver = str(built.get("version")), str(here["version"])
    if options.get("version_compatible"):
        if version_tuple(h_ver) < version_tuple(b_ver):
            return (f"TensorRT {b_ver} (built) is newer than {h_ver} (here): a version-compatible engine "
                    "runs on the same or a later TensorRT only")
    elif b_ver != h_ver:
        return f"TensorRT {b_ver} (built) != {h_ver} (here)"
    b_cc, h_cc = built.get("compute_capability"), str(here["compute_capability"])
    if options.get("hardware_compatible"):
        if version_tuple(h_cc)[:2] < (8, 0):
            return (f"a hardware-compatible (Ampere and newer) engine needs compute capability 8.0 or "
                    f"newer; this GPU has {h_cc}")
    elif b_cc != h_cc:
        return f"compute capability {b_cc} (built) != {h_cc} (here)"
    return None


@dataclass(frozen=True, kw_only=True)
class TensorrtOptions(BackendOptions):
    """What changes a TensorRT engine.

    Attributes:
        workspace_mb: the builder's workspace limit, MiB.
        version_compatible: engines that run on later TensorRT versions (lean runtime).
        hardware_compatible: engines that run on every Ampere or newer GPU.
    """

    workspace_mb: int = 4096
    version_compatible: bool = False
    hardware_compatible: bool = False


class TensorrtBackend(Backend):
    """TensorRT engines (``.plan``): one per part, one optimisation profile per batch size."""

    name = "tensorrt"
    suffix = ".plan"
    extra = "tensorrt"
    profiles = True  # one engine per part, one optimisation profile per batch size
    options_type = TensorrtOptions

    def available(self) -> str | None:
        """None when TensorRT, cuda-python and a CUDA device are usable here, else the one-line reason."""
        try:
            _trt()
            from dsc_export.backends import cuda

            why = cuda.no_device_reason()
            if why:
                return f"the tensorrt backend needs an NVIDIA GPU and its driver: {why}"
        except UserError as exc:
            return str(exc)
        return None

    def target(self) -> dict[str, Any]:
        """Backend, TensorRT version and the CUDA device (name, compute capability, memory)."""
        from dsc_export.backends.cuda import device_info

        trt = _trt()
        return {"backend": self.name, "version": str(trt.__version__), **device_info()}

    def compatible(self, target: dict[str, Any], options: dict[str, Any]) -> str | None:
        """None when an engine built for ``target`` with ``options`` runs on this device and
        TensorRT version, else what differs.
        """
        return engine_compatibility(target, self.target(), options)

    def build(self, onnx_path, engine_path, *, batch, precision,
              options: TensorrtOptions | BuildOptions | None, cache_dir=None,
              log=lambda s: None) -> None:
        """Build one engine of ``onnx_path`` with one optimisation profile per batch size.

        Args:
            batch: a batch size or a list of them; profile ``k`` has min = opt = max = the
                ``k``-th size (so the runner of that size selects profile ``k``).
            (the others: :meth:`Backend.build`)

        Raises:
            BuildError: the parser, the profiles or the build failed (TensorRT's first error,
                one line); an input with dynamic dims other than the batch; several batch sizes
                for a fully static input.
            OutOfDeviceMemory: the build ran out of GPU memory.
        """
        from dsc_export.backends.cuda import OutOfDeviceMemory

        options = TensorrtOptions.pick(options)
        batches = [int(b) for b in ([batch] if isinstance(batch, int) else batch)]
        label = f"batch {batches[0]}" if len(batches) == 1 else f"batch sizes {', '.join(map(str, batches))}"
        self.check()
        trt = _trt()
        elog = error_log(trt)
        mark = elog.mark()
        src = Path(onnx_path)
        tmpdir = Path(tempfile.mkdtemp(prefix="dsc-trt-"))
        try:
            if precision == "fp16":  # TensorRT 11 has no FP16 flag: precision is in the ONNX types
                import onnx


                model = load_model(src)
                model = to_float16_for_build(model, SampleInputs.random(model), log=log)
                src = tmpdir / "fp16.onnx"
                onnx.save(model, os.fspath(src), save_as_external_data=model.ByteSize() > 1_500_000_000,
                          location="fp16.onnx.data")
                del model
            builder = trt.Builder(elog.logger)
            flags = 0
            strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if strongly is not None and trt_major(trt) < 11:
                flags |= 1 << int(strongly)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, elog.logger)
            if not parser.parse_from_file(os.fspath(src)):
                errs = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
                raise BuildError(f"TensorRT's ONNX parser rejects {onnx_path}: "
                                f"{errs[0] if errs else elog.reason(mark)}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb * 2**20)
            if precision == "fp32":  # TF32 is on by default on Ampere and newer: fp32 must mean fp32
                config.clear_flag(trt.BuilderFlag.TF32)
            inputs = [network.get_input(i) for i in range(network.num_inputs)]
            if len(batches) > 1 and all(t.shape and t.shape[0] >= 0 for t in inputs):
                raise BuildError(f"the inputs of {onnx_path} have a fixed batch size: one profile, not {label}")
            for b in batches:  # profile k serves batches[k]
                profile = builder.create_optimization_profile()
                for t in inputs:
                    shape = list(t.shape)
                    if shape and shape[0] < 0:
                        shape[0] = b
                    if any(d < 0 for d in shape):
                        raise BuildError(f"input '{t.name}' of {onnx_path} has dynamic dims other than the batch: "
                                         f"{shape}")
                    profile.set_shape(t.name, shape, shape, shape)
                if config.add_optimization_profile(profile) < 0:
                    raise BuildError(f"TensorRT refuses the optimisation profile of {onnx_path} at batch {b}: "
                                     f"{elog.reason(mark)}")
            if options.version_compatible:
                config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if options.hardware_compatible:
                config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
            cache_file = Path(cache_dir) / TIMING_CACHE if cache_dir else None
            cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=True)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                last = elog.reason(mark)
                if "memory" in last.lower():
                    raise OutOfDeviceMemory(f"out of GPU memory building {onnx_path} at {label}: {last}")
                raise BuildError(f"TensorRT could not build {onnx_path} at {label}: {last}")
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

    def load(self, engine_path, threads=None, *, profile=None) -> Runner:
        """A runner of ``profile`` (the optimisation profile serving one batch size; None: 0).
        A profile the engine does not have is refused in one line when it is activated."""
        self.check()
        runner = TensorrtRunner(os.fspath(engine_path), threads)
        runner.profile = profile
        return runner

    def trtexec_command(self, onnx_path, engine_path, *, input_name, input_shapes, precision, options,
                        cache_path) -> str:
        """The ``trtexec`` line of what :meth:`build` builds: ``input_shapes`` holds the input's
        shape per optimisation profile, in profile order (profile K: min = opt = max = the K-th
        shape); ``input_name`` None: the input is fully static (no shapes). See
        :func:`trtexec_line`."""
        profiles = [] if input_name is None else [(s, s, s) for s in input_shapes]
        return trtexec_line(onnx_path, engine_path, precision=precision, input_name=input_name,
                            profiles=profiles, options=TensorrtOptions.pick(options),
                            cache_path=cache_path)


def trtexec_line(onnx_path: str, engine_path: str, *, precision: str, input_name: str | None = None,
                 profiles: list[tuple[list[int], list[int], list[int]]] = (), numbered: bool = True,
                 options: TensorrtOptions | None = None, cache_path: str | None = None) -> str:
    """One ``trtexec`` command line, every argument quoted for ``sh`` (:func:`shlex.join`): the one
    writer of trtexec lines (``build --emit-trtexec`` and a server bundle's ``build-plans.sh``).

    Args:
        onnx_path, engine_path: the ``--onnx`` and ``--saveEngine`` paths, as the script sees them.
        precision: ``fp32`` engines get ``--noTF32``: TensorRT would otherwise compute float32
            convolutions and matrix products in TF32 (10 mantissa bits) on Ampere and newer, as
            :meth:`TensorrtBackend.build` clears it. ``fp16``: the ONNX's types decide.
        input_name: the input the shapes are for; None: fully static, no shapes (trtexec refuses
            them then).
        profiles: (min, opt, max) shapes per optimisation profile, in profile order.
        numbered: each profile after ``--profile=K`` (trtexec's build options, TensorRT 10 and
            11: the shapes after ``--profile=K`` belong to profile K); False: one profile, unnamed.
        options: the workspace and compatibility flags; None: trtexec's defaults.
        cache_path: the ``--timingCacheFile``; None: no timing cache.

    Raises:
        UserError: an input name trtexec's shape specs cannot carry (:func:`shape_spec`).
    """
    import shlex

    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if input_name is not None:
        for k, shapes in enumerate(profiles):
            argv += [f"--profile={k}"] if numbered else []
            argv += [f"--{w}Shapes={shape_spec(input_name, s)}" for w, s in zip(("min", "opt", "max"), shapes)]
    if options is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mb}M")
    if cache_path is not None:
        argv.append(f"--timingCacheFile={cache_path}")
    argv.append("--stronglyTyped")
    if precision == "fp32":
        argv.append("--noTF32")
    if options is not None and options.version_compatible:
        argv.append("--versionCompatible")
    if options is not None and options.hardware_compatible:
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
