"""A strict double of the ``tensorrt`` Python module, TensorRT 10.x and 11.x, for CPU-only CI.

Contract read from TensorRT's own binding sources, release/10.0 and release/11.1 of
github.com/NVIDIA/TensorRT: ``python/src/infer/pyCore.cpp`` (ILogger and its Severity, Builder,
IBuilderConfig, IOptimizationProfile, ITimingCache, Runtime, ICudaEngine, IExecutionContext, the
BuilderFlag / MemoryPoolType / NetworkDefinitionCreationFlag / HardwareCompatibilityLevel /
TensorIOMode enums), ``python/src/infer/pyFoundationalTypes.cpp`` (DataType),
``python/src/parsers/pyOnnx.cpp`` (OnnxParser, ParserError) and
``python/packaging/bindings_wheel/tensorrt/__init__.py`` (``nptype``); behaviour from the
TensorRT developer guide (one logger per process; ``TF32`` on by default; version and hardware
compatibility) and NVIDIA's ``samples/python/common_runtime.py``.

What differs between the versions is what the sources say: 11.x has no ``FP16``, ``BF16``,
``INT8``, ``FP8``, ``OBEY_PRECISION_CONSTRAINTS`` / ``PREFER_PRECISION_CONSTRAINTS`` builder
flags and no ``EXPLICIT_BATCH`` network flag (``STRONGLY_TYPED`` remains, deprecated: networks
are always strongly typed), and adds ``SAME_COMPUTE_CAPABILITY``.

Strict: a missing enum member or an unknown attribute raises AttributeError (on the module and
on every object; only properties the bindings define can be set), a wrong argument count or
name raises TypeError (the parameter names are the bindings' ``"name"_a``), and a logger
subclass must call ``ILogger.__init__``. Calls are recorded in :attr:`TrtDouble.calls`.

"Engines" are JSON: the I/O tensors with their profile shapes, and the build flags; running
one doubles every input into the output of the same index (so data paths can be checked),
through the :class:`~doubles.cudart.CudaDouble`'s streams.
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass, field

import numpy as np

from doubles.cudart import CudaDouble

BUILDER_FLAGS_10 = ["FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                    "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS",
                    "DISABLE_COMPILATION_CACHE", "WEIGHTLESS", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING"]
BUILDER_FLAGS_11 = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32",
                    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME",
                    "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL",
                    "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY",
                    "DISTRIBUTIVE_INDEPENDENCE"]
NETWORK_FLAGS = {10: ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
                 11: ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"]}
HW_LEVELS = {10: ["NONE", "AMPERE_PLUS"], 11: ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]}
DATA_TYPES = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4"]
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}  # nptype(): fp8, bf16, int4 have no numpy type
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8", 7: "INT64", 16: "BF16"}


class Strict:
    """No attribute beyond what the class defines; only properties with a setter can be set."""

    def __setattr__(self, name, value):
        prop = getattr(type(self), name, None)
        if not name.startswith("_") and not (isinstance(prop, property) and prop.fset):
            raise AttributeError(f"'{type(self).__name__}' object attribute '{name}' is read-only or unknown")
        object.__setattr__(self, name, value)


@dataclass
class TrtDouble:
    """A fake ``tensorrt`` (:attr:`module`) and the knobs and records behind it.

    Attributes:
        major: 10 or 11 (``__version__`` is ``version``).
        cuda: the CUDA runtime double the engines execute on.
        parser_errors: what ``parse_from_file`` reports (non-empty: it returns False).
        build_error: ``build_serialized_network`` logs this and returns None.
        deserialize_ok, context_ok, input_shape_ok, address_ok, execute_ok: False makes that
            call fail as TensorRT does (None / False, with an error logged).
        calls: ``(Class.method, args)`` in call order.
        loggers: every logger a Builder, Runtime or OnnxParser received.
    """

    major: int = 10
    version: str = ""
    cuda: CudaDouble = field(default_factory=CudaDouble)
    parser_errors: list[str] = field(default_factory=list)
    build_error: str | None = None
    deserialize_ok: bool = True
    context_ok: bool = True
    input_shape_ok: bool = True
    address_ok: bool = True
    execute_ok: bool = True
    calls: list[tuple[str, tuple]] = field(default_factory=list)
    loggers: list = field(default_factory=list)
    module: types.ModuleType = None  # type: ignore[assignment]

    def __post_init__(self):
        self.version = self.version or ("10.13.0.35" if self.major == 10 else "11.1.0.6")
        self.module = _make_module(self)

    def called(self, name: str) -> list[tuple]:
        """The arguments of every call of ``Class.method``."""
        return [args for n, args in self.calls if n == name]

    def plan(self, inputs: list[tuple[str, list[int], str]], outputs: list[tuple[str, list[int], str]],
             batch: int, **build) -> bytes:
        """A serialised fake engine: (name, shape with -1 for the batch, DataType name) per tensor."""
        return json.dumps({"version": self.version, "build": build, "tensors": [
            {"name": n, "shape": s, "dtype": t, "mode": mode, "batch": batch}
            for mode, group in (("INPUT", inputs), ("OUTPUT", outputs)) for n, s, t in group]}).encode()


def _make_module(d: TrtDouble) -> types.ModuleType:  # noqa: C901 - one closure per class, as the bindings
    mod = types.ModuleType("tensorrt")
    mod.__version__ = d.version
    flags = BUILDER_FLAGS_10 if d.major == 10 else BUILDER_FLAGS_11
    BuilderFlag = enum.IntEnum("BuilderFlag", [(n, i) for i, n in enumerate(flags)])
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                 [(n, i) for i, n in enumerate(NETWORK_FLAGS[d.major])])
    HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel",
                                              [(n, i) for i, n in enumerate(HW_LEVELS[d.major])])
    MemoryPoolType = enum.IntEnum("MemoryPoolType", [(n, i) for i, n in enumerate(
        ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"])])
    TensorIOMode = enum.IntEnum("TensorIOMode", [("NONE", 0), ("INPUT", 1), ("OUTPUT", 2)])
    DataType = enum.IntEnum("DataType", [(n, i) for i, n in enumerate(DATA_TYPES)])
    severity = enum.IntEnum("Severity", [(n, i) for i, n in enumerate(
        ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])])

    def rec(name, *args):
        d.calls.append((name, args))

    class ILogger:
        Severity = severity

        def __init__(self):
            self._initialised = True

        def log(self, severity, msg):
            raise NotImplementedError("ILogger.log is pure virtual")

    def take_logger(logger, who):
        if not isinstance(logger, ILogger) or not getattr(logger, "_initialised", False):
            raise TypeError(f"{who}: logger must be a tensorrt.ILogger whose __init__ was called")
        d.loggers.append(logger)
        return logger

    def log_error(msg):
        d.loggers[0].log(severity.ERROR, msg)  # TensorRT's one logger: the first it was given

    class ITensor(Strict):
        def __init__(self, name, shape, dtype):
            self._name, self._shape, self._dtype = name, tuple(shape), dtype

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)
        dtype = property(lambda self: self._dtype)

    class INetworkDefinition(Strict):
        def __init__(self, flags):
            self._flags, self._inputs, self._outputs = flags, [], []

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_input(self, index):
            return self._inputs[index]

        def get_output(self, index):
            return self._outputs[index]

    class ParserError(Strict):
        def __init__(self, text):
            self._text = text

        def desc(self):
            return self._text

        def __str__(self):
            return f"In node -1 with name:  and operator:  (parseGraph): INVALID_GRAPH: {self._text}"

    class OnnxParser(Strict):
        def __init__(self, network, logger):
            take_logger(logger, "OnnxParser")
            self._network, self._errors = network, []

        def parse_from_file(self, model):
            import onnx

            rec("OnnxParser.parse_from_file", model)
            if d.parser_errors:
                self._errors = [ParserError(e) for e in d.parser_errors]
                return False
            graph = onnx.load(model, load_external_data=False).graph
            init = {i.name for i in graph.initializer}

            def tensor(vi):
                t = vi.type.tensor_type
                dims = [x.dim_value if x.HasField("dim_value") else -1 for x in t.shape.dim]
                return ITensor(vi.name, dims, DataType[ONNX_TO_TRT[t.elem_type]])

            self._network._inputs = [tensor(v) for v in graph.input if v.name not in init]
            self._network._outputs = [tensor(v) for v in graph.output]
            return True

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index):
            return self._errors[index]

        def clear_errors(self):
            self._errors = []

    class IOptimizationProfile(Strict):
        def __init__(self):
            self._shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 - the bindings' names
            rec("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
            self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, input):  # noqa: A002
            return list(self._shapes.get(input, ()))

    class IHostMemory(bytes):
        nbytes = property(lambda self: len(self))

    class ITimingCache(Strict):
        def __init__(self, data):
            self._data = bytes(data)

        def serialize(self):
            return IHostMemory(self._data)

        def combine(self, input_cache, ignore_mismatch):
            self._data += input_cache._data
            return True

        def reset(self):
            self._data = b""
            return True

    class IBuilderConfig(Strict):
        def __init__(self):
            self._flags = {BuilderFlag.TF32}  # on by default (developer guide, "TF32 Inference")
            self._pools, self._profiles, self._cache, self._hw = {}, [], None, HardwareCompatibilityLevel.NONE

        def set_memory_pool_limit(self, pool, pool_size):
            rec("IBuilderConfig.set_memory_pool_limit", MemoryPoolType(pool), pool_size)
            self._pools[MemoryPoolType(pool)] = int(pool_size)

        def get_memory_pool_limit(self, pool):
            return self._pools[MemoryPoolType(pool)]

        def set_flag(self, flag):
            rec("IBuilderConfig.set_flag", BuilderFlag(flag))
            self._flags.add(BuilderFlag(flag))

        def clear_flag(self, flag):
            rec("IBuilderConfig.clear_flag", BuilderFlag(flag))
            self._flags.discard(BuilderFlag(flag))

        def get_flag(self, flag):
            return BuilderFlag(flag) in self._flags

        def add_optimization_profile(self, profile):
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("add_optimization_profile(): incompatible function arguments")
            self._profiles.append(profile)
            return len(self._profiles) - 1

        num_optimization_profiles = property(lambda self: len(self._profiles))

        def create_timing_cache(self, serialized_timing_cache):
            rec("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache))
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("IBuilderConfig.set_timing_cache", cache, ignore_mismatch)
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

        def _get_hw(self):
            return self._hw

        def _set_hw(self, level):
            rec("IBuilderConfig.hardware_compatibility_level", HardwareCompatibilityLevel(level))
            self._hw = HardwareCompatibilityLevel(level)

        hardware_compatibility_level = property(_get_hw, _set_hw)

    class Builder(Strict):
        def __init__(self, logger):
            take_logger(logger, "Builder")

        def create_network(self, flags=0):
            rec("Builder.create_network", int(flags))
            if int(flags) >> len(NetworkDefinitionCreationFlag):
                raise ValueError(f"unknown network creation flag bits {flags}")
            return INetworkDefinition(int(flags))

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            rec("Builder.build_serialized_network", network, config)
            if d.build_error:
                log_error(d.build_error)
                return None
            if config._cache is not None:
                config._cache._data += b"tactics;"  # a build adds to the timing cache
            names = [t.name for t in network._inputs]
            for p in config._profiles:
                if sorted(p._shapes) != sorted(names):
                    log_error("IBuilder::buildSerializedNetwork: profile does not cover every input")
                    return None
            batch = config._profiles[0]._shapes[names[0]][0][0] if names else 1
            return IHostMemory(d.plan(
                [(t.name, list(t.shape), t.dtype.name) for t in network._inputs],
                [(t.name, list(t.shape), t.dtype.name) for t in network._outputs], batch,
                flags=sorted(f.name for f in config._flags), network_flags=network._flags,
                hardware=config._hw.name, profiles=len(config._profiles)))

    class Runtime(Strict):
        def __init__(self, logger):
            take_logger(logger, "Runtime")
            self._host_code = False

        def deserialize_cuda_engine(self, serialized_engine):
            rec("Runtime.deserialize_cuda_engine", len(serialized_engine))
            try:
                spec = json.loads(bytes(serialized_engine))
            except ValueError:
                spec = None
            if not d.deserialize_ok or spec is None or spec.get("version") != d.version:
                log_error("IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag does not match)")
                return None
            return ICudaEngine(spec)

        def _get_hc(self):
            return self._host_code

        def _set_hc(self, value):
            self._host_code = bool(value)

        engine_host_code_allowed = property(_get_hc, _set_hc)

    class ICudaEngine(Strict):
        def __init__(self, spec):
            self._spec = spec
            self._tensors = {t["name"]: t for t in spec["tensors"]}

        num_io_tensors = property(lambda self: len(self._spec["tensors"]))
        num_optimization_profiles = property(lambda self: self._spec["build"].get("profiles", 1))

        def get_tensor_name(self, index):
            return self._spec["tensors"][index]["name"]

        def get_tensor_mode(self, name):
            return TensorIOMode[self._tensors[name]["mode"]]

        def get_tensor_shape(self, name):
            return tuple(self._tensors[name]["shape"])

        def get_tensor_dtype(self, name):
            return DataType[self._tensors[name]["dtype"]]

        def get_tensor_profile_shape(self, name, profile_index):
            t = self._tensors[name]
            if t["mode"] != "INPUT" or profile_index != 0:
                raise RuntimeError("get_tensor_profile_shape: not an input of profile 0")
            shape = tuple(t["batch"] if x < 0 else x for x in t["shape"])
            return [shape, shape, shape]

        def create_execution_context(self, strategy=None):
            rec("ICudaEngine.create_execution_context")
            if not d.context_ok:
                log_error("IExecutionContext: out of memory allocating activation memory")
                return None
            return IExecutionContext(self)

    class IExecutionContext(Strict):
        def __init__(self, engine):
            self._engine, self._shapes, self._addresses, self._profile = engine, {}, {}, 0

        def set_input_shape(self, name, shape):
            rec("IExecutionContext.set_input_shape", name, tuple(shape))
            t = self._engine._tensors[name]
            want = tuple(t["batch"] if x < 0 else x for x in t["shape"])
            if not d.input_shape_ok or tuple(shape) != want:
                log_error(f"IExecutionContext::setInputShape: shape {tuple(shape)} is outside the profile {want}")
                return False
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            t = self._engine._tensors[name]
            batch = next(iter(self._shapes.values()), (-1,))[0] if self._shapes else -1
            return tuple(batch if x < 0 else x for x in t["shape"]) if (t["mode"] == "OUTPUT" or name in self._shapes) \
                else tuple(t["shape"])

        def set_tensor_address(self, name, memory):
            rec("IExecutionContext.set_tensor_address", name, int(memory))
            if not d.address_ok or name not in self._engine._tensors:
                log_error(f"IExecutionContext::setTensorAddress: invalid tensor name or address for {name}")
                return False
            self._addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name):
            return self._addresses.get(name, 0)

        def set_optimization_profile_async(self, profile_index, stream_handle):
            rec("IExecutionContext.set_optimization_profile_async", profile_index, int(stream_handle))
            if not 0 <= profile_index < self._engine.num_optimization_profiles:
                log_error(f"setOptimizationProfileAsync: profile {profile_index} out of range")
                return False
            self._profile = profile_index
            return True

        active_optimization_profile = property(lambda self: self._profile)

        def execute_async_v3(self, stream_handle):
            rec("IExecutionContext.execute_async_v3", int(stream_handle))
            tensors = self._engine._spec["tensors"]
            missing = [t["name"] for t in tensors if t["name"] not in self._addresses]
            if not d.execute_ok or missing:
                log_error(f"IExecutionContext::enqueueV3: tensor addresses not set: {missing}")
                return False
            ins = [t for t in tensors if t["mode"] == "INPUT"]
            outs = [t for t in tensors if t["mode"] == "OUTPUT"]

            def view(t):
                shape = self.get_tensor_shape(t["name"])
                dtype = np.dtype(NUMPY[t["dtype"]])
                n = int(np.prod(shape)) * dtype.itemsize
                return np.ctypeslib.as_array((np.ctypeslib.ctypes.c_ubyte * n).from_address(
                    self._addresses[t["name"]])).view(dtype).reshape(shape)

            def run():
                for k, t in enumerate(outs):
                    out = view(t)
                    src = view(ins[k % len(ins)])
                    out[...] = (src.astype(np.float64) * 2).reshape(out.shape).astype(out.dtype)

            return d.cuda.enqueue(stream_handle, run)

    def nptype(trt_type):
        name = DataType(trt_type).name
        if name not in NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY[name]

    for obj in (ILogger, Builder, IBuilderConfig, IOptimizationProfile, ITimingCache, INetworkDefinition, ITensor,
                OnnxParser, ParserError, Runtime, ICudaEngine, IExecutionContext, IHostMemory, BuilderFlag,
                NetworkDefinitionCreationFlag, HardwareCompatibilityLevel, MemoryPoolType, TensorIOMode, DataType,
                nptype):
        setattr(mod, obj.__name__, obj)
    mod.Logger = ILogger
    return mod
