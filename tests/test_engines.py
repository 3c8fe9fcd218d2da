"""Engines per batch size: build, record, verify, refuse what was tampered with."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsc_export.artifacts import read_manifest
from dsc_export.backends import BuildOptions, get_backend
from dsc_export.engines import build_engines, load_engine, parse_batch_sizes
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.splitting import split_model

BATCHES = [1, 3]


@pytest.fixture(scope="module")
def b0_engines(exported, tmp_path_factory):
    rep = exported("efficientnet_b0")
    out = tmp_path_factory.mktemp("b0") / "split"
    split_model(rep.path, out)
    # the engines themselves are tested
    report = build_engines(out, "onnxruntime", batch_sizes=BATCHES, parts="all", keep_all=True)
    return out, report


def test_every_split_through_engines_matches_the_whole_model(b0_engines):
    root, report = b0_engines
    assert not report.failed
    man = read_manifest(root)
    whole = make_session(root / man.model.path)
    rng = np.random.default_rng(7)
    for b in BATCHES:
        x = rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
        want = whole.run(None, {"image": x})[0]
        for s in man.splits:
            if s.kind == "offload":
                with load_engine(root, man.engine(s.id, "tail", "onnxruntime", b)) as tail:
                    got = tail.infer({"image": x})["logits"]
            elif s.kind == "local":
                with load_engine(root, man.engine(s.id, "head", "onnxruntime", b)) as head:
                    got = head.infer({"image": x})["logits"]
            else:
                with load_engine(root, man.engine(s.id, "head", "onnxruntime", b)) as head, \
                        load_engine(root, man.engine(s.id, "tail", "onnxruntime", b)) as tail:
                    z = head.infer({"image": x})[s.wire_tensor]
                    assert z.shape[0] == b
                    got = tail.infer({s.wire_tensor: z})["logits"]
            assert got.shape == want.shape
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, (s.id, b)


def test_engines_are_recorded_with_target_and_hash(b0_engines):
    root, report = b0_engines
    man = read_manifest(root)
    n_splits = sum(s.kind == "split" for s in man.splits)
    # per batch: a head and a tail per split, and the whole model for local/head and offload/tail
    assert len(man.engines) == len(BATCHES) * (2 * n_splits + 2)
    files = {e.path for e in man.engines}
    assert len(files) == len(BATCHES) * (2 * n_splits + 1)  # the whole model is built once per batch
    for e in man.engines:
        assert e.target["version"] and e.target["device"] and e.sha256 and e.source_sha256
        assert (root / e.path).is_file()
        assert e.max_rel_diff is not None and e.max_rel_diff < 1e-4
    # the fixed batch size is in the engine
    import onnx

    e = man.engine("cut033", "head", "onnxruntime", 3)
    dims = onnx.load(root / e.path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 3


def test_rebuild_is_idempotent_and_follows_options(b0_engines):
    root, _ = b0_engines
    again = build_engines(root, "onnxruntime", batch_sizes=[1], parts="heads")
    assert not again.built and again.kept
    changed = build_engines(root, "onnxruntime", batch_sizes=[1], parts="heads",
                            options=BuildOptions(optimization="basic"), keep_all=True)
    assert changed.built and not changed.kept
    # default options: rebuilt again
    back = build_engines(root, "onnxruntime", batch_sizes=[1], parts="heads", keep_all=True)
    assert back.built


def test_tampered_engine_is_refused(b0_engines, tmp_path):
    root, _ = b0_engines
    man = read_manifest(root)
    rec = man.engine("cut050", "tail", "onnxruntime", 1)
    path = root / rec.path
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(UserError, match="sha256"):
        load_engine(root, rec)
    # build notices and rebuilds it
    rep = build_engines(root, "onnxruntime", batch_sizes=[1], parts="tails", keep_all=True)
    assert any(e.path == rec.path for e in rep.built)
    load_engine(root, read_manifest(root).engine("cut050", "tail", "onnxruntime", 1))


def test_tampered_onnx_or_manifest_is_refused(b0_engines, tmp_path):
    import shutil

    root, _ = b0_engines
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    head = copy / "head-cut033.onnx"
    head.write_bytes(head.read_bytes() + b"\0")
    with pytest.raises(UserError, match="head-cut033.onnx.*sha256"):
        build_engines(copy, "onnxruntime", batch_sizes=[2], parts="heads")
    m = json.loads((copy / "manifest.json").read_text())
    m["schema"] = "dsc-export.split/99"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest"):
        build_engines(copy, "onnxruntime", batch_sizes=[2], parts="heads")


def test_float16_engines_verify(b0_engines):
    root, _ = b0_engines
    rep = build_engines(root, "onnxruntime", batch_sizes=[2], parts="heads", precision="fp16", keep_all=True)
    assert rep.built and not rep.failed
    assert all(0 < e.max_rel_diff < 3e-2 for e in rep.built)


@pytest.mark.parametrize("text,want", [("1,2,4", [1, 2, 4]), ("4,1,4", [1, 4]), ("1-4", [1, 2, 3, 4]),
                                       ("1:64", [1, 2, 4, 8, 16, 32, 64])])
def test_parse_batch_sizes(text, want):
    assert parse_batch_sizes(text) == want


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", "", "4-2"])
def test_parse_batch_sizes_refuses(bad):
    with pytest.raises(UserError, match="positive integers"):
        parse_batch_sizes(bad)


def test_cli_build_one_line_errors(b0_engines, tmp_path):
    root, _ = b0_engines
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    def run(*a):
        return subprocess.run([sys.executable, "-m", "dsc_export", *a], capture_output=True, text=True, env=env)
    r = run("build", str(root), "--batch-sizes", "0")
    assert r.returncode == 2 and "positive integers" in r.stderr and "Traceback" not in r.stderr
    r = run("build", str(tmp_path))
    assert r.returncode == 1 and "not a split dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    if get_backend("tensorrt").available():
        r = run("build", str(root), "--backend", "tensorrt")
        assert r.returncode == 1 and "tensorrt" in r.stderr.lower() and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_emits_trtexec_commands(b0_engines, tmp_path):
    root, _ = b0_engines
    from click.testing import CliRunner

    from dsc_export.cli import cli

    out = tmp_path / "heads.sh"
    r = CliRunner().invoke(cli, ["build", str(root), "--parts", "heads", "--batch-sizes", "1,8",
                                 "--emit-trtexec", str(out)])
    assert r.exit_code == 0, r.output
    import shlex

    cmds = [shlex.split(ln) for ln in out.read_text().splitlines() if ln.startswith("trtexec")]
    man = read_manifest(root)
    heads = [s for s in man.splits if s.head]
    assert len(cmds) == len({s.head for s in heads})  # one engine per part: a profile per batch size
    per_sample = "x".join(str(d) for d in man.model.input.shape[1:])
    profiles = [f"--{w}Shapes='{man.model.input.name}':{b}x{per_sample}" for b in (1, 8) for w in ("min", "opt", "max")]
    assert ["trtexec", "--onnx=head-cut033.onnx", "--saveEngine=engines/tensorrt/head-cut033-fp32.plan",
            "--profile=0", *profiles[:3], "--profile=1", *profiles[3:]] in [c[:11] for c in cmds]
    assert all("--stronglyTyped" in c and "--noTF32" in c and any(a.startswith("--timingCacheFile=") for a in c)
               for c in cmds)


BLOCKED = ("torch", "timm", "tensorrt", "cuda", "tritonclient", "pytriton")


def test_import_and_help_work_without_optional_extras():
    code = (
        "import sys\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None  # import raises ImportError\n"
        "import dsc_export, dsc_export.cli, dsc_export.engines, dsc_export.backends\n"
        "from dsc_export.cli import main\n"
        "for argv in (['--help'], ['build', '--help'], ['split', '--help']):\n"
        "    sys.argv = ['dsc-export'] + argv\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "from dsc_export.backends import get_backend\n"
        "why = get_backend('tensorrt').available()\n"
        "assert 'tensorrt' in why.lower() and 'extra' in why, why\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("OK") and "Usage: dsc-export build" in r.stdout


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(b0_engines):
    root, _ = b0_engines
    rep = build_engines(root, "tensorrt", batch_sizes=[2], parts="all")
    assert not rep.failed
    man = read_manifest(root)
    x = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    want = make_session(root / man.model.path).run(None, {"image": x})[0]
    s = man.split("cut050")
    with load_engine(root, man.engine(s.id, "head", "tensorrt", 2)) as head, \
            load_engine(root, man.engine(s.id, "tail", "tensorrt", 2)) as tail:
        got = tail.infer({s.wire_tensor: head.infer({"image": x})[s.wire_tensor]})["logits"]
        assert head.time_ms({"image": x}) > 0
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
    assert (root / "engines" / "tensorrt" / "tensorrt.timing-cache").is_file()


def test_backend_errors_say_which_step_failed(tmp_path):
    """Backends raise one hierarchy (all one-line UserErrors): a runner used outside its ``with``
    block is an InferenceError, a model the builder refuses a BuildError."""
    import graphs

    from dsc_export.errors import BackendError, BuildError, InferenceError

    model, _ = graphs.chain()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    backend = get_backend("onnxruntime")
    runner = backend.load_onnx(path)
    feeds = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    with pytest.raises(InferenceError, match="not active"):
        runner.infer(feeds)
    with runner:
        assert runner.infer(feeds)  # the same runner works inside its block
    model.graph.node[-1].op_type = "NoSuchOp"  # loads as ONNX; onnxruntime has no kernel for it
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BuildError, match="cannot build") as e:
        backend.build(path, tmp_path / "m.b1.onnx", batch=1, precision="fp32", options=BuildOptions())
    assert isinstance(e.value, BackendError) and isinstance(e.value, UserError)
    assert not (tmp_path / "m.b1.onnx").exists()
