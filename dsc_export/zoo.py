"""The model catalogue: EfficientNet V1 B0–B7 and V2 B0–B3, S, M, L.

One registry maps our short name to timm's port of the TensorFlow/Keras definition that the
paper used (timm's ``tf_`` models: "same" padding and BN epsilon as in TF, so the graphs and
their bottlenecks are the paper's), with the default input resolution and normalisation of the
pretrained configuration we follow. The resolution is the Keras evaluation size
(V2: timm's ``test_input_size``), which is what the paper's Keras models take.

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
        family: ``"EfficientNetV1"`` or ``"EfficientNetV2"``.
        timm_name: timm architecture name (a ``tf_`` port of the Keras model).
        pretrained_tag: the timm pretrained configuration whose resolution/mean/std we use.
        resolution: default square input resolution in pixels.
        mean, std: per-channel normalisation of images scaled to [0, 1].
    """

    name: str
    family: str
    timm_name: str
    pretrained_tag: str
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _v1(variant: str, resolution: int, tag: str = "in1k") -> ZooEntry:
    return ZooEntry(
        f"efficientnet_{variant}", "EfficientNetV1", f"tf_efficientnet_{variant}", tag,
        resolution, IMAGENET_MEAN, IMAGENET_STD,
    )


def _v2(variant: str, resolution: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ZooEntry:
    return ZooEntry(
        f"efficientnetv2_{variant}", "EfficientNetV2", f"tf_efficientnetv2_{variant}", "in1k",
        resolution, mean, std,
    )


CATALOGUE: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _v1("b0", 224), _v1("b1", 240), _v1("b2", 260), _v1("b3", 300),
        _v1("b4", 380), _v1("b5", 456),
        # B6 and B7 have no plain in1k weights in timm; ns_jft_in1k has the same preprocessing.
        _v1("b6", 528, "ns_jft_in1k"), _v1("b7", 600, "ns_jft_in1k"),
        _v2("b0", 224), _v2("b1", 240), _v2("b2", 260), _v2("b3", 300),
        _v2("s", 384, INCEPTION_MEAN, INCEPTION_STD),
        _v2("m", 480, INCEPTION_MEAN, INCEPTION_STD),
        _v2("l", 480, INCEPTION_MEAN, INCEPTION_STD),
    )
}


def lookup(name: str) -> ZooEntry:
    """Return the catalogue entry for ``name`` (ours or timm's), or a one-line error listing the valid names."""
    key = name.strip().lower()
    if key in CATALOGUE:
        return CATALOGUE[key]
    for entry in CATALOGUE.values():
        if key == entry.timm_name:
            return entry
    raise UserError(f"unknown model '{name}'; valid names: {', '.join(CATALOGUE)}")
