"""The one comparison every check uses: NaN and inf are failures, tolerances follow dtypes."""

import numpy as np
import pytest

from dsc_export.compare import compare, fits, least_precise, tolerance


def test_nan_in_result_is_a_failure_not_zero():
    ref = [np.ones((2, 3), np.float32)]
    got = [np.ones((2, 3), np.float32)]
    got[0][1, 2] = np.nan
    c = compare(ref, got, ["y"], what="the tail")
    assert not c.ok(1.0)
    assert "NaN" in c.problem and "'y'" in c.problem
    # the bug this replaces: max over |diff| with a NaN in it came out as a number
    assert c.max_abs == float("inf")


def test_inf_in_reference_is_a_failure():
    ref = [np.array([[1.0, np.inf]], np.float32)]
    c = compare(ref, [ref[0].copy()])
    assert not c.ok(1.0) and "inf" in c.problem and "reference" in c.problem


def test_exact_and_relative_difference():
    ref = [np.array([[10.0, -20.0]], np.float32)]
    got = [np.array([[10.0, -19.0]], np.float32)]
    c = compare(ref, got)
    assert c.max_abs == pytest.approx(1.0)
    assert c.max_rel == pytest.approx(1.0 / 20.0)
    assert c.ok(0.06) and not c.ok(0.04)


def test_shape_and_count_mismatch():
    a = np.zeros((2, 3), np.float32)
    assert not compare([a], [a.T]).ok(1e9)
    assert not compare([a, a], [a]).ok(1e9)


def test_tolerance_follows_least_precise_dtype():
    assert least_precise("float32", np.float16) == "float16"
    assert least_precise(np.dtype("int64")) == "float32"
    assert tolerance("float32") < tolerance("float16")
    assert tolerance("float32", "float16") == tolerance("float16")
    # one float16 step at the output passes a float16 tolerance and fails a float32 one
    x = np.float16(1.0)
    step = float(np.nextafter(x, np.float16(2.0)) - x)
    assert tolerance("float32") < step <= tolerance("float16")
    assert tolerance("float32", engine=True) > tolerance("float32")


def test_fits_float16():
    assert fits("float16", np.array([65504.0], np.float32))
    assert not fits("float16", np.array([70000.0], np.float32))
    assert not fits("float16", np.array([np.nan], np.float32))
    assert fits("float32", np.array([1e30], np.float32))
