"""Build a catalogue model with timm and export it to ONNX (the ``export`` verb).

Input contract of an exported model (default): the raw image, ``uint8`` ``[N, H, W, 3]``
(NHWC, RGB, the layout cameras and decoders produce). The cast to float, the scaling to
[0, 1], the mean/std normalisation and the transpose to NCHW are inside the graph, so full
offloading really sends the 8-bit image (the paper's D = B·W·H·C bytes) and the server needs
no separate preprocessing. ``float_input=True`` keeps the plain ``float32 [N, 3, H, W]``
normalised input instead. The output is ``logits`` ``float32 [N, 1000]``. Only the batch
dimension is dynamic.

Exporter: torch's TorchScript-based exporter (``dynamo=False``) at opset 17. It is fast (under
a second for B0), folds BatchNorm into the convolutions, names nodes after their module path
(``/blocks/blocks.3/...``, which :mod:`dsc_export.graph.cuts` reports as the scope of a cut
point) and names tensors deterministically, so two exports of the same model have the same
tensor names.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsc_export.compare import compare
from dsc_export.errors import UserError, lazy_import
from dsc_export.ort import make_session
from dsc_export.weights import load_weights, pretrained_file
from dsc_export.zoo import ZooEntry, lookup

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET = 13  # dynamic-batch export of EfficientNet needs opset >= 13 features
VERIFY_BATCHES = (1, 3)
VERIFY_RTOL = 1e-3


@dataclass
class ExportReport:
    """What :func:`export_model` produced."""

    entry: ZooEntry
    path: Path
    resolution: int
    float_input: bool
    opset: int
    weights: str  # "random (BatchNorm statistics re-estimated)", the checkpoint and its mapping, or "trained: ..."
    seconds: float
    file_bytes: int
    input_shape: list
    input_dtype: str
    diffs: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (max abs, rel)


def _make_wrapper(torch, net, mean, std, float_input: bool):
    class RawImageModel(torch.nn.Module):
        """uint8 NHWC image -> normalised float NCHW -> the network."""

        def __init__(self):
            super().__init__()
            self.net = net
            m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * s))
            self.register_buffer("shift", -m / s)

        def forward(self, image):
            x = image.permute(0, 3, 1, 2).to(torch.float32)
            return self.net(x * self.scale + self.shift)

    return net if float_input else RawImageModel()


def _random_images(torch, gen, batch: int, res: int):
    return torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, generator=gen)


def recalibrate_batchnorm(torch, model, make_batch: Callable[[], object], *, batches: int = 3) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` batches of random data.

    A randomly initialised network keeps mean 0 / var 1 running statistics, which do not match
    its activations: deep models then blow up (V2-L logits reach 1e10) and comparisons mean
    nothing. A cumulative average (momentum None) over a few forward passes in train mode fixes
    the scale without touching any weight.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(make_batch())
    model.eval()


def check_writable(output: Path) -> None:
    """Create the parent folder of ``output`` and check that a file can be written there.

    Raises:
        UserError: ``output`` is a directory, or its folder cannot be written.
    """
    if output.exists() and output.is_dir():
        raise UserError(f"output '{output}' is a directory; give a file name ending in .onnx")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to '{output.parent}': {exc.strerror or exc}") from exc


def export_model(
    name: str,
    output: str | os.PathLike,
    *,
    resolution: int | None = None,
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    float_input: bool = False,
    verify: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    pretrained: bool = False,
) -> ExportReport:
    """Build ``name`` from the catalogue with timm, export it to ONNX and verify it.

    Args:
        name: catalogue name (``efficientnet_b0``) or timm name (``tf_efficientnet_b0``).
        output: the ONNX file to write; written atomically (nothing is left on failure).
        resolution: square input size; default: the catalogue's.
        weights: a PyTorch checkpoint (a state dict in timm's or EfficientNet-PyTorch's
            naming, see :mod:`dsc_export.weights`); default: random weights with re-estimated
            BatchNorm statistics. Nothing is ever downloaded.
        opset: ONNX opset (13 or newer).
        float_input: take normalised float32 NCHW instead of the raw uint8 NHWC image.
        verify: compare onnxruntime against torch at batch sizes 1 and 3.
        seed: seed for the random weights and the verification inputs.
        log: progress callback.
        pretrained: the trained weights of the installed weights package (``weights`` extra).
            Trained weights keep their BatchNorm statistics.

    Returns:
        An :class:`ExportReport`.

    Raises:
        UserError: (one line) an unknown model, a bad resolution or opset, an unwritable output,
            weights that do not fit, a missing weights package, or an export that disagrees
            with torch.
    """
    entry = lookup(name)
    if weights and pretrained:
        raise UserError("give either --weights FILE or --pretrained, not both")
    trained = pretrained_file(entry) if pretrained else None  # refuse a missing package first
    res = entry.resolution if resolution is None else int(resolution)
    if not 32 <= res <= 2048:
        raise UserError(f"resolution {res} is out of range; use 32..2048 pixels")
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too old for this export; use {MIN_OPSET} or newer")
    output = Path(output)
    check_writable(output)
    torch = lazy_import("torch", "export")
    timm = lazy_import("timm", "export")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    log(f"building {entry.timm_name} at {res}x{res}")
    net = timm.create_model(entry.timm_name, pretrained=False)
    model = _make_wrapper(torch, net, entry.mean, entry.std, float_input)
    if trained:
        path, weights_desc = trained
        log(f"loading {weights_desc}")
        load_weights(torch, net, path)
    elif weights:
        weights_desc = f"{weights} (mapped {load_weights(torch, net, weights)})"
    else:
        log("re-estimating BatchNorm statistics on random images")
        mean = torch.tensor(entry.mean).view(1, 3, 1, 1)
        std = torch.tensor(entry.std).view(1, 3, 1, 1)

        def batch():
            img = _random_images(torch, gen, 4, res).permute(0, 3, 1, 2).float() / 255.0
            return (img - mean) / std

        recalibrate_batchnorm(torch, net, batch)
        weights_desc = "random (BatchNorm statistics re-estimated)"
    model.eval()

    if float_input:
        example = torch.randn(1, 3, res, res, generator=gen)
        in_shape, in_dtype = ["N", 3, res, res], "float32"
    else:
        example = _random_images(torch, gen, 1, res)
        in_shape, in_dtype = ["N", res, res, 3], "uint8"

    log(f"exporting to ONNX (opset {opset})")
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                do_constant_folding=True,
            )
        _stamp_metadata(tmp, entry, res, float_input, weights_desc)
        report = ExportReport(
            entry=entry, path=output, resolution=res, float_input=float_input, opset=opset,
            weights=weights_desc, seconds=0.0, file_bytes=os.path.getsize(tmp),
            input_shape=in_shape, input_dtype=in_dtype,
        )
        if verify:
            log(f"verifying onnxruntime against torch at batch sizes {VERIFY_BATCHES}")
            report.diffs = _verify(torch, model, tmp, float_input, res, seed)
            worst = max(rel for _, rel in report.diffs.values())
            if not worst <= VERIFY_RTOL:
                raise UserError(
                    f"exported ONNX disagrees with torch (max relative difference {worst:.2e} "
                    f"> {VERIFY_RTOL:.0e}); nothing was written"
                )
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _stamp_metadata(path: str, entry: ZooEntry, res: int, float_input: bool, weights: str) -> None:
    import onnx

    model = onnx.load(path)
    meta = {
        "dsc_export.model": entry.name,
        "dsc_export.timm_name": entry.timm_name,
        "dsc_export.resolution": str(res),
        "dsc_export.input_layout": "NCHW float32 normalised" if float_input else "NHWC uint8 RGB",
        "dsc_export.mean": ",".join(map(str, entry.mean)),
        "dsc_export.std": ",".join(map(str, entry.std)),
        "dsc_export.weights": weights,
    }
    for k, v in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = k, v
    model.producer_name = "dsc-export"
    onnx.save(model, path)


def _verify(torch, model, path: str, float_input: bool, res: int, seed: int) -> dict[int, tuple[float, float]]:
    sess = make_session(path)
    gen = torch.Generator().manual_seed(seed + 1)
    diffs = {}
    for b in VERIFY_BATCHES:
        if float_input:
            x = torch.randn(b, 3, res, res, generator=gen)
        else:
            x = _random_images(torch, gen, b, res)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        c = compare([ref], [got], what="onnxruntime")
        if c.problem:
            raise UserError(f"the exported model does not reproduce torch at batch {b}: {c.problem}")
        diffs[b] = (c.max_abs, c.max_rel)
    return diffs
