"""A batch-less image input ([3, H, W], torchvision's detection exports) is never read as a fixed
batch of colour planes: analyze and split refuse it in one line naming the missing batch axis and
how to re-export; a real fixed batch, and the same model re-exported at [1, 3, H, W], are
accepted (data-dependent outputs at batch 1: a request is a batch)."""

import os
import subprocess
import sys
from pathlib import Path

import cut_models
import numpy as np
import onnx
import pytest

from dsc_export.errors import UserError
from dsc_export.graph.batch_axis import batchless_image
from dsc_export.ort import make_session
from dsc_export.serving.protocol import output_contract
from dsc_export.splitting import analyze_file, split_model

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("dims", [[3, 320, 320], [3, "height", "width"], [4, 64, 48], [3, 800, 1333],
                                  [320, 320, 3], [224, 224, 1], [64, "w", 4]])
def test_one_image_without_a_batch_axis_is_named(dims):
    why = batchless_image("images", dims)
    assert why is not None and "no batch axis" in why and "re-export" in why


@pytest.mark.parametrize("dims", [[1, 28, 28],  # batch 1 and one plane read alike: the same sample
                                  [3, 8, 8],  # too small for an image side
                                  [4, 77, 512],  # a fixed batch of token embeddings (aspect)
                                  ["N", 224, 3], ["N", 3, 224],  # a symbolic axis 0 is a batch
                                  [3, 3, 224, 224], [2, 3, 32, 32], ["N", 3, 224, 224],  # rank 4: a batch
                                  ["N", 1000], [8, 16, 3]])
def test_a_batch_is_not_mistaken_for_an_image(dims):
    assert batchless_image("x", dims) is None


@pytest.mark.parametrize("layout,dynamic", [("CHW", False), ("HWC", False), ("CHW", True)])
def test_split_and_analyze_refuse_in_one_line(tmp_path, layout, dynamic):
    model = cut_models.batchless_model(layout=layout)
    if dynamic:  # torchvision's dynamic height and width: the message is the batch, not make_dynamic_shape_fixed
        for d in model.graph.input[0].type.tensor_type.shape.dim[1:]:
            d.dim_param = "height"
    onnx.save(model, tmp_path / "det.onnx")
    with pytest.raises(UserError, match="no batch axis"):
        analyze_file(tmp_path / "det.onnx")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["analyze", str(tmp_path / "det.onnx")],
                 ["split", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "out")]):
        r = subprocess.run([sys.executable, "-m", "dsc_export", *argv], capture_output=True, text=True, env=env)
        errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("·")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert "no batch axis" in errors[0] and "[N, " in errors[0] and "Traceback" not in r.stderr
        assert "make_dynamic_shape_fixed" not in errors[0] and "batch size 3" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_model_with_a_batch_axis_splits_at_batch_one(tmp_path):
    onnx.save(cut_models.batchless_model(batched=True), tmp_path / "det1.onnx")
    man = split_model(tmp_path / "det1.onnx", tmp_path / "s")
    assert man.model.fixed_batch == 1
    assert man.model.input.shape == [1, 3, 32, 32] and man.model.input_bytes == 3 * 32 * 32 * 4  # the whole image
    # boxes [-1, 4]: accepted at its one batch size, returned whole (a request is a batch)
    assert [(c.name, c.kind, c.problem) for c in output_contract(man)] == [("boxes", "whole", None),
                                                                          ("scores", "whole", None)]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = make_session(tmp_path / "det1.onnx").run(None, {"images": x})
    for s in (s for s in man.splits if s.kind == "split"):
        z = make_session(tmp_path / "s" / s.head).run([s.wire_tensor], {"images": x})[0]
        got = make_session(tmp_path / "s" / s.tail).run(None, {s.wire_tensor: z})
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), s.id
