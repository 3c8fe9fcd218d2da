"""Export of real timm EfficientNets, and the catalogue (needs the 'export' extra)."""

import onnx
import pytest

from dsc_export.errors import UserError
from dsc_export.zoo import CATALOGUE, lookup


def test_catalogue_has_the_papers_fifteen_models():
    v1 = [e for e in CATALOGUE.values() if e.family == "EfficientNetV1"]
    v2 = [e for e in CATALOGUE.values() if e.family == "EfficientNetV2"]
    assert [e.name[-2:] for e in v1] == [f"b{i}" for i in range(8)]
    assert [e.name.split("_")[1] for e in v2] == ["b0", "b1", "b2", "b3", "s", "m", "l"]
    assert lookup("tf_efficientnet_b4").name == "efficientnet_b4"
    with pytest.raises(UserError, match="valid names: efficientnet_b0"):
        lookup("resnet50")


def test_catalogue_matches_timm_pretrained_configs():
    timm = pytest.importorskip("timm")
    for e in CATALOGUE.values():
        cfg = timm.models.get_pretrained_cfg(f"{e.timm_name}.{e.pretrained_tag}")
        size = cfg.test_input_size or cfg.input_size
        assert size == (3, e.resolution, e.resolution), e.name
        assert tuple(cfg.mean) == e.mean and tuple(cfg.std) == e.std, e.name
        assert (cfg.crop_pct, cfg.interpolation) == (e.crop_pct, e.interpolation), e.name


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnetv2_b0"])
def test_export_matches_torch_at_batch_1_and_3(exported, name):
    rep = exported(name)
    assert sorted(rep.diffs) == [1, 3]
    for b, (abs_diff, rel) in rep.diffs.items():
        assert rel < 1e-4, (b, abs_diff, rel)
    model = onnx.load(str(rep.path))
    onnx.checker.check_model(model)
    inp = model.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.shape.dim]
    assert dims == ["N", rep.resolution, rep.resolution, 3]
    out = model.graph.output[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["N", 1000]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dsc_export.input_layout"] == "NHWC uint8 RGB"


def test_random_weights_give_sane_logits_after_bn_reestimation(exported):
    import numpy as np

    from dsc_export.ort import make_session, random_inputs

    rep = exported("efficientnetv2_b0")
    sess = make_session(rep.path)
    (logits,) = sess.run(None, random_inputs(sess, 2, np.random.default_rng(0)))
    assert np.all(np.isfinite(logits)) and np.abs(logits).max() < 1e3
    assert logits.std() > 1e-3  # not a dead network


def test_tensor_names_are_stable_between_exports(tmp_path):
    pytest.importorskip("timm")
    from dsc_export.export import export_model

    names = []
    for k in range(2):
        rep = export_model("efficientnet_b0", tmp_path / f"b0_{k}.onnx", resolution=64, verify=False)
        names.append([o for n in onnx.load(str(rep.path)).graph.node for o in n.output])
    assert names[0] == names[1]


def test_float_input_option(tmp_path):
    pytest.importorskip("timm")
    from dsc_export.export import export_model

    rep = export_model("efficientnet_b0", tmp_path / "f.onnx", resolution=96, float_input=True)
    inp = onnx.load(str(rep.path)).graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.shape.dim] == ["N", 3, 96, 96]


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "nope"}, "unknown model 'nope'"),
    ({"resolution": 8}, "resolution 8 is out of range"),
    ({"opset": 9}, "opset 9 is too old"),
    ({"weights": "/nonexistent.pt"}, "does not exist"),
])
def test_export_errors_leave_nothing_behind(tmp_path, kwargs, match):
    pytest.importorskip("timm")
    from dsc_export.export import export_model

    args = {"name": "efficientnet_b0", "output": tmp_path / "o" / "m.onnx", "resolution": 64}
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        export_model(**args)
    leftovers = list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else []
    assert leftovers == []


def test_unreadable_checkpoint(tmp_path):
    pytest.importorskip("timm")
    from dsc_export.export import export_model

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        export_model("efficientnet_b0", tmp_path / "m.onnx", resolution=64, weights=str(bad))
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_weights_are_used(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    import numpy as np

    from dsc_export.export import export_model
    from dsc_export.ort import make_session

    net = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ck.pt")
    rep = export_model("efficientnet_b0", tmp_path / "m.onnx", resolution=64, weights=str(tmp_path / "ck.pt"))
    x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net((torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std).numpy()
    got = make_session(rep.path).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_unwritable_output(tmp_path):
    pytest.importorskip("timm")
    from dsc_export.export import export_model

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        export_model("efficientnet_b0", tmp_path / "file" / "m.onnx", resolution=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b4", "efficientnetv2_s", "efficientnetv2_l"])
def test_large_models_export_and_verify(exported, name):
    rep = exported(name)
    assert all(rel < 1e-3 for _, rel in rep.diffs.values())
