"""Weights stored once: the shared store, kilobytes per batch size, tamper refusal by name, and
the keep/drop decision of build."""

import hashlib
import io
import tarfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dsc_export.artifacts import read_manifest
from dsc_export.engines import PartRunner, build_engines, load_engine, pays
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.splitting import split_model
from dsc_export.weight_store import MIN_BYTES, externalize, save_shared, tree_bytes


def test_externalize_stores_equal_tensors_once_and_the_model_runs_the_same(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    small = rng.standard_normal((4,)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["b"]),
         helper.make_node("Add", ["b", "s"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2"),
         numpy_helper.from_array(np.tile(small, 8), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    want = make_session(model.SerializeToString()).run(None, {"x": w[:3]})[0]
    blobs = save_shared(model, tmp_path / "m.onnx")
    assert blobs == [f"weights/{hashlib.sha256(w.tobytes()).hexdigest()}.bin"]  # w1 and w2: one file
    assert (tmp_path / blobs[0]).read_bytes() == w.tobytes()
    assert 32 * 4 < MIN_BYTES  # s stays in the graph
    got = make_session(tmp_path / "m.onnx").run(None, {"x": w[:3]})[0]
    assert np.array_equal(got, want)
    assert externalize(onnx.load(tmp_path / "m.onnx", load_external_data=False)) == {}  # already external


@pytest.fixture(scope="module")
def one_cut(exported, tmp_path_factory):
    """B0 split at one compressive bottleneck (model, one head, one tail), engines at batch 1."""
    rep = exported("efficientnet_b0")
    base = tmp_path_factory.mktemp("weights")
    full = split_model(rep.path, base / "full", verify=False)
    tensor = full.split("cut033").tensor
    root = base / "split"
    split_model(rep.path, root, at=[tensor])
    build_engines(root, "onnxruntime", batch_sizes=[1], parts="all", keep_all=True)
    return rep.path, root


def test_split_dir_stores_each_weight_once_and_stays_exact(one_cut):
    src, root = one_cut
    m = onnx.load(src)
    distinct = {hashlib.sha256(t.raw_data).hexdigest(): len(t.raw_data) for t in m.graph.initializer
                if len(t.raw_data) >= MIN_BYTES}
    store = sorted((root / "weights").iterdir())  # the source's and the engines' (one store)
    for p in store:  # each file named by its content
        assert hashlib.sha256(p.read_bytes()).hexdigest() + ".bin" == p.name
    assert {p.name[:-4] for p in store} >= set(distinct)  # the source's weights, each once
    man = read_manifest(root)
    source_blobs = {root / d for ds in man.data.values() for d in ds}
    assert sum(p.stat().st_size for p in source_blobs) <= 1.01 * sum(distinct.values())
    graphs = sum((root / f).stat().st_size for f in man.data)
    assert graphs < 0.05 * sum(distinct.values())  # model, head and tail: graphs only
    # head -> tail against onnxruntime on the exported file itself
    s = man.split("cut033")
    x = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    want = make_session(src).run(None, {"image": x})[0]
    z = make_session(root / s.head).run(None, {"image": x})[0]
    got = make_session(root / s.tail).run(None, {s.wire_tensor: z})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_another_batch_size_adds_kilobytes(one_cut):
    _, root = one_cut
    store = root / "weights"
    before = {p.name for p in store.iterdir()}
    weights = tree_bytes(list(store.iterdir()))
    rep = build_engines(root, "onnxruntime", batch_sizes=[2], parts="all", keep_all=True)
    assert len({e.path for e in rep.built}) == 3 and not rep.failed
    new_blobs = [p for p in store.iterdir() if p.name not in before]
    assert (tree_bytes(new_blobs) if new_blobs else 0) <= 0.01 * weights
    man = read_manifest(root)
    read = {root / d for e in rep.built for d in e.data}
    assert read and all(p.parent == store for p in read)  # the split dir's one store
    assert all((root / e.path).parent == root for e in rep.built)  # engines beside the parts
    added = tree_bytes(new_blobs + [root / p for p in {e.path for e in rep.built}])
    assert added < 0.02 * tree_bytes(list(read))  # three engines: graphs (kilobytes) over shared weights
    x = np.random.default_rng(4).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    want = make_session(root / man.model.path).run(None, {"image": x})[0]
    with load_engine(root, man.engine("local", "head", "onnxruntime", 2)) as r:
        got = r.infer({"image": x})["logits"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_tensor_equal_in_the_source_and_an_engine_is_stored_once(one_cut):
    """The optimiser leaves some tensors as they are (e.g. the classifier): the engine and the
    source read the same blob, and the store holds no file that no file of the dir reads."""
    _, root = one_cut
    man = read_manifest(root)
    source_blobs = {d for ds in man.data.values() for d in ds}
    engine_blobs = {d for e in man.engines for d in e.data}
    src = onnx.load(root / man.model.path)  # the weights as the source holds them, read independently
    raw = {hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest() for t in src.graph.initializer}
    shared = source_blobs & engine_blobs
    assert shared and all(p.split("/")[-1][:-4] in raw for p in shared)
    store = {f"weights/{p.name}" for p in (root / "weights").iterdir()}
    assert store == source_blobs | engine_blobs  # pruned to what is read, each once
    assert not (root / "engines" / "onnxruntime").exists()


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_shared_weights_file_is_refused_by_name(one_cut, tmp_path):
    import shutil

    _, src_root = one_cut
    root = tmp_path / "copy"
    shutil.copytree(src_root, root)
    man = read_manifest(root)
    blob = man.data[man.split("cut033").head][-1]
    _flip(root / blob)
    with pytest.raises(UserError, match=blob.split("/")[-1] + ".*sha256"):
        build_engines(root, "onnxruntime", batch_sizes=[1], parts="heads")
    rec = man.engine("cut033", "tail", "onnxruntime", 1)
    eblob = rec.data[0]
    _flip(root / eblob)
    with pytest.raises(UserError, match=eblob.split("/")[-1] + ".*sha256"):
        load_engine(root, rec)


def test_server_bundle_stores_weights_once_and_refuses_a_changed_one(one_cut, tmp_path):
    pytest.importorskip("tritonclient", reason="the 'serve' extra (tritonclient) is not installed")
    from dsc_export.bundle import make_bundle, open_bundle

    _, root = one_cut
    index = make_bundle(root, "server", tmp_path / "srv.tar")
    with tarfile.open(tmp_path / "srv.tar") as t:
        members = t.getmembers()
    links = [m for m in members if m.islnk()]
    assert links and all(m.name.startswith("triton/") for m in links)  # the repository's weights: links
    stored = sum(m.size for m in members if m.isfile() and m.name != "bundle.json")
    out = tmp_path / "srv"
    open_bundle(tmp_path / "srv.tar", out, expect_side="server")
    listed = sum((out / f).stat().st_size for f in index["files"])  # every name counted
    assert stored == index["sizes"]["total"] < listed
    sess = make_session(out / "triton" / "cut033" / "1" / "model.onnx")  # Triton's model, in place
    assert [i.name for i in sess.get_inputs()] == ["input"]
    target = next(m.name for m in members if m.isfile() and m.name.startswith("weights/"))
    with tarfile.open(tmp_path / "srv.tar") as t, tarfile.open(tmp_path / "bad.tar", "w") as bad:
        for m in t.getmembers():
            if m.isfile():
                data = bytearray(t.extractfile(m).read())
                if m.name == target:
                    data[0] ^= 1
                bad.addfile(m, io.BytesIO(bytes(data)))
            else:
                bad.addfile(m)
    with pytest.raises(UserError, match=target.replace(".", r"\.") + ".*sha256"):
        open_bundle(tmp_path / "bad.tar", tmp_path / "o")
    evil = tarfile.TarInfo("weights/evil.bin")
    evil.type, evil.linkname = tarfile.LNKTYPE, "/etc/passwd"
    with tarfile.open(tmp_path / "srv.tar") as t, tarfile.open(tmp_path / "evil.tar", "w") as out_t:
        for m in t.getmembers():
            out_t.addfile(m, t.extractfile(m) if m.isfile() else None)
        out_t.addfile(evil)
    with pytest.raises(UserError, match="link"):
        open_bundle(tmp_path / "evil.tar", tmp_path / "o2")


def test_pays_needs_more_than_the_margin():
    assert pays(90.0, 100.0, 0.05) and not pays(96.0, 100.0, 0.05) and not pays(100.0, 100.0, 0.0)


def test_dropped_engines_are_recorded_and_the_runner_uses_the_onnx(exported, tmp_path, monkeypatch):
    import dsc_export.engines.build as engines_mod  # where build_engines calls time_pair
    from dsc_export.profiling import profile_split_dir

    rep = exported("efficientnet_b0")
    root = tmp_path / "split"
    full = split_model(rep.path, tmp_path / "full", verify=False)
    split_model(rep.path, root, at=[full.split("cut033").tensor])
    # the tail's engine does not pay, the others do (timings stood in: the decision is under test)
    tail_input = read_manifest(root).split("cut033").wire_tensor
    monkeypatch.setattr(engines_mod, "time_pair",
                        lambda e, o, feeds, rounds=5: (10.0, 10.2) if tail_input in feeds else (5.0, 10.0))
    report = build_engines(root, "onnxruntime", batch_sizes=[1], parts="all")
    man = read_manifest(root)
    assert [(e.split, e.part) for e in man.dropped] == [("cut033", "tail")]
    gone = man.dropped[0]
    assert gone.speed == {"engine_ms": 10.0, "onnx_ms": 10.2, "margin": 0.05, "threads": None, "kept": False}
    assert not (root / gone.path).exists() and man.engine("cut033", "tail", "onnxruntime", 1) is None
    assert all(e.speed["kept"] for e in man.engines) and man.engine("cut033", "head", "onnxruntime", 1)
    # decision kept
    assert report.dropped and not build_engines(root, "onnxruntime", batch_sizes=[1], parts="all").built
    x = np.random.default_rng(5).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    want = make_session(rep.path).run(None, {"image": x})[0]
    head, tail = PartRunner(root, man, "cut033", "head"), PartRunner(root, man, "cut033", "tail")
    z = head.run({"image": x})[0]
    got = tail.run({tail_input: z})[0]
    assert head._engines and not tail._engines and tail._onnx is not None  # the ONNX ran the tail
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    prof = profile_split_dir(root, "server", batch_sizes=[1], repeats=1, warmup=0)
    assert prof.time_of("cut033", "tail", 1) is not None
