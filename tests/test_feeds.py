"""Parts are fed what they really receive (dsc_export/feeds.py): a tail its head's outputs on the
sample inputs, with their dtype and values, in build's checks and timing and in bench (both roles).

The references are independent: onnxruntime on the whole model with the cut tensor added as an
output, on the same sample inputs.
"""

import json

import cut_models
import numpy as np
import onnx
import pytest

from dsc_export.artifacts import read_manifest
from dsc_export.engines import build_engines
from dsc_export.feeds import PartFeeds, model_samples, part_feeds
from dsc_export.inputs import SampleInputs
from dsc_export.ort import make_session
from dsc_export.profiling import profile_split_dir
from dsc_export.splitting import split_model


def _with_output(path, tensor: str) -> onnx.ModelProto:
    """The model of ``path`` with ``tensor`` added as a graph output (its type left to onnxruntime)."""
    m = onnx.load(path)
    m.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return m


def _cut_values(src, tensor: str, feeds: dict) -> np.ndarray:
    """The value of ``tensor`` when the whole model runs on ``feeds``."""
    sess = make_session(_with_output(src, tensor).SerializeToString())
    return sess.run([tensor], feeds)[0]


@pytest.fixture(scope="module")
def mask_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("mask")
    onnx.save(cut_models.mask_model(), base / "mask.onnx")
    split_model(base / "mask.onnx", base / "split", at=["mask"])
    return base


@pytest.fixture(scope="module", params=["QDQ", "QOperator"])
def int8_dir(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"int8-{request.param}")
    src = cut_models.quantized(base, request.param)
    split_model(src, base / "split")
    return base, src


def test_a_tail_is_fed_its_heads_real_mask(mask_dir):
    root = mask_dir / "split"
    man = read_manifest(root)
    sid = next(s.id for s in man.splits if s.tensor == "mask")
    samples = model_samples(root, man, seed=3)
    feeds = PartFeeds(root, man, sid, "tail", samples)
    got = feeds.feeds(4, 1)
    want = _cut_values(mask_dir / "mask.onnx", "mask", samples.feeds(4, 1))
    assert list(got) == [man.split(sid).wire_tensor]
    z = got[man.split(sid).wire_tensor]
    assert z.dtype == np.int64 and z.shape == (4, 8, 8)
    assert np.array_equal(z, want) and 0 <= z.min() and z.max() <= 3  # classes, not random int64
    assert feeds.feeds(4, 1) is got  # computed once per (batch, index)
    assert "outputs of head-" in feeds.description
    # a head and the whole model read the model's input: the sample inputs themselves
    x = PartFeeds(root, man, sid, "head", samples).feeds(2)
    assert np.array_equal(x["image"], samples.feeds(2)["image"])
    assert PartFeeds(root, man, "offload", "tail", samples).model_input


def test_bench_server_times_an_integer_cut_on_real_values(mask_dir):
    """The tail indexes a 4-colour palette with the mask: random int64 or float32 data fails."""
    root = mask_dir / "split"
    build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="all")
    prof = profile_split_dir(root, "server", batch_sizes=[1, 2], repeats=2, warmup=1)
    man = read_manifest(root)
    timed = {(t.split, t.batch) for t in prof.timings if t.part == "tail"}
    assert timed == {(s.id, b) for s in man.splits if s.tail for b in (1, 2)}
    assert all(t.median_ms > 0 for t in prof.timings)
    assert "head's outputs" in prof.settings["inputs"]
    dev = profile_split_dir(root, "device", batch_sizes=[1, 2], repeats=2, warmup=1, threads=1)
    assert {t.split for t in dev.timings} == {s.id for s in man.splits if s.head}


def test_int8_tails_get_quantized_cut_tensors(int8_dir):
    base, src = int8_dir
    root = base / "split"
    man = read_manifest(root)
    cuts = [s for s in man.splits if s.kind == "split"]
    ints = [s for s in cuts if np.dtype(next(c.dtype for c in man.cut_points if c.tensor == s.tensor)).kind in "ui"]
    assert ints, "a quantized model has integer cut tensors"
    samples = model_samples(root, man)
    for s in ints:
        z = part_feeds(root, man, s.id, "tail").feeds(2)[s.wire_tensor]
        want = _cut_values(src, s.tensor, samples.feeds(2))
        assert z.dtype == want.dtype and z.dtype.kind in "ui" and np.array_equal(z, want), s.id


def test_int8_build_and_bench_server_run_every_tail(int8_dir):
    base, _ = int8_dir
    root = base / "split"
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="tails")
    assert not rep.failed
    prof = profile_split_dir(root, "server", batch_sizes=[1, 2], repeats=2, warmup=1)
    man = read_manifest(root)
    assert {(t.split, t.batch) for t in prof.timings} == {(s.id, b) for s in man.splits if s.tail for b in (1, 2)}


def test_build_checks_a_tail_on_its_heads_outputs(mask_dir, monkeypatch):
    """The engine check of a tail runs the tail on the head's outputs, not on random data."""
    import dsc_export.engines.build as engines

    seen = []
    real = engines._check_engine

    def spy(backend, engine, reference, inputs, job, precision, **kw):
        seen.append((job.source, inputs.feeds(kw["batch"])))
        return real(backend, engine, reference, inputs, job, precision, **kw)

    monkeypatch.setattr(engines, "_check_engine", spy)
    root = mask_dir / "split"
    man = read_manifest(root)
    sid = next(s.id for s in man.splits if s.tensor == "mask")
    build_engines(root, "onnxruntime", batch_sizes=[3], parts="tails", keep_all=True)
    tail = [f for src, f in seen if src == man.split(sid).tail]
    assert tail, "the tail's engine was checked"
    samples = SampleInputs.random(onnx.load(mask_dir / "mask.onnx"))
    want = _cut_values(mask_dir / "mask.onnx", "mask", samples.feeds(3))
    assert np.array_equal(tail[0][man.split(sid).wire_tensor], want)


def test_bench_records_what_it_fed(mask_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = mask_dir / "split"
    out = tmp_path / "srv.json"
    r = subprocess.run([sys.executable, "-m", "dsc_export", "bench", str(root), "--role", "server",
                        "--batch-sizes", "1", "--repeats", "2", "-o", str(out)], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "head's outputs" in json.loads(out.read_text())["settings"]["inputs"]
