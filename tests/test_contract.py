"""The output contract, fixed-batch and batch-dependent models, and names in files other tools read.

None of these needs a server: the contract is pure, engines and trtexec scripts are files.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from served_models import conv_net, outputs_model, run_script, set_batch_fields, stub_trtexec

from dsc_export.artifacts import Manifest, ModelRef, TensorSig, read_manifest
from dsc_export.backends.tensorrt_tools import emit_trtexec
from dsc_export.compare import ENGINE_REL_TOLERANCE, tolerance
from dsc_export.contract import (
    constant_outputs,
    fixed_batch,
    mergeable,
    output_contract,
    output_names,
    served_outputs,
)
from dsc_export.engines import (
    PartRunner,
    build_engines,
    engine_batch_sizes,
    load_engine,
)
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.splitting import split_model

ROOT = Path(__file__).parents[1]


def manifest(outputs, input_shape=("N", 3, 8, 8), fixed=None, independent=None) -> Manifest:
    sigs = [TensorSig(name=n, shape=list(s), dtype=d) for n, s, d in outputs]
    model = ModelRef(path="model.onnx", sha256="0" * 64,
                     input=TensorSig(name="x", shape=list(input_shape), dtype="float32"), output=sigs[0],
                     input_bytes=768, outputs=sigs,
                     fixed_batch=fixed, batch_independent=independent)
    return Manifest(model=model, wire_dtype="float32", cut_points=[], splits=[])


# --- the contract (pure) ---------------------------------------------------------------------

def test_contract_of_each_kind_of_output():
    man = manifest([("logits", ["N", 10], "float32"), ("scores_t", [10, "N"], "float32"),
                    ("seg", ["N", "Resizeout_dim_1", 64, "Resizeout_dim_3"], "float16"),
                    ("dets", ["batch", 100, 6], "float32"), ("table", [16, 10], "float32")])
    c = {x.name: x for x in output_contract(man, constants={"table"})}
    assert (c["logits"].kind, c["logits"].batch_axis, c["logits"].dims) == ("batched", 0, (10,))
    assert (c["scores_t"].kind, c["scores_t"].batch_axis, c["scores_t"].dims) == ("batched", 1, (10,))
    assert (c["seg"].batch_axis, c["seg"].dims, c["seg"].dtype) == (0, (-1, 64, -1), "float16")
    assert (c["dets"].batch_axis, c["dets"].dims) == (0, (100, 6))  # axis 0 symbolic under another name
    assert (c["table"].kind, c["table"].dims) == ("constant", (16, 10))
    assert not any(x.problem for x in c.values())


@pytest.mark.parametrize("shape,dtype,constants,words", [
    ([16, 10], "float32", None, "not checked whether it is a constant"),
    ([16, 10], "float32", set(), "depends on the input"),
    (["N", "N"], "float32", None, "on axes 0, 1"),
    ([10, "M"], "float32", None, "no axis is named like the input's batch 'N'"),
    ([], "float32", set(), "no axis follows the batch size"),
    (["N", 10], "bfloat16", None, "dtype bfloat16"),
    (["N", 10], "unknown", None, "dtype unknown"),
])
def test_contract_problems_name_the_output_and_the_cause(shape, dtype, constants, words):
    man = manifest([("logits", ["N", 10], "float32"), ("odd/out", shape, dtype)])
    got = output_contract(man, constants)
    assert got[0].problem is None
    assert got[1].problem.startswith("output 'odd/out' ") and words in got[1].problem
    assert "\n" not in got[1].problem


def test_fixed_batch_models_are_served_whole():
    for man in (manifest([("out", [10, 4], "float32"), ("t", [16], "float32")], fixed=4),
                manifest([("out", [10, 4], "float32"), ("t", [16], "float32")], input_shape=(4, 3, 8, 8))):
        assert fixed_batch(man) == 4 and not mergeable(man)
        c = output_contract(man)
        assert [(x.kind, x.dims, x.problem) for x in c] == [("whole", (10, 4), None), ("whole", (16,), None)]
    dependent = manifest([("out", ["N", 10], "float32")], independent=False)
    assert fixed_batch(dependent) is None and not mergeable(dependent)
    assert mergeable(manifest([("out", ["N", 10], "float32")]))


def test_output_names_are_safe_and_unique():
    man = manifest([("a/b", ["N", 1], "float32"), ("a_b", ["N", 1], "float32"), ("server_ms", ["N", 1], "float32"),
                    ("", ["N", 1], "float32"), ("x;$(y) 'z'", ["N", 1], "float32")])
    assert output_names(man) == ["a_b", "a_b_1", "server_ms_1", "output_3", "x___y___z"]


def test_constant_outputs_are_those_no_input_reaches():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("y", "table", "const_node", "folded", "batch_mean", "x_out")]
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Constant", [], ["const_node"], value=numpy_helper.from_array(np.ones(3, np.float32))),
             helper.make_node("Add", ["table", "const_node2"], ["folded"]),
             helper.make_node("Constant", [], ["const_node2"], value=numpy_helper.from_array(np.ones(3, np.float32))),
             helper.make_node("ReduceMean", ["y"], ["batch_mean"], axes=[0], keepdims=0),
             helper.make_node("Identity", ["x"], ["x_out"])]
    g = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(np.ones(3, np.float32), "table")])
    assert constant_outputs(helper.make_model(g)) == {"table", "const_node", "folded"}


# --- split dirs: build, engines and the contract's refusals ------------------------------------

@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    out = {}
    for name, model in {"kinds": outputs_model(), "batch_mean": conv_net(outputs=("logits", "batch_mean")),
                        "fixed": conv_net(batch=2, outputs=("logits", "prototypes"))}.items():
        onnx.save(model, root / f"{name}.onnx")
        out[name] = root / name
        # verified, split refuses an output no server can answer (tested below); unverified, it
        # writes the split dir and the later verbs refuse alike
        split_model(root / f"{name}.onnx", out[name], verify=name != "batch_mean")
    return out


def test_engines_of_every_output_kind_match_the_whole_model(split_dirs):
    """Case 06/08/LR-ASPP kinds: build at 1 and 2 builds every engine (no 'fixed batch size 16' or
    '10' from a constant or batch-last output), and each engine returns what the model returns."""
    root = split_dirs["kinds"]
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="all", keep_all=True)
    assert not rep.failed, rep.failed
    man = read_manifest(root)
    whole = make_session(root / man.model.path)
    names = [o.name for o in whole.get_outputs()]
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = whole.run(None, {"image": x})
    s = man.split("cut004")
    with load_engine(root, man.engine(s.id, "head", "onnxruntime", 2)) as head, \
            load_engine(root, man.engine(s.id, "tail", "onnxruntime", 2)) as tail:
        got = tail.infer({s.wire_tensor: head.infer({"image": x})[s.wire_tensor]})
    for n, w in zip(names, want):
        assert got[n].shape == w.shape and np.abs(got[n] - w).max() <= 1e-4 * np.abs(w).max(), n
    assert want[names.index("scores_t")].shape == (10, 2) and want[names.index("prototypes")].shape == (16, 10)


def test_an_output_no_server_can_answer_is_refused_alike_everywhere(split_dirs, tmp_path):
    from dsc_export.bundle import make_bundle

    root = split_dirs["batch_mean"]
    man = read_manifest(root)
    with pytest.raises(UserError) as exc:
        served_outputs(root, man)
    msg = str(exc.value)
    assert msg.startswith("output 'batch_mean' has shape [10]") and "depends on the input" in msg
    with pytest.raises(UserError) as at_split:  # split itself refuses it up front when it verifies
        split_model(root.parent / "batch_mean.onnx", tmp_path / "s")
    assert str(at_split.value) == msg + "; nothing was written" and not (tmp_path / "s").exists()
    for call in (lambda: build_engines(root, "onnxruntime", batch_sizes=[1]),
                 lambda: emit_trtexec(root, tmp_path / "t.sh", batch_sizes=[1]),
                 lambda: make_bundle(root, "server", tmp_path / "s.tar")):
        with pytest.raises(UserError) as other:
            call()
        assert str(other.value) == msg
    assert not (tmp_path / "t.sh").exists() and not (tmp_path / "s.tar").exists()
    assert not read_manifest(root).engines


def test_fixed_batch_models_get_engines_at_their_batch_only(split_dirs):
    root = split_dirs["fixed"]  # input [2, 3, 16, 16]: runs at batch 2 only
    notes = []
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 2, 4], parts="all", log=notes.append, keep_all=True)
    assert not rep.failed and {e.batch for e in rep.built} == {2}
    assert notes == ["note: the model runs at batch size 2 only: using batch 2, not 1, 4"]
    man = read_manifest(root)
    runner = PartRunner(root, man, "offload", "tail")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = make_session(root / man.model.path).run(None, {"image": x})
    got = runner.run({"image": x})
    assert all(np.abs(g - w).max() <= 1e-4 * np.abs(w).max() for g, w in zip(got, want))
    with pytest.raises(UserError, match="runs at batch size 2 only, not 3"):
        runner.run({"image": np.zeros((3, 3, 16, 16), np.float32)})
    assert engine_batch_sizes(man, [2]) == ([2], None)


def test_manifest_fixed_batch_applies_to_a_dynamic_input(split_dirs, tmp_path):
    """A model found to run at one batch size (manifest fixed_batch, input still 'N')."""
    import shutil

    root = tmp_path / "kinds"
    shutil.copytree(split_dirs["kinds"], root)
    set_batch_fields(root, fixed_batch=3, batch_independent=True)
    man = read_manifest(root)
    assert [c.kind for c in served_outputs(root, man)] == ["whole"] * 4
    assert engine_batch_sizes(man, [1, 2])[0] == [3]
    with pytest.raises(UserError, match="batch size 3 only, not 1"):
        PartRunner(root, man, "cut004", "head").run({"image": np.zeros((1, 3, 16, 16), np.float32)})


def test_cli_build_and_bench_note_the_fixed_batch(split_dirs, tmp_path):
    import shutil

    root = tmp_path / "fixed"
    shutil.copytree(split_dirs["fixed"], root)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "dsc_export", "build", str(root), "--batch-sizes", "1,2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "note: the model runs at batch size 2 only: using batch 2, not 1" in r.stderr
    assert {e.batch for e in read_manifest(root).engines} == {2}
    r = subprocess.run([sys.executable, "-m", "dsc_export", "bench", str(root), "--role", "server", "--batch-sizes",
                        "1,2", "--repeats", "1", "--warmup", "0"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    prof = json.loads((root / "profiles" / "server-onnxruntime.json").read_text())
    assert {t["batch"] for t in prof["timings"]} == {2} and "using batch 2, not 1" in r.stderr


def test_float16_wire_head_engines_pass_within_the_float16_tolerance(tmp_path):
    """Case 15: with a float16 wire the head ends in a Cast to float16; its engine (BatchNorm fused)
    rounds some elements to the neighbouring float16 value. That is within float16's tolerance,
    where float32's would refuse it."""
    onnx.save(conv_net(outputs=("logits",), batch_norm=True, channels=(16, 32), hw=32, seed=3), tmp_path / "m.onnx")
    root = tmp_path / "split"
    split_model(tmp_path / "m.onnx", root, wire_dtype="float16", at=["r1", "r2"])
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="heads", keep_all=True)
    assert not rep.failed, rep.failed
    heads = [e for e in rep.built if e.split.startswith("cut")]
    assert heads and all(e.max_rel_diff <= tolerance("float16", engine=True) for e in heads)
    assert max(e.max_rel_diff for e in heads) > ENGINE_REL_TOLERANCE["float32"]  # float32's would refuse it
    man = read_manifest(root)
    e = max(heads, key=lambda e: e.max_rel_diff)  # an independent check of the recorded figure
    x = np.random.default_rng(e.batch).standard_normal((e.batch, 3, 32, 32)).astype(np.float32)
    s = man.split(e.split)
    ref = make_session(root / s.head, optimization="extended").run(None, {"image": x})[0]
    with load_engine(root, e) as eng:
        got = eng.infer({"image": x})[s.wire_tensor]
    assert got.dtype == np.float16
    step = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32)
    assert (np.abs(got.astype(np.float32) - ref.astype(np.float32)) <= step).all()  # at most one float16 step


# --- names in files other tools read ----------------------------------------------------------

HARSH_IN = 'in put;touch CANARY_IN "q" $HOME `touch CANARY_BT`:0'
HARSH = ["a;touch CANARY_A", "b $(touch CANARY_B)", 'c "quoted" $PATH', "d\ttab", "e:1/f", "g&&touch CANARY_G"]


def _shapes_names(argv: list[str]) -> list[str]:
    """The tensor names trtexec reads from --shapes / --minShapes ... (its own parsing: split on the
    last ':', single quotes removed)."""
    out = []
    for a in argv:
        if a.split("=", 1)[0] in ("--shapes", "--minShapes", "--optShapes", "--maxShapes"):
            spec = a.split("=", 1)[1]
            assert "," not in spec
            out.append(spec.rsplit(":", 1)[0].replace("'", ""))
    return out


@pytest.fixture(scope="module")
def harsh_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("harsh")
    onnx.save(conv_net(input_name=HARSH_IN, names=HARSH), root / "m.onnx")
    split_model(root / "m.onnx", root / "split", at=[HARSH[1], HARSH[3]])
    return root / "split"


def test_emitted_trtexec_script_passes_every_name_exactly(harsh_split, tmp_path):
    man = read_manifest(harsh_split)
    script = tmp_path / "build.sh"
    n = emit_trtexec(harsh_split, script, batch_sizes=[1, 2], parts="all")
    bin_dir, log = stub_trtexec(tmp_path)
    r = run_script(script, harsh_split, bin_dir)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    # one engine per part, one profile per batch size
    assert len(calls) == n == len({s.head for s in man.splits if s.head} | {s.tail for s in man.splits if s.tail})
    tails = {s.wire_tensor for s in man.splits if s.kind == "split"}
    assert tails == {HARSH[1], HARSH[3]}
    got = {name for argv in calls for name in _shapes_names(argv)}
    assert got == {HARSH_IN} | tails  # exactly the names, nothing split off or expanded
    assert not list(harsh_split.glob("CANARY*")) and not list(tmp_path.glob("CANARY*"))  # no second command ran
    for argv in calls:
        assert "--noTF32" in argv and "--stronglyTyped" in argv
        assert argv[0].startswith("--onnx=") and (harsh_split / argv[0].split("=", 1)[1]).is_file()
        assert argv[1].startswith("--saveEngine=engines/tensorrt/") and argv[1].endswith("-fp32.plan")
        profiles = [argv.index(f"--profile={k}") for k in (0, 1)]  # batch 1 then batch 2, min = opt = max
        for at, b in zip(profiles, (1, 2)):
            specs = [a.split("=", 1)[1] for a in argv[at + 1:at + 4]]
            assert [a.split("=", 1)[0] for a in argv[at + 1:at + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
            assert len(set(specs)) == 1 and specs[0].rsplit(":", 1)[1].split("x")[0] == str(b)


def test_trtexec_script_for_a_static_input_has_no_shapes(split_dirs, tmp_path):
    root = split_dirs["fixed"]
    script = tmp_path / "build.sh"
    notes = []
    emit_trtexec(root, script, batch_sizes=[1, 2], parts="all", log=notes.append)
    cmds = [shlex.split(ln) for ln in script.read_text().splitlines() if ln.startswith("trtexec")]
    assert cmds and all(not any(a.startswith(("--shapes", "--minShapes", "--profile")) for a in c) for c in cmds)
    assert all(c[2].endswith("-fp32.plan") for c in cmds) and notes  # batch 2 only, with the note
    assert "--batch-sizes 2 " in script.read_text()  # the import line: the one size built
    emit_trtexec(root, script, batch_sizes=[2], parts="heads", precision="fp16")
    cmds = [shlex.split(ln) for ln in script.read_text().splitlines() if ln.startswith("trtexec")]
    assert cmds and all("--noTF32" not in c for c in cmds)  # fp16 engines: the ONNX types decide


@pytest.mark.parametrize("bad", ["a,b", "it's"])
def test_names_trtexec_cannot_express_are_refused(tmp_path, bad):
    onnx.save(conv_net(input_name=bad), tmp_path / "m.onnx")
    split_model(tmp_path / "m.onnx", tmp_path / "split")
    with pytest.raises(UserError, match="trtexec's --shapes cannot express"):
        emit_trtexec(tmp_path / "split", tmp_path / "t.sh", batch_sizes=[1])
    assert not (tmp_path / "t.sh").exists()
