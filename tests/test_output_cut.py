"""A cut at a tensor that is a graph output and also feeds the rest is a real split: the head
returns it (kept and sent), the tail computes the other outputs, the outputs are assembled by
name; exact against onnxruntime on the whole model."""

import cut_models
import graphs
import numpy as np
import onnx
import pytest

from dsc_export.artifacts import read_manifest
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.serving.protocol import head_outputs, served_outputs, tail_contract
from dsc_export.splitting import analyze_file, split_model


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    base = tmp_path_factory.mktemp("emb")
    onnx.save(cut_models.embedding_model(), base / "emb.onnx")
    return base


def _whole(src, x):
    sess = make_session(src)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))


def test_analyze_lists_an_output_that_dominates_the_rest(emb):
    a = analyze_file(emb / "emb.onnx")
    assert [c.tensor for c in a.cut_points][-1] == "emb"  # logits: a leaf output, not listed
    assert "logits" not in [c.tensor for c in a.cut_points]
    cp = next(c for c in a.cut_points if c.tensor == "emb")
    assert cp.shape == [16] and cp.bytes == 64


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_split_at_an_output_is_exact(emb, wire):
    out = emb / f"split-{wire}"
    man = split_model(emb / "emb.onnx", out, at=["emb"], wire_dtype=wire)
    s = next(s for s in man.splits if s.tensor == "emb")
    assert head_outputs(man, s) == ["emb"]
    head, tail = make_session(out / s.head), make_session(out / s.tail)
    assert [o.name for o in tail.get_outputs()] == ["logits"]  # the tail computes the rest only
    assert [o.name for o in head.get_outputs()] == ([s.wire_tensor] + (["emb"] if wire == "float16" else []))
    x = np.random.default_rng(5).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = _whole(emb / "emb.onnx", x)
    got_head = dict(zip([o.name for o in head.get_outputs()], head.run(None, {"image": x})))
    (logits,) = tail.run(None, {s.wire_tensor: got_head[s.wire_tensor]})
    assert np.array_equal(got_head["emb"], want["emb"])  # the device keeps the exact embedding
    if wire == "float32":
        assert np.array_equal(logits, want["logits"])
    else:
        assert np.abs(logits - want["logits"]).max() <= 1e-2 * np.abs(want["logits"]).max()
    # the server sends logits only for this split, every output for offload
    contract = served_outputs(out, man)
    assert [c.name for c in tail_contract(contract, man, s)] == ["logits"]
    assert [c.name for c in tail_contract(contract, man, man.split("offload"))] == ["emb", "logits"]


def test_a_leaf_output_is_still_the_local_candidate(emb):
    with pytest.raises(UserError, match="--at 'logits' is a graph output: cutting there is the 'local'"):
        split_model(emb / "emb.onnx", emb / "leaf", at=["logits"])
    assert not (emb / "leaf").exists()


def test_early_output_graph_splits_exactly(tmp_path):
    model, cuts = graphs.early_output()
    onnx.save(model, tmp_path / "m.onnx")
    man = split_model(tmp_path / "m.onnx", tmp_path / "s", at=cuts)
    s = next(s for s in man.splits if s.kind == "split")
    assert s.tensor == "a" and s.max_abs_diff == 0.0
    assert read_manifest(tmp_path / "s").split(s.id).tensor == "a"


def test_client_assembles_the_kept_output_by_name(emb):
    """The client's assembly (no server needed): the head's kept output, the server's rest."""
    from dsc_export.serving.client import DynamicSplitClient

    out = emb / "split-float32"
    if not out.exists():
        split_model(emb / "emb.onnx", out, at=["emb"])
    man = read_manifest(out)
    client = object.__new__(DynamicSplitClient)
    client.contract = served_outputs(out, man)
    client._constants = {}
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _whole(emb / "emb.onnx", x)
    got = client._from_server({"logits": want["logits"]}, {"emb": want["emb"]})
    assert list(got) == ["emb", "logits"] and got["emb"] is want["emb"]


def test_served_split_at_an_output_returns_every_output_exactly(emb, tmp_path):
    """serve + the client, and the server bundle's Triton config: the server sends the rest only."""
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    from google.protobuf import text_format
    from test_serving import free_ports
    from tritonclient.grpc import model_config_pb2

    from dsc_export.bundle import make_bundle, open_bundle
    from dsc_export.engines import build_engines
    from dsc_export.planning import make_plan
    from dsc_export.profiling import profile_split_dir
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient
    from dsc_export.serving.server import ServeOptions, TailServer

    root = tmp_path / "s"
    man = split_model(emb / "emb.onnx", root, at=["emb"])
    sid = next(s.id for s in man.splits if s.tensor == "emb")
    build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="all", keep_all=True)
    dev = profile_split_dir(root, "device", batch_sizes=[1, 2], repeats=2, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", batch_sizes=[1, 2], repeats=2, warmup=1)
    (root / "plan.json").write_text(make_plan(read_manifest(root), dev, srv, batch_sizes=[1, 2],
                                              rates=[1, 10, 100]).to_json())
    make_bundle(root, "server", tmp_path / "srv.tar")
    open_bundle(tmp_path / "srv.tar", tmp_path / "srv", expect_side="server")
    cfg = text_format.Parse((tmp_path / "srv" / "triton" / sid / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert [o.name for o in cfg.output] == ["logits"]
    x = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _whole(emb / "emb.onnx", x)
    http, grpc, metrics = free_ports(3)
    with TailServer(root, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                                       log_file=tmp_path / "triton.log")) as server:
        for split in (sid, "offload"):
            logs = []
            with DynamicSplitClient(root, server.urls()["http"],
                                    options=ClientOptions(static=split, ready_timeout_s=30), log=logs.append) as client:
                got = client.infer(x)
            assert logs[0].split == split and logs[0].fallback is None
            assert list(got) == ["emb", "logits"]
            assert all(np.array_equal(got[n], want[n]) for n in want), split


def test_an_output_that_feeds_more_but_is_bypassed_is_not_a_cut_point(tmp_path):
    """logits also read an earlier tensor than emb: emb is an output that feeds more, yet not a cut
    point; --at says why (not that it is the 'local' candidate)."""
    from onnx import TensorProto, helper

    m = cut_models.embedding_model()
    # y = logits + mean(r2): r2 bypasses emb on the way to y
    m.graph.node.extend([helper.make_node("ReduceMean", ["r2"], ["r2m"], axes=[1, 2, 3], keepdims=0),
                         helper.make_node("Unsqueeze", ["r2m", "one"], ["r2u"]),
                         helper.make_node("Add", ["logits", "r2u"], ["y"])])
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one"))
    m.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]))
    m.opset_import[0].version = 17
    onnx.save(m, tmp_path / "m.onnx")
    a = analyze_file(tmp_path / "m.onnx")
    assert "emb" not in [c.tensor for c in a.cut_points]
    with pytest.raises(UserError, match=r"--at 'emb' is not a cut point \(.*r2"):
        split_model(tmp_path / "m.onnx", tmp_path / "s", at=["emb"])
