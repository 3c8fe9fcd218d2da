"""Wire forms of a cut (issue 23): float32 / float16 / int8 by graph surgery, Eq. 3 per form,
calibration on one part of the inputs and fidelity on the other, the plan's fidelity floor.

Every figure is checked against an independent computation: onnxruntime on the whole model
(with the cut tensor as an extra output), quantize-dequantize written out in numpy, agreement
counted sample by sample, plan choices by brute force over Eq. 4.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from served_models import conv_net

from dsc_export.artifacts import Manifest, Profile, Timing, read_manifest
from dsc_export.calibration import RANDOM_NOTE
from dsc_export.errors import UserError
from dsc_export.graph import wire
from dsc_export.graph.cuts import compressive_mask
from dsc_export.ort import make_session
from dsc_export.planning import eq4_ms, make_plan
from dsc_export.splitting import split_model

ROOT = Path(__file__).parents[1]
FORMS = ["float32", "float16", "int8"]
K = 12  # sample inputs: 6 calibrate, 6 are held out


def _inputs(tmp_path, k=K, seed=7):
    x = np.random.default_rng(seed).standard_normal((k, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", image=x)
    return tmp_path / "x.npz", x


def _whole_with(src, tensors, x):
    """The whole model's outputs and the named inner tensors (onnxruntime, one session)."""
    m = onnx.load(str(src))
    m.graph.output.extend(
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors]
    )
    outs = make_session(m.SerializeToString()).run(None, {"image": x})
    return outs[0], dict(zip(tensors, outs[1:]))


@pytest.fixture(scope="module")
def forms_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wire")
    src = tmp / "m.onnx"
    onnx.save(conv_net(), src)
    npz, x = _inputs(tmp)
    man = split_model(src, tmp / "split", wires=FORMS, inputs=npz)
    return src, tmp / "split", man, x


def test_eq3_per_form_on_that_forms_bytes(forms_dir):
    _, _, man, _ = forms_dir
    for f in FORMS:
        size = {"float32": 4, "float16": 2, "int8": 1}[f]
        ratios = [c.elements * size / man.model.input_bytes for c in man.cut_points]
        assert [c.forms[f]["bytes"] for c in man.cut_points] == [
            c.elements * size for c in man.cut_points
        ]
        want = [c.tensor for c, m in zip(man.cut_points, compressive_mask(ratios)) if m]
        made = [s.tensor for s in man.splits if s.kind == "split" and s.wire == f]
        assert made == want, f
    # the sets differ: int8 pays at the first conv already, float32 only after the pooling
    made = {f: {s.tensor for s in man.splits if s.wire == f} for f in FORMS}
    assert made["float32"] < made["float16"] < made["int8"]


def test_ids_bytes_and_wire_dtypes(forms_dir):
    _, root, man, x = forms_dir
    for s in (s for s in man.splits if s.kind == "split"):
        cp = next(c for c in man.cut_points if c.tensor == s.tensor)
        assert s.cut == f"cut{cp.index:03d}" and s.id == (
            s.cut if s.wire == "float32" else f"{s.cut}-{s.wire}"
        )
        z = make_session(root / s.head).run([s.wire_tensor], {"image": x[:3]})[0]
        assert z.dtype == {"float32": np.float32, "float16": np.float16, "int8": np.int8}[s.wire]
        assert z.nbytes == 3 * s.bytes  # what the head sends is the manifest's bytes per sample
        if s.wire == "int8":
            assert s.bytes == cp.elements


def test_float32_head_tail_equals_whole_and_float16_within_tolerance(forms_dir):
    src, root, man, x = forms_dir
    want = make_session(src).run(None, {"image": x})[0]
    for s in (s for s in man.splits if s.wire in ("float32", "float16") and s.kind == "split"):
        z = make_session(root / s.head).run([s.wire_tensor], {"image": x})[0]
        got = make_session(root / s.tail).run(None, {s.wire_tensor: z})[0]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= (1e-6 if s.wire == "float32" else 2e-2), s.id
        if s.wire == "float16":
            assert rel > 0  # the cast is real


def test_a_float16_form_beyond_its_tolerance_is_refused_in_one_line_with_its_figure(forms_dir, tmp_path,
                                                                                   monkeypatch):
    """bench_wire's B0 (random weights, BatchNorm fitted to random pixels, measured on photos)
    failed here: a float16 form over its tolerance stops the split, naming the form, its measured
    error (the one a passing split records) and the tolerance, and writes nothing."""
    import re

    import dsc_export.compare as compare
    from dsc_export.errors import VerificationError

    src, _, man, _ = forms_dir
    npz, _ = _inputs(tmp_path)
    recorded = {s.id: s.max_rel_diff for s in man.splits if s.wire == "float16"}
    assert recorded and all(0 < r <= 2e-2 for r in recorded.values())
    monkeypatch.setitem(compare.REL_TOLERANCE, "float16", 1e-9)
    with pytest.raises(VerificationError) as err:
        split_model(src, tmp_path / "s", wires=FORMS, inputs=npz)
    msg = str(err.value)
    m = re.fullmatch(r"split (cut\d+-float16) at '[^']+' does not reproduce the model: max relative difference "
                     r"(\S+) > 1e-09 \(max abs \S+\); nothing was written", msg)
    assert m and "\n" not in msg, msg
    assert float(m.group(2)) == pytest.approx(recorded[m.group(1)], rel=1e-2)  # printed to 3 digits
    assert not (tmp_path / "s").exists()


def _numpy_qdq(x, scale, zp):
    """QuantizeLinear / DequantizeLinear as the ONNX spec writes them, in float32 numpy."""
    q = np.clip(np.rint(x.astype(np.float32) / np.float32(scale)) + zp, -128, 127).astype(np.int8)
    return q, ((q.astype(np.float32) - np.float32(zp)) * np.float32(scale)).astype(np.float32)


def test_int8_scale_is_calibrated_on_the_first_half_and_values_match_numpy(forms_dir):
    src, root, man, x = forms_dir
    int8 = [s for s in man.splits if s.wire == "int8"]
    _, inner = _whole_with(src, [s.tensor for s in int8], x)
    assert man.samples["calibration"] == [f"#{k}" for k in range(6)]
    assert man.samples["held_out"] == [f"#{k}" for k in range(6, K)]
    for s in int8:
        cal = inner[s.tensor][:6].astype(np.float64)
        lo, hi = min(cal.min(), 0.0), max(cal.max(), 0.0)
        scale = np.float32((hi - lo) / 255)
        zp = int(np.clip(np.rint(-128 - lo / float(scale)), -128, 127))
        assert (
            s.quant["scale"] == pytest.approx(float(scale), rel=1e-7)
            and s.quant["zero_point"] == zp
        )
        assert s.quant["axis"] is None and s.quant["dtype"] == "int8"
        q_ref, dq_ref = _numpy_qdq(inner[s.tensor], s.quant["scale"], s.quant["zero_point"])
        q = make_session(root / s.head).run([s.wire_tensor], {"image": x})[0]
        assert np.array_equal(q, q_ref), s.id
        tail = onnx.load(str(root / s.tail))  # the dequantized tensor, as the tail computes it
        tail.graph.output.append(helper.make_tensor_value_info(s.tensor, TensorProto.FLOAT, None))
        dq = make_session(tail.SerializeToString()).run([s.tensor], {s.wire_tensor: q})[0]
        assert np.array_equal(dq, dq_ref), s.id
        held = inner[s.tensor][6:]
        outside = np.mean(
            (np.rint(held / np.float32(scale)) + zp < -128)
            | (np.rint(held / np.float32(scale)) + zp > 127)
        )
        assert s.quant["clipped"] == pytest.approx(float(outside), abs=1e-12)


def test_fidelity_counts_agreement_on_the_held_out_half(forms_dir):
    src, root, man, x = forms_dir
    held = x[6:]
    want = make_session(src).run(None, {"image": held})[0]
    for s in man.splits:
        if s.kind == "split":
            z = make_session(root / s.head).run([s.wire_tensor], {"image": held})[0]
            got = make_session(root / s.tail).run(None, {s.wire_tensor: z})[0]
        else:
            got = want
        agree = sum(int(np.argmax(g) == np.argmax(w)) for g, w in zip(got, want)) / len(want)
        f = s.fidelity
        assert f["samples"] == K - 6 and f["reference"] == "logits" and f["argmax_note"] is None
        assert f["top1_agreement"] == pytest.approx(agree), s.id
        # the same figure up to float32 rounding of the sessions (other fusions than split's)
        ulps = 1e-5 * float(np.abs(want).max())
        assert f["max_abs"] == pytest.approx(
            float(np.abs(got.astype(np.float64) - want).max()), abs=ulps
        ), s.id
    i8 = [s for s in man.splits if s.wire == "int8"]
    assert all(
        s.max_rel_diff is not None and s.max_rel_diff > 1e-5 for s in i8
    )  # lossy, recorded, not refused
    assert not any(RANDOM_NOTE[:30] in n for n in man.notes)


def test_random_inputs_say_so_in_one_note(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    man = split_model(tmp_path / "m.onnx", tmp_path / "s", wires=["float32", "int8"])
    notes = [n for n in man.notes if "random inputs" in n and "--inputs" in n]
    assert len(notes) == 1 and man.samples["random"] is True
    assert all(s.fidelity["samples"] == 16 for s in man.splits)
    man16 = split_model(tmp_path / "m.onnx", tmp_path / "s16", wires=["float16"])
    assert not any("random inputs" in n for n in man16.notes)  # float16 needs no calibration


def test_wire_dtype_keeps_working_as_one_form(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    man = split_model(tmp_path / "m.onnx", tmp_path / "s", wire_dtype="float16")
    cuts = [s for s in man.splits if s.kind == "split"]
    assert man.wire_dtype == "float16" and man.wires == ["float16"]
    assert cuts and all(s.wire == "float16" and s.id.endswith("-float16") for s in cuts)
    assert [s.tensor for s in cuts] == [c.tensor for c in man.cut_points if c.compressive]


def test_a_one_byte_tensor_gets_no_int8_form():
    assert wire.forms_of("uint8") == ["float32"] and wire.forms_of("int8") == ["float32"]
    assert wire.forms_of("int64") == ["float32"] and wire.forms_of("float16") == ["float32", "int8"]
    assert wire.forms_of("float32") == FORMS
    assert wire.itemsize("uint8", "int8") == 1 and wire.itemsize("int64", "float16") == 8


def test_per_channel_only_when_it_wins_on_held_out(tmp_path):
    onnx.save(conv_net(), tmp_path / "m.onnx")
    npz, x = _inputs(tmp_path)
    man = split_model(
        tmp_path / "m.onnx", tmp_path / "s", wires=["int8"], inputs=npz, per_channel=True
    )
    _, inner = _whole_with(
        tmp_path / "m.onnx", [s.tensor for s in man.splits if s.wire == "int8"], x
    )
    for s in (s for s in man.splits if s.wire == "int8"):
        held = inner[s.tensor][6:].astype(np.float64)
        per_tensor = wire.calibrate(inner[s.tensor][:6])
        per_channel = wire.calibrate(inner[s.tensor][:6], axis=1)

        def mse(q):
            scale = np.asarray(q.scale, np.float32).astype(np.float64)
            zp = np.asarray(q.zero_point, np.float64)
            if q.axis is not None:
                scale, zp = (
                    scale.reshape(1, -1, *[1] * (held.ndim - 2)),
                    zp.reshape(1, -1, *[1] * (held.ndim - 2)),
                )
            y = np.clip(np.rint(held / scale) + zp, -128, 127)
            return float(np.mean(((y - zp) * scale - held) ** 2))

        wins = mse(per_channel) < mse(per_tensor)
        assert (s.quant["axis"] == 1) == wins, s.id
        if wins:
            z = make_session(tmp_path / "s" / s.head).run([s.wire_tensor], {"image": x})[0]
            assert z.dtype == np.int8


def _profiles(man: Manifest, head_ms, tail_ms):
    dev, srv = [], []
    for s in man.splits:
        for b in (1, 8):
            if s.head:
                dev.append(
                    Timing(
                        split=s.id,
                        part="head",
                        batch=b,
                        median_ms=head_ms[s.id] * b,
                        p10_ms=0,
                        p90_ms=0,
                        runs=1,
                    )
                )
            if s.tail:
                srv.append(
                    Timing(
                        split=s.id,
                        part="tail",
                        batch=b,
                        median_ms=tail_ms[s.id] * b,
                        p10_ms=0,
                        p90_ms=0,
                        runs=1,
                    )
                )
    def mk(role, t):
        return Profile(role=role, backend="onnxruntime", host={}, emulation=None,
                       model_sha256=man.model.sha256, timings=t)

    return mk("device", dev), mk("server", srv)


def test_plan_floor_by_brute_force(forms_dir):
    _, _, man, _ = forms_dir
    rng = np.random.default_rng(3)
    ids = [s.id for s in man.splits]
    # depth-ordered head times, the rest on the server: every candidate can win somewhere
    head = {
        sid: (0.0 if sid == "offload" else float(k) + rng.uniform(0, 0.5))
        for k, sid in enumerate(ids)
    }
    tail = {sid: float(len(ids) - k) + rng.uniform(0, 0.5) for k, sid in enumerate(ids)}
    dev, srv = _profiles(man, head, tail)
    agreements = {s.id: s.fidelity["top1_agreement"] for s in man.splits}
    for floor in (None, 0.0, 0.5, min(agreements.values()), 1.0):
        plan = make_plan(
            man, dev, srv, batch_sizes=[1, 4, 8], rates=[0.01, 0.1, 1, 10, 100], min_agreement=floor
        )
        want_ids = [
            s.id
            for s in man.splits
            if s.wire != "int8" or (floor is not None and agreements[s.id] >= floor)
        ]
        assert plan.candidates == want_ids, floor
        assert set(plan.excluded) == set(ids) - set(want_ids)
        for i, b in enumerate(plan.batch_sizes):
            for j, r in enumerate(plan.rates_MBps):
                t = {
                    c: eq4_ms(
                        head[c] * b,
                        tail[c] * b if c != "local" else 0.0,
                        next(s.bytes for s in man.splits if s.id == c) if c != "local" else 0,
                        b,
                        r,
                    )
                    for c in want_ids
                }
                best = min(t.values())
                assert t[plan.choice[i][j]] == pytest.approx(best), (floor, b, r)
        shares = plan.shares()
        assert sum(shares.values()) == pytest.approx(1.0)
        cells = [c for row in plan.choice for c in row]
        assert all(shares[c] == pytest.approx(cells.count(c) / len(cells)) for c in plan.candidates)


def test_floor_out_of_range_is_refused(forms_dir):
    _, _, man, _ = forms_dir
    dev, srv = _profiles(man, {s.id: 1.0 for s in man.splits}, {s.id: 1.0 for s in man.splits})
    with pytest.raises(UserError, match="between 0 and 1"):
        make_plan(man, dev, srv, min_agreement=1.5)


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dsc_export", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def _one_line_error(res, needle):
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if not line.startswith("· ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_cli_bad_forms_and_floor_are_one_line_and_write_nothing(forms_dir, tmp_path):
    src, root, man, _ = forms_dir
    res = _cli("split", str(src), "-o", str(tmp_path / "bad"), "--wire", "float32,int4")
    _one_line_error(res, "unknown wire form 'int4'")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    dev, srv = _profiles(man, {s.id: 1.0 for s in man.splits}, {s.id: 1.0 for s in man.splits})
    (tmp_path / "d.json").write_text(dev.to_json())
    (tmp_path / "s.json").write_text(srv.to_json())
    res = _cli(
        "plan",
        str(root),
        "--device",
        str(tmp_path / "d.json"),
        "--server",
        str(tmp_path / "s.json"),
        "--min-agreement",
        "1.5",
        "-o",
        str(tmp_path / "p.json"),
    )
    _one_line_error(res, "--min-agreement")
    assert not (tmp_path / "p.json").exists()


def test_cli_plan_prints_every_candidate_with_agreement_and_share(forms_dir, tmp_path):
    _, root, man, _ = forms_dir
    ids = [s.id for s in man.splits]
    dev, srv = _profiles(
        man,
        {sid: float(k) for k, sid in enumerate(ids)},
        {sid: float(len(ids) - k) for k, sid in enumerate(ids)},
    )
    (tmp_path / "d.json").write_text(dev.to_json())
    (tmp_path / "s.json").write_text(srv.to_json())
    out = tmp_path / "p.json"
    res = _cli(
        "plan",
        str(root),
        "--device",
        str(tmp_path / "d.json"),
        "--server",
        str(tmp_path / "s.json"),
        "--min-agreement",
        "0",
        "-o",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(out.read_text())
    share = {
        c: sum(row.count(c) for row in plan["choice"]) / sum(map(len, plan["choice"]))
        for c in plan["candidates"]
    }
    for s in man.splits:
        line = next(line for line in res.stdout.splitlines() if line.split()[:1] == [s.id])
        assert f"{s.bytes:,}" in line and f"{s.fidelity['top1_agreement']:.3f}" in line
        assert f"{share[s.id] * 100:.1f} %" in line
    res = _cli(
        "plan",
        str(root),
        "--device",
        str(tmp_path / "d.json"),
        "--server",
        str(tmp_path / "s.json"),
        "-o",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    for s in (s for s in man.splits if s.wire == "int8"):
        assert "admitted only with --min-agreement" in next(
            line for line in res.stdout.splitlines() if line.strip().startswith(f"{s.id}:")
        )


def test_manifest_without_wire_fields_still_reads(forms_dir, tmp_path):
    _, root, _, _ = forms_dir
    d = json.loads((root / "manifest.json").read_text())
    d["splits"] = [s for s in d["splits"] if s["wire"] in ("float32", "raw", None)]
    for s in d["splits"]:
        for k in ("wire", "cut", "quant", "fidelity"):
            s.pop(k)
    for c in d["cut_points"]:
        c.pop("forms")
    d.pop("samples"), d.pop("wires")
    man = Manifest.from_dict(d)
    assert [s.wire for s in man.splits] == ["raw"] + ["float32"] * (len(man.splits) - 2) + [None]
    assert man.wires == ["float32"] and all(s.cut == s.id for s in man.splits if s.kind == "split")


def test_read_back_equals_written(forms_dir):
    _, root, man, _ = forms_dir
    assert read_manifest(root).splits == man.splits and read_manifest(root).samples == man.samples


# --- run time: build, bench, bundles for every Triton backend, serve, run ------------------------


@pytest.fixture(scope="module")
def served_forms(tmp_path_factory):
    """conv_net split in every form (int8 symmetric, so that TensorRT's Q/DQ takes it), onnxruntime
    engines at 1 and 2, quick profiles, and a plan that admits every form."""
    from dsc_export.engines import build_engines
    from dsc_export.profiling import profile_split_dir

    tmp = tmp_path_factory.mktemp("served-forms")
    onnx.save(conv_net(), tmp / "m.onnx")
    npz, _ = _inputs(tmp)
    root = tmp / "split"
    split_model(tmp / "m.onnx", root, wires=FORMS, inputs=npz, symmetric=True)
    rep = build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="all", keep_all=True)
    assert not rep.failed, rep.failed
    dev = profile_split_dir(root, "device", batch_sizes=[1, 2], repeats=2, warmup=1, threads=1)
    srv = profile_split_dir(root, "server", batch_sizes=[1, 2], repeats=2, warmup=1)
    man = read_manifest(root)
    assert {t.split for t in dev.timings} == {s.id for s in man.splits if s.head}
    assert {t.split for t in srv.timings} == {s.id for s in man.splits if s.tail}
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2], rates=[1, 10, 100], min_agreement=0.0)
    assert plan.candidates == [s.id for s in man.splits]
    (root / "plan.json").write_text(plan.to_json())
    return root


def _log_tail_net() -> onnx.ModelProto:
    """image [N, 3, 16, 16] -> 1x1 Conv (2 channels) -> Sigmoid -> + 1 = ``cut`` (values in (1, 2))
    -> - 0.5 -> Log -> GAP -> Flatten -> Gemm logits [N, 4]. The tail is finite on what the head
    sends, but not on arbitrary int8 data: the int8 wire's range is [0, 2] (it includes 0), and
    a quarter of it is below 0.5, where the Log is NaN."""
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             onnx.numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "fc"),
             onnx.numpy_helper.from_array(np.zeros(4, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Add", ["s", "one"], ["cut"]),
             helper.make_node("Sub", ["cut", "half"], ["d"]),
             helper.make_node("Log", ["d"], ["l"]),
             helper.make_node("GlobalAveragePool", ["l"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"])]
    g = helper.make_graph(nodes, "logtail", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                          ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_build_makes_every_part_of_int8_wire_forms_checking_tails_on_their_heads_int8(tmp_path, monkeypatch):
    """bench_wire's random B0 (issue 23, at 6aaed44): build left its int8 tails without engines
    (each failed its check, 2e-2 > 1e-4), because a tail was checked on random data of its
    input's dtype, not on what its head sends: random int8 over the whole wire range is far from
    any real cut tensor, and an ill-conditioned tail amplifies the difference. Here such data
    makes the tail NaN. The check's feeds must be the head's int8 output: the whole model's cut
    tensor (onnxruntime) quantized in numpy with the manifest's scale and zero point; and build
    records an engine for every part the manifest lists, at every batch size."""
    import dsc_export.engines.build as engines
    from dsc_export.feeds import model_samples

    src = tmp_path / "m.onnx"
    onnx.save(_log_tail_net(), src)
    npz, _ = _inputs(tmp_path)
    root = tmp_path / "split"
    man = split_model(src, root, wires=["float32", "int8"], inputs=npz, at=["cut"])
    s = next(x for x in man.splits if x.wire == "int8")
    seen = {}
    real = engines._check_engine

    def spy(backend, engine, reference, inputs, job, precision, **kw):
        seen[(job.source, kw["batch"])] = inputs.feeds(kw["batch"])
        return real(backend, engine, reference, inputs, job, precision, **kw)

    monkeypatch.setattr(engines, "_check_engine", spy)
    rep = engines.build_engines(root, "onnxruntime", batch_sizes=[1, 2], parts="all", keep_all=True)
    assert not rep.failed, rep.failed
    after = read_manifest(root)
    listed = {(sid, part, b) for part in ("head", "tail") for sid, _ in after.parts(part) for b in (1, 2)}
    assert {(e.split, e.part, e.batch) for e in after.engines} == listed
    assert all(np.isfinite(e.max_rel_diff) for e in after.engines)
    samples = model_samples(root, after)  # build's own samples: random images (no --inputs), seed 0
    for b in (1, 2):
        _, inner = _whole_with(src, ["cut"], samples.feeds(b)["image"])
        q_ref, _ = _numpy_qdq(inner["cut"], s.quant["scale"], s.quant["zero_point"])
        got = seen[(s.tail, b)][s.wire_tensor]
        assert got.dtype == np.int8 and np.array_equal(got, q_ref), b


def _tail_of_head(root, s, x):
    z = make_session(root / s.head).run([s.wire_tensor], {"image": x})[0]
    return make_session(root / s.tail).run(None, {s.wire_tensor: z})[0]


def test_symmetric_int8_has_zero_point_0(served_forms):
    man = read_manifest(served_forms)
    i8 = [s for s in man.splits if s.wire == "int8"]
    assert i8 and all(s.quant["zero_point"] == 0 and s.quant["symmetric"] for s in i8)


def test_tensorrt_refuses_affine_int8_in_one_line(forms_dir, tmp_path):
    from dsc_export.bundle import make_bundle

    _, root, _, _ = forms_dir
    with pytest.raises(UserError, match="zero point 0 only.*--int8-symmetric"):
        make_bundle(root, "server", tmp_path / "trt.tar", triton_platform="tensorrt_plan")
    assert not (tmp_path / "trt.tar").exists()


@pytest.mark.parametrize("platform", ["onnxruntime_onnx", "python", "tensorrt_plan"])
def test_server_bundles_carry_every_form(served_forms, tmp_path, platform):
    pytest.importorskip(
        "tritonclient.grpc", reason="the 'serve' extra (tritonclient) is not installed"
    )
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from dsc_export.bundle import make_bundle, open_bundle

    root = served_forms
    man = read_manifest(root)
    make_bundle(root, "server", tmp_path / "b.tar", triton_platform=platform)
    open_bundle(tmp_path / "b.tar", tmp_path / "b", expect_side="server")
    repo = tmp_path / "b" / "triton"
    tails = [s for s in man.splits if s.tail]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(s.id for s in tails)
    assert {"cut004-int8", "cut004-float16"} <= {s.id for s in tails}  # the names scripts rely on
    for s in tails:
        cfg = text_format.Parse(
            (repo / s.id / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        want = {
            "int8": "TYPE_INT8",
            "float16": "TYPE_FP16",
            "float32": "TYPE_FP32",
            "raw": "TYPE_FP32",
        }[s.wire]
        assert cfg.name == s.id and model_config_pb2.DataType.Name(cfg.input[0].data_type) == want
    if platform == "tensorrt_plan":
        script = (repo / "build-plans.sh").read_text()
        assert all(f"--onnx={s.id}/model.onnx" in script for s in tails)


def test_device_bundle_carries_every_head(served_forms, tmp_path):
    from dsc_export.bundle import make_bundle, open_bundle

    root = served_forms
    man = read_manifest(root)
    make_bundle(root, "device", tmp_path / "d.tar")
    open_bundle(tmp_path / "d.tar", tmp_path / "d", expect_side="device")
    assert all((tmp_path / "d" / s.head).is_file() for s in man.splits if s.head)
    inside = read_manifest(tmp_path / "d")  # the forms' records travel with the bundle
    assert inside.splits == man.splits and inside.samples == man.samples and inside.wires == man.wires


def test_each_form_served_and_run_sends_the_manifests_bytes(served_forms):
    pytest.importorskip("pytriton", reason="the 'serve' extra (nvidia-pytriton) is not installed")
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient
    from dsc_export.serving.server import ServeOptions, TailServer, free_ports

    root = served_forms
    man = read_manifest(root)
    x = np.random.default_rng(11).standard_normal((2, 3, 16, 16)).astype(np.float32)
    http, grpc, metrics = free_ports(3)
    with TailServer(root, ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, threads=1,
                                       log_file=root.parent / "triton.log")) as srv:
        for s in (s for s in man.splits if s.tail):
            logs = []
            with DynamicSplitClient(root, srv.urls()["http"],
                                    options=ClientOptions(static=s.id, initial_rate_MBps=100.0), log=logs.append) as c:
                got = c.infer(x)["logits"]
            want = (
                _tail_of_head(root, s, x)
                if s.kind == "split"
                else make_session(root / man.model.path).run(None, {"image": x})[0]
            )
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), s.id
            assert [b.split for b in logs] == [s.id] and logs[0].bytes == 2 * s.bytes, s.id


def test_stock_triton_python_backend_serves_the_int8_and_float16_tails(served_forms, tmp_path):
    pytest.importorskip(
        "pytriton", reason="the 'serve' extra (nvidia-pytriton, with tritonserver) is not installed"
    )
    import tritonclient.http as th
    from tritonclient.utils import np_to_triton_dtype

    from dsc_export.bundle import make_bundle, open_bundle
    from dsc_export.serving.tritonserver import TritonServer

    root = served_forms
    man = read_manifest(root)
    # PyTriton's tritonserver has the Python backend only (the onnxruntime_onnx repository is
    # checked above)
    make_bundle(root, "server", tmp_path / "b.tar", triton_platform="python")
    open_bundle(tmp_path / "b.tar", tmp_path / "b", expect_side="server")
    x = np.random.default_rng(12).standard_normal((3, 3, 16, 16)).astype(np.float32)
    from dsc_export.serving.server import free_ports

    http, grpc, metrics = free_ports(3)
    with TritonServer(
        tmp_path / "b" / "triton",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        log_file=tmp_path / "tritonserver.log",
    ) as srv:
        client = th.InferenceServerClient(srv.url("http"))
        for s in (s for s in man.splits if s.wire in ("int8", "float16")):
            z = make_session(root / s.head).run([s.wire_tensor], {"image": x})[0]
            inp = th.InferInput("input", list(z.shape), np_to_triton_dtype(z.dtype))
            inp.set_data_from_numpy(z, binary_data=True)
            got = client.infer(s.id, [inp]).as_numpy("logits")
            want = make_session(root / s.tail).run(None, {s.wire_tensor: z})[0]
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), s.id
        client.close()


def test_real_model_every_form_at_its_own_compressive_cuts(exported, tmp_path):
    """EfficientNet-Lite0 (random weights, uint8 input): every form verifies with its semantics,
    its bytes are elements x 4 / 2 / 1, Eq. 3 per form, and the forms answer like onnxruntime."""
    rep = exported("efficientnet_lite0")
    man = split_model(rep.path, tmp_path / "s", wires=FORMS)
    assert man.model.input.dtype == "uint8"
    for f in FORMS:
        ratios = [
            c.elements * {"float32": 4, "float16": 2, "int8": 1}[f] / man.model.input_bytes
            for c in man.cut_points
        ]
        want = [c.tensor for c, m in zip(man.cut_points, compressive_mask(ratios)) if m]
        assert [s.tensor for s in man.splits if s.wire == f] == want, f
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    whole = make_session(rep.path).run(None, {"image": x})[0]
    for s in (s for s in man.splits if s.kind == "split"):
        cp = next(c for c in man.cut_points if c.tensor == s.tensor)
        assert s.bytes == cp.elements * {"float32": 4, "float16": 2, "int8": 1}[s.wire]
        got = _tail_of_head(tmp_path / "s", s, x)
        rel = float(np.abs(got - whole).max() / np.abs(whole).max())
        if s.wire == "int8":
            assert (
                0 < s.max_rel_diff and np.isfinite(s.max_rel_diff) and s.fidelity["samples"] == 16
            )
        else:
            tol = {"float32": 1e-5, "float16": 2e-2}[s.wire]
            assert rel <= tol and s.max_rel_diff <= tol
