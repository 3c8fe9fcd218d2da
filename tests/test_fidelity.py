"""dsc_export.fidelity: top-1 agreement, differences, admission, against independent counts."""

import numpy as np
import pytest

from dsc_export.artifacts import Split
from dsc_export.errors import UserError
from dsc_export.fidelity import Fidelity, admitted, measure, partition


def _count_agree(ref, got):
    """Agreement counted sample by sample with Python loops (independent of measure)."""
    n = 0
    for r, g in zip(ref, got):
        n += int(max(range(len(r)), key=lambda k: r[k]) == max(range(len(g)), key=lambda k: g[k]))
    return n / len(ref)


def test_class_output_agreement_and_differences():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 10)).astype(np.float32)
    got = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    f = measure([ref], [got], ["logits"])
    assert f.samples == 50 and f.reference == "logits" and f.argmax_note is None
    assert f.top1_agreement == pytest.approx(_count_agree(ref.tolist(), got.tolist()))
    assert 0 < f.top1_agreement < 1
    d = np.abs(ref.astype(np.float64) - got)
    assert f.max_abs == pytest.approx(d.max())
    assert f.max_rel == pytest.approx(d.max() / np.abs(ref).max())


def test_identical_outputs_agree_fully():
    ref = np.eye(4, dtype=np.float32)
    f = measure([ref], [ref.copy()], tolerance=1e-5)
    assert (f.top1_agreement, f.max_abs, f.max_rel, f.within_tolerance) == (1.0, 0.0, 0.0, True)


def test_map_output_uses_last_axis_and_says_so():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(6, 3, 4, 5)).astype(np.float32)
    got = ref.copy()
    got[2, 1, 3] = got[2, 1, 3][::-1]  # one position of sample 2 changes its argmax (most likely)
    f = measure([ref], [got], ["seg"])
    assert "last axis" in f.argmax_note
    want = np.mean([np.array_equal(ref[i].argmax(-1), got[i].argmax(-1)) for i in range(6)])
    assert f.top1_agreement == pytest.approx(want)


def test_nan_is_never_zero_difference():
    ref = np.array([[1.0, 2.0], [3.0, 1.0]], dtype=np.float32)
    got = ref.copy()
    got[1, 1] = np.nan  # argmax of [3, nan] is 1 (nan), not 0; and the sample must disagree anyway
    got[0] = [0.0, 5.0]
    f = measure([ref], [got])
    assert f.max_abs is None and f.max_rel is None and "NaN" in f.problem
    assert f.top1_agreement == 0.5  # sample 0 agrees (argmax 1 both), sample 1 is not finite


def test_one_value_per_sample_has_no_top1():
    f = measure([np.ones(4, np.float32)], [np.ones(4, np.float32)], ["score"])
    assert f.top1_agreement is None and "no top-1" in f.argmax_note


def _split(wire, agreement=None, within=None, kind="split"):
    fid = (
        None
        if agreement is None and within is None
        else Fidelity(
            top1_agreement=agreement,
            max_abs=0.1,
            max_rel=0.01,
            samples=10,
            reference="y",
            within_tolerance=within,
        ).as_dict()
    )
    return Split(
        id=f"cut001-{wire}",
        kind=kind,
        tensor="t",
        head="h",
        tail="t",
        bytes=1,
        max_abs_diff=0.0,
        wire=wire,
        fidelity=fid,
    )


def test_admitted_brute_force():
    cases = [
        _split("float32", 1.0, True),
        _split("float16", 1.0, True),
        _split("float16", 0.9, False),
        _split("int8", 0.97, False),
        _split("int8", 0.93, False),
        _split("int8"),
        _split("jpeg95", 0.96, False, kind="offload"),
        _split("raw", kind="offload"),
    ]
    for floor in (None, 0.0, 0.95, 0.97, 1.0):
        for s in cases:
            fid = s.fidelity or {}
            lossless = s.wire in ("float32", "raw") or (
                s.wire == "float16" and fid.get("within_tolerance") is not False
            )
            want = lossless or (
                floor is not None
                and fid.get("top1_agreement") is not None
                and fid["top1_agreement"] >= floor
            )
            assert (admitted(s, floor) is None) == want, (s.wire, fid, floor)


def test_floor_out_of_range():
    with pytest.raises(UserError, match="between 0 and 1"):
        admitted(_split("int8", 0.9), 1.5)


def test_partition_disjoint_and_covering():
    for n in range(2, 12):
        cal, held = partition(n)
        assert sorted(cal + held) == list(range(n)) and not set(cal) & set(held) and held
    assert partition(1) == ([0], [0])
