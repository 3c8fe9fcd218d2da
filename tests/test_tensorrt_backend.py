"""The TensorRT backend's code on CPU: builds, runs and failure paths against strict doubles of
``tensorrt`` (10.x and 11.x) and cuda-python's runtime (``tests/doubles``).

What the doubles cannot show (kernels, real memory pressure, a real driver) is left to the
``tensorrt``/``gpu``-marked tests in ``test_engines.py`` and ``test_gpu.py``.
"""

from __future__ import annotations

import gc
import inspect
import shlex
import sys

import numpy as np
import onnx
import pytest
from doubles.cudart import CudaDouble, cudaError_t
from doubles.tensorrt import TrtDouble
from graphs import chain

from dsc_export.backends import cuda, tensorrt
from dsc_export.backends.base import BuildOptions
from dsc_export.errors import UserError


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def trt(request, monkeypatch) -> TrtDouble:
    """A fresh fake ``tensorrt`` in ``sys.modules`` and a fake CUDA runtime behind backends.cuda."""
    double = TrtDouble(major=request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", double.module)
    monkeypatch.setattr(cuda, "cudart", lambda: double.cuda.module)
    return double


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(chain()[0], path)
    return path


def build(trt, onnx_file, tmp_path, *, batch=4, precision="fp32", options=None, name="m.plan", **kw):
    out = tmp_path / "engines" / name
    tensorrt.TensorrtBackend().build(onnx_file, out, batch=batch, precision=precision,
                                     options=options or BuildOptions(workspace_mb=64),
                                     cache_dir=tmp_path / "engines", **kw)
    return out


def plan_file(trt, tmp_path, batch=4):
    path = tmp_path / "e.plan"
    path.write_bytes(trt.plan([("x", [-1, 3], "FLOAT")], [("y", [-1, 3], "FLOAT")], batch))
    return path


# --- build -------------------------------------------------------------------------------------

def test_fp32_build_clears_tf32_sets_workspace_profile_and_typing(trt, onnx_file, tmp_path):
    import json

    out = build(trt, onnx_file, tmp_path, batch=4)
    mod = trt.module
    assert trt.called("IBuilderConfig.clear_flag") == [(mod.BuilderFlag.TF32,)]
    spec = json.loads(out.read_bytes())
    assert "TF32" not in spec["build"]["flags"]
    strongly = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt.called("Builder.create_network") == [(strongly if trt.major == 10 else 0,)]
    assert trt.called("IBuilderConfig.set_memory_pool_limit") == [(mod.MemoryPoolType.WORKSPACE, 64 * 2**20)]
    ((name, lo, opt, hi),) = trt.called("IOptimizationProfile.set_shape")
    assert name == "x" and lo == opt == hi == (4, 3, 16, 16)
    assert not trt.called("IBuilderConfig.set_flag") and spec["build"]["hardware"] == "NONE"


def test_compatibility_options_reach_the_builder(trt, onnx_file, tmp_path):
    import json

    opts = BuildOptions(workspace_mb=8, version_compatible=True, hardware_compatible=True)
    spec = json.loads(build(trt, onnx_file, tmp_path, options=opts).read_bytes())
    assert "VERSION_COMPATIBLE" in spec["build"]["flags"] and spec["build"]["hardware"] == "AMPERE_PLUS"


def test_timing_cache_is_kept_and_read_by_the_next_build(trt, onnx_file, tmp_path):
    build(trt, onnx_file, tmp_path, batch=1, name="a.plan")
    cache = tmp_path / "engines" / tensorrt.TIMING_CACHE
    first = cache.read_bytes()
    build(trt, onnx_file, tmp_path, batch=2, name="b.plan")
    assert [args[0] for args in trt.called("IBuilderConfig.create_timing_cache")] == [b"", first]
    assert all(ignore is True for _, ignore in trt.called("IBuilderConfig.set_timing_cache"))
    assert len(cache.read_bytes()) > len(first)


def test_fp16_builds_from_a_converted_onnx_and_passes_notes_to_log(trt, onnx_file, tmp_path):
    notes = []
    build(trt, onnx_file, tmp_path, precision="fp16", log=notes.append)
    ((parsed,),) = trt.called("OnnxParser.parse_from_file")
    assert parsed != str(onnx_file) and parsed.endswith("fp16.onnx")
    assert not trt.called("IBuilderConfig.clear_flag")
    assert all(isinstance(n, str) for n in notes)


def test_parser_errors_are_one_line(trt, onnx_file, tmp_path):
    trt.parser_errors = ["Unsupported ONNX op\nFooOp", "second"]
    with pytest.raises(UserError) as exc:
        build(trt, onnx_file, tmp_path)
    msg = str(exc.value)
    assert "parser rejects" in msg and "Unsupported ONNX op FooOp" in msg and "\n" not in msg


def test_a_none_engine_says_why_and_out_of_memory_is_its_own_error(trt, onnx_file, tmp_path):
    trt.build_error = "Internal error: no tactic for node conv1"
    with pytest.raises(UserError, match="could not build .* at batch 4: Internal error: no tactic for node conv1$"):
        build(trt, onnx_file, tmp_path)
    trt.build_error = "Requested amount of GPU memory (123 bytes) could not be allocated"
    with pytest.raises(cuda.OutOfDeviceMemory, match="out of GPU memory"):
        build(trt, onnx_file, tmp_path)
    assert not (tmp_path / "engines" / "m.plan").exists()


def test_one_logger_per_process_and_each_call_reports_its_own_errors(trt, onnx_file, tmp_path):
    trt.build_error = "first failure"
    with pytest.raises(UserError, match="first failure"):
        build(trt, onnx_file, tmp_path)
    trt.build_error = None
    build(trt, onnx_file, tmp_path)
    trt.deserialize_ok = False
    with pytest.raises(UserError) as exc:
        tensorrt.TensorrtBackend().load(tmp_path / "engines" / "m.plan").activate()
    assert "first failure" not in str(exc.value) and "magic tag" in str(exc.value)
    assert len(trt.loggers) >= 5 and len({id(lg) for lg in trt.loggers}) == 1


# --- run ---------------------------------------------------------------------------------------

def test_activate_infer_deactivate_moves_the_data_through_pinned_memory(trt, tmp_path):
    runner = tensorrt.TensorrtBackend().load(plan_file(trt, tmp_path))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with runner:
        assert [(s.name, s.shape) for s in runner.inputs + runner.outputs] == [("x", (4, 3)), ("y", (4, 3))]
        assert trt.called("IExecutionContext.set_input_shape") == [("x", (4, 3))]
        y = runner.infer({"x": x})["y"]
        y2 = runner.infer({"x": x + 1})["y"]
        assert runner.time_ms({"x": x}) > 0
        with pytest.raises(UserError, match="must be float32 \\[4, 3\\]"):
            runner.infer({"x": x[:2]})
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(y2, 2 * (x + 1))
    assert trt.cuda.pageable_copies == 0
    assert trt.cuda.live() == {"device": 0, "pinned": 0, "streams": 0, "events": 0}


def test_a_failed_execution_is_one_line(trt, tmp_path):
    with tensorrt.TensorrtBackend().load(plan_file(trt, tmp_path)) as runner:
        trt.execute_ok = False
        with pytest.raises(UserError, match="execution failed .*enqueueV3"):
            runner.infer({"x": np.zeros((4, 3), np.float32)})


@pytest.mark.parametrize("knob, message", [
    ("deserialize_ok", "cannot load .*magic tag"),
    ("context_ok", "cannot create an execution context .*out of memory"),
    ("input_shape_ok", "refuses shape \\[4, 3\\] for input 'x'"),
    ("address_ok", "refuses the device address of 'x'"),
])
def test_activation_failures_are_one_line_and_release_everything(trt, tmp_path, knob, message):
    setattr(trt, knob, False)
    runner = tensorrt.TensorrtBackend().load(plan_file(trt, tmp_path))
    with pytest.raises(UserError, match=message) as exc:
        runner.activate()
    assert "\n" not in str(exc.value) and not runner.active
    assert trt.cuda.live() == {"device": 0, "pinned": 0, "streams": 0, "events": 0}


@pytest.mark.parametrize("call, nth", [("cudaMalloc", 2), ("cudaMallocHost", 2), ("cudaEventCreate", 2),
                                       ("cudaStreamCreate", 1)])
def test_a_cuda_failure_part_way_through_activation_releases_what_was_made(trt, tmp_path, call, nth):
    trt.cuda.fail[call] = (nth, cudaError_t.cudaErrorMemoryAllocation)
    runner = tensorrt.TensorrtBackend().load(plan_file(trt, tmp_path))
    with pytest.raises(cuda.OutOfDeviceMemory):
        runner.activate()
    assert trt.cuda.live() == {"device": 0, "pinned": 0, "streams": 0, "events": 0}
    assert call in trt.cuda.calls


def test_an_upload_keeps_a_temporary_host_copy_alive_until_the_stream_syncs(trt):
    strided = np.arange(64, dtype=np.float32)[::2]  # not contiguous: upload copies it
    buf = cuda.DeviceBuffer(strided.nbytes)
    with cuda.Stream() as stream:
        buf.upload(strided, stream)
        gc.collect()
        junk = [np.full(32, -1, np.float32) for _ in range(64)]  # reuse freed memory, if any was
        out = buf.download(np.empty(32, np.float32), stream)
        stream.synchronize()
        del junk
    buf.free()
    np.testing.assert_array_equal(out, strided)


# --- where it may run --------------------------------------------------------------------------

def test_an_old_driver_is_named_with_cudas_own_words_and_the_cuda12_extra(trt):
    trt.cuda.devices = cudaError_t.cudaErrorInsufficientDriver
    why = tensorrt.TensorrtBackend().available()
    assert "CUDA driver version is insufficient for CUDA runtime version" in why
    assert "tensorrt-cu12" in why and "\n" not in why
    trt.cuda.devices = 0
    assert "no GPU" in tensorrt.TensorrtBackend().available()
    trt.cuda.devices = 1
    assert tensorrt.TensorrtBackend().available() is None


def test_the_real_cuda_bindings_without_a_gpu_give_their_own_reason():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from cuda.bindings import runtime

    err, *_ = runtime.cudaGetDeviceCount()
    if int(err) == 0:
        pytest.skip("this machine has a CUDA device")
    words = runtime.cudaGetErrorString(err)[1].decode()
    assert words in cuda.no_device_reason()
    assert cuda.device_count() == 0


@pytest.mark.parametrize("built, here, options, problem", [
    ("10.13.0.35", "10.13.0.35", {}, None),
    ("10.13.0.35", "10.13.1.2", {}, "!="),
    ("10.13.0.35", "10.13.1.2", {"version_compatible": True}, None),
    ("10.13.2.1", "10.13.1.9", {"version_compatible": True}, "is newer than"),
    ("10.9.0.1", "10.13.0.1", {"version_compatible": True}, None),   # (10, 9) < (10, 13): not text order
    ("11.0.0.1", "10.16.0.1", {"version_compatible": True}, "is newer than"),
    ("10.16.0.1", "11.1.0.1", {"version_compatible": True}, None),
])
def test_version_compatibility_compares_major_minor_patch(built, here, options, problem):
    why = tensorrt.engine_compatibility({"version": built, "compute_capability": "8.6"},
                                        {"version": here, "compute_capability": "8.6"}, options)
    assert (why is None) if problem is None else (problem in why)


@pytest.mark.parametrize("built, here, hw, problem", [
    ("8.6", "8.6", False, None), ("8.6", "8.9", False, "!="), ("8.6", "8.9", True, None),
    ("8.6", "12.0", True, None), ("8.6", "7.5", True, "needs compute capability 8.0"),
])
def test_hardware_compatibility_needs_ampere_or_newer(built, here, hw, problem):
    why = tensorrt.engine_compatibility({"version": "10.1", "compute_capability": built},
                                        {"version": "10.1", "compute_capability": here}, {"hardware_compatible": hw})
    assert (why is None) if problem is None else (problem in why)


def test_backend_compatible_compares_with_this_gpu(trt):
    trt.cuda.props.major, trt.cuda.props.minor = 7, 5
    target = {"version": trt.version, "compute_capability": "8.6"}
    assert "8.0" in tensorrt.TensorrtBackend().compatible(target, {"hardware_compatible": True})
    assert tensorrt.TensorrtBackend().compatible({**target, "compute_capability": "7.5"}, {}) is None


# --- trtexec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trtexec_command(precision):
    opts = BuildOptions(workspace_mb=512, version_compatible=True, hardware_compatible=True)
    be = tensorrt.TensorrtBackend()
    dyn = shlex.split(be.trtexec_command("h.onnx", "h.plan", input_name="in put", input_shapes=[[1, 3], [8, 3]],
                                         precision=precision, options=opts, cache_path="c.cache"))
    static = shlex.split(be.trtexec_command("h.onnx", "h.plan", input_name=None, input_shapes=[[8, 3]],
                                            precision=precision, options=BuildOptions(), cache_path="c.cache"))
    # one profile per batch size, in order: --profile=K, then its min = opt = max
    for k, b in enumerate([1, 8]):
        at = dyn.index(f"--profile={k}")
        assert dyn[at + 1:at + 4] == [f"--{w}Shapes='in put':{b}x3" for w in ("min", "opt", "max")]
    assert dyn.index("--profile=0") < dyn.index("--profile=1")
    assert not any(a.startswith(("--shapes", "--minShapes", "--profile")) for a in static)
    assert ("--noTF32" in dyn) == (precision == "fp32") == ("--noTF32" in static)
    assert {"--stronglyTyped", "--versionCompatible", "--hardwareCompatibilityLevel=ampere+",
            "--memPoolSize=workspace:512M", "--timingCacheFile=c.cache"} <= set(dyn)
    assert "--versionCompatible" not in static


# --- one engine per part, one optimisation profile per batch size ------------------------------

def test_one_build_adds_one_profile_per_batch_size(trt, onnx_file, tmp_path):
    import json

    out = build(trt, onnx_file, tmp_path, batch=[1, 2, 8])
    dims = [d.dim_value for d in onnx.load(onnx_file).graph.input[0].type.tensor_type.shape.dim][1:]
    assert trt.called("IOptimizationProfile.set_shape") == [("x", (b, *dims), (b, *dims), (b, *dims))
                                                            for b in (1, 2, 8)]
    ((_, config),) = trt.called("Builder.build_serialized_network")  # one build, one IBuilderConfig
    assert config.num_optimization_profiles == 3 and json.loads(out.read_bytes())["build"]["profiles"] == 3


def test_several_batch_sizes_for_a_static_input_are_refused(trt, tmp_path):
    static = chain()[0]
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "static.onnx"
    onnx.save(static, path)
    with pytest.raises(UserError, match="fixed batch size: one profile, not batch sizes 1, 2$"):
        build(trt, path, tmp_path, batch=[1, 2])


def test_each_runner_selects_the_profile_of_its_batch_and_shares_the_engine(trt, tmp_path):
    path = tmp_path / "e.plan"
    batches = [1, 2, 8]
    path.write_bytes(trt.plan([("x", [-1, 3], "FLOAT")], [("y", [-1, 3], "FLOAT")], batches))
    rng = np.random.default_rng(0)
    runners = [tensorrt.TensorrtBackend().load(path, profile=k) for k in range(len(batches))]
    for k, (b, runner) in enumerate(zip(batches, runners)):
        runner.activate()
        x = rng.standard_normal((b, 3)).astype(np.float32)
        assert np.array_equal(runner.infer({"x": x})["y"], x * 2)  # the double doubles its input
        names = [n for n, _ in trt.calls]
        select = len(names) - 1 - names[::-1].index("IExecutionContext.set_optimization_profile_async")
        shape = len(names) - 1 - names[::-1].index("IExecutionContext.set_input_shape")
        assert trt.calls[select][1] == (k, int(runner._stream.handle)) and select < shape
        assert trt.calls[shape][1] == ("x", (b, 3)) and runner._context.active_optimization_profile == k
    assert len(trt.called("Runtime.deserialize_cuda_engine")) == 1  # one engine, one copy of the weights
    for runner in runners:
        runner.deactivate()
    assert not tensorrt._ENGINES.held  # released with the last runner
    with tensorrt.TensorrtBackend().load(path, profile=0):
        pass
    assert len(trt.called("Runtime.deserialize_cuda_engine")) == 2


@pytest.mark.parametrize("profile", [3, -1])
def test_a_wrong_profile_index_is_refused_in_one_line(trt, tmp_path, profile):
    path = tmp_path / "e.plan"
    path.write_bytes(trt.plan([("x", [-1, 3], "FLOAT")], [("y", [-1, 3], "FLOAT")], [1, 2, 8]))
    runner = tensorrt.TensorrtBackend().load(path, profile=profile)
    with pytest.raises(UserError) as exc:
        runner.activate()
    assert f"has 3 optimisation profile(s), not profile {profile}" in str(exc.value)
    assert "\n" not in str(exc.value) and not runner.active and not tensorrt._ENGINES.held
    assert not trt.called("IExecutionContext.set_optimization_profile_async")


def test_build_records_which_profile_serves_which_batch(trt, tmp_path):
    """build_engines with TensorRT: one file per part, a record per batch size naming its profile;
    a later build with another size keeps the sizes recorded; each record loads its profile;
    --emit-trtexec writes the same profiles in the same order."""
    import json

    from dsc_export.artifacts import read_manifest
    from dsc_export.backends.tensorrt_tools import emit_trtexec
    from dsc_export.engines import build_engines, load_engine
    from dsc_export.splitting import split_model

    model, cuts = chain()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    root = tmp_path / "s"
    split_model(src, root, at=cuts[2:])
    build_engines(root, "tensorrt", batch_sizes=[4, 1], parts="all", verify=False)
    man = read_manifest(root)
    sources = {e.source for e in man.engines}
    assert len({e.path for e in man.engines}) == len(sources) == 3  # model, head, tail: one engine each
    for e in man.engines:
        assert e.profile == [1, 4].index(e.batch) and e.path.startswith("engines/tensorrt/")
    build_engines(root, "tensorrt", batch_sizes=[2], parts="heads", verify=False)  # the head's engine: profiles 1, 2, 4
    man = read_manifest(root)
    head = man.splits[1].head
    recs = sorted((e for e in man.engines if e.source == head), key=lambda e: e.batch)
    assert [(e.batch, e.profile) for e in recs] == [(1, 0), (2, 1), (4, 2)]
    plan = json.loads((root / recs[0].path).read_bytes())
    dims = [d.dim_value for d in onnx.load(root / head).graph.input[0].type.tensor_type.shape.dim][1:]
    (x,) = [t for t in plan["tensors"] if t["mode"] == "INPUT"]
    assert x["profiles"] == [[[b, *dims]] * 3 for b in (1, 2, 4)]  # what the builder was given
    for rec in recs:
        with load_engine(root, rec) as runner:
            assert runner._context.active_optimization_profile == rec.profile
            assert runner.inputs[0].shape == (rec.batch, *dims)
    bad = man.to_json().replace('"profile": 2', '"profile": 5')
    (root / "manifest.json").write_text(bad)
    wrong = next(e for e in read_manifest(root).engines if e.profile == 5)
    with pytest.raises(UserError, match="has 3 optimisation profile\\(s\\), not profile 5"):
        load_engine(root, wrong).activate()
    (root / "manifest.json").write_text(man.to_json())
    out = tmp_path / "build.sh"
    assert emit_trtexec(root, out, batch_sizes=[1, 2, 4], parts="heads") == 2  # the head and the whole model
    (cmd,) = [shlex.split(ln) for ln in out.read_text().splitlines() if f"--onnx={head}" in ln]
    assert f"--saveEngine={recs[0].path}" in cmd
    name = onnx.load(root / head).graph.input[0].name
    for rec in recs:
        at = cmd.index(f"--profile={rec.profile}")
        spec = f"'{name}':" + "x".join(map(str, (rec.batch, *dims)))
        assert cmd[at + 1:at + 4] == [f"--minShapes={spec}", f"--optShapes={spec}", f"--maxShapes={spec}"]


# --- the doubles themselves --------------------------------------------------------------------

def test_the_tensorrt_double_is_strict(trt):
    mod = trt.module
    with pytest.raises(AttributeError):
        mod.IBuilder  # noqa: B018 - not a name the bindings export
    if trt.major == 11:
        with pytest.raises(AttributeError):
            mod.BuilderFlag.FP16  # noqa: B018 - removed in 11
    config = mod.Builder.__new__(mod.Builder)  # no logger: only the attribute check
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1  # removed in TensorRT 10
    with pytest.raises(TypeError):
        mod.Builder(object())
    with pytest.raises(TypeError):
        mod.IBuilderConfig().set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE)


def test_the_cuda_double_matches_the_real_bindings():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    fake = CudaDouble().module
    for name, fn in vars(fake).items():
        if name.startswith("cuda") and callable(fn) and not isinstance(fn, type):
            real = [p.name for p in inspect.signature(getattr(runtime, name)).parameters.values()]
            assert [p.name for p in inspect.signature(fn).parameters.values()] == real, name
    for member in cudaError_t:
        assert int(getattr(runtime.cudaError_t, member.name)) == int(member)


def test_the_double_selects_optimization_profiles_as_tensorrt_does(trt, tmp_path):
    runner = tensorrt.TensorrtBackend().load(plan_file(trt, tmp_path))
    with runner:
        ctx, stream = runner._context, int(runner._stream.handle)
        assert runner._engine.num_optimization_profiles == 1
        assert ctx.set_optimization_profile_async(0, stream) is True and ctx.active_optimization_profile == 0
        log = tensorrt.error_log(trt.module)
        mark = log.mark()
        assert ctx.set_optimization_profile_async(1, stream) is False
        assert "profile 1 out of range" in log.reason(mark)
