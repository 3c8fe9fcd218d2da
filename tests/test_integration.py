"""Real exported EfficientNets through analyze and split: every split verifies, Eq. 3 holds."""

import numpy as np
import pytest

from dsc_export.artifacts import read_manifest
from dsc_export.splitting import analyze_file, split_model


def check_eq3(points, wire_itemsize=4):
    best = 1.0
    for p in points:
        assert p.compressive == (p.ratio < best), p
        assert p.natural == (p.ratio < 1)
        best = min(best, p.ratio)
        assert p.bytes == p.elements * (wire_itemsize if p.dtype == "float32" else np.dtype(p.dtype).itemsize)


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnetv2_b0"])
def test_real_model_splits_verify(exported, tmp_path, name):
    rep = exported(name)
    an = analyze_file(rep.path)
    assert an.input_bytes == rep.resolution ** 2 * 3  # uint8 image
    assert len(an.cut_points) > 30 and 2 <= len(an.compressive) <= 6
    assert not an.fold.batch_dependent and an.fold.folded  # tf "same" padding folded
    check_eq3(an.cut_points)
    assert all(p.scope for p in an.cut_points if p.tensor.startswith("/net/"))
    assert any(p.scope and p.scope.startswith("blocks.") for p in an.compressive)
    man = split_model(rep.path, tmp_path / "split")
    cuts = [s for s in man.splits if s.kind == "split"]
    assert [s.tensor for s in cuts] == [p.tensor for p in an.compressive]
    assert all(s.max_rel_diff <= 1e-5 for s in cuts)
    assert read_manifest(tmp_path / "split").model.sha256 == man.model.sha256


def test_float16_wire_changes_which_bottlenecks_are_compressive(exported):
    rep = exported("efficientnet_b0")
    f32 = analyze_file(rep.path, "float32")
    f16 = analyze_file(rep.path, "float16")
    assert len(f16.natural) > len(f32.natural)
    assert [p.element_ratio for p in f16.cut_points] == [p.element_ratio for p in f32.cut_points]
    check_eq3(f16.cut_points, wire_itemsize=2)


def test_float16_wire_split_of_b0_verifies(exported, tmp_path):
    rep = exported("efficientnet_b0")
    man = split_model(rep.path, tmp_path / "s16", wire_dtype="float16")
    assert all(0 < s.max_rel_diff <= 2e-2 for s in man.splits if s.kind == "split")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b4", "efficientnetv2_s"])
def test_large_model_splits_verify(exported, tmp_path, name):
    rep = exported(name)
    man = split_model(rep.path, tmp_path / "split")
    check_eq3(man.cut_points)
    assert all(s.max_rel_diff <= 1e-5 for s in man.splits if s.kind == "split")
