"""Real images for an image model: photos read and preprocessed the way the model was evaluated,
the sample photos that installed packages ship, and the ImageNet labels of logits.

Preprocessing is timm's evaluation transform of the catalogue entry's pretrained configuration
(:class:`dsc_export.zoo.ZooEntry`): resize the shorter side to ``resolution / crop_pct`` with the
entry's filter (bicubic or bilinear), then centre-crop ``resolution x resolution``. The result is
the uint8 RGB image ``[H, W, 3]`` an exported model takes (its normalisation is inside the graph);
:meth:`Preprocess.normalise` gives the float NCHW form a ``--float-input`` model takes.

Sample photos (:func:`sample_photos`), all from local disk: matplotlib's
``mpl-data/sample_data/grace_hopper.jpg``, and when scikit-image is installed (the ``weights``
extra) its ``skimage.data`` photos: chelsea, coffee, astronaut, rocket, the two stereo
motorcycle views, the Hubble deep field.

Class names come from timm (``timm.data.ImageNetInfo``, the ``export`` extra).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsc_export.errors import UserError, lazy_import
from dsc_export.zoo import IMAGENET_MEAN, IMAGENET_STD, ZooEntry, lookup

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")


@dataclass(frozen=True)
class Preprocess:
    """An evaluation transform: resize the shorter side to ``size / crop_pct``, centre-crop ``size``.

    Attributes:
        size: output height and width in pixels.
        crop_pct: fraction of the resized shorter side kept by the centre crop (1.0: no margin).
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        mean, std: per-channel normalisation of [0, 1] pixels (for :meth:`normalise` only).
    """

    size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_entry(cls, entry: ZooEntry, resolution: int | None = None) -> Preprocess:
        """The catalogue entry's evaluation transform, at ``resolution`` (default: the entry's)."""
        return cls(resolution or entry.resolution, entry.crop_pct, entry.interpolation, entry.mean, entry.std)

    @classmethod
    def for_onnx(cls, path: str | os.PathLike, size: int) -> Preprocess:
        """The transform of the catalogue model an ONNX file was exported from (its
        ``dsc_export.model`` metadata), at ``size``; ImageNet defaults for any other model."""
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        name = meta.get("dsc_export.model")
        return cls.for_entry(lookup(name), size) if name else cls(size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` (any size) -> uint8 RGB ``[size, size, 3]``."""
        Image = lazy_import("PIL.Image", "export")
        im = Image.fromarray(np.asarray(image, dtype=np.uint8))
        w, h = im.size
        short = math.floor(self.size / self.crop_pct)  # as timm and torchvision round
        rw, rh = (short, max(short, int(short * h / w))) if w <= h else (max(short, int(short * w / h)), short)
        im = im.resize((rw, rh), Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR)
        left, top = int(round((rw - self.size) / 2)), int(round((rh - self.size) / 2))
        return np.asarray(im.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` scaled to [0, 1] and normalised."""
        x = (images.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``.

    Raises:
        UserError: (one line) the file cannot be read as an image.
    """
    Image = lazy_import("PIL.Image", "export")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise UserError(f"cannot read image '{path}': {type(exc).__name__}") from exc


def read_folder(folder: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """The images of a folder (``.jpg .jpeg .png .bmp``), sorted by name, as ``(name, uint8 [H, W, 3])``.

    Raises:
        UserError: (one line) not a folder, no images in it, or an unreadable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}' is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return [(f.name, read_image(f)) for f in files]


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Real photos that installed packages ship, as ``(name, uint8 RGB [H, W, 3])``.

    Grace Hopper from matplotlib always; the scikit-image photos when scikit-image is installed.
    """
    import importlib.util

    from matplotlib import cbook

    photos = [("grace_hopper", read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))]
    if importlib.util.find_spec("skimage") is None:
        return photos
    from skimage import data

    photos += [(name, getattr(data, name)()) for name in SKIMAGE_PHOTOS]
    left, right, _ = data.stereo_motorcycle()
    photos += [("motorcycle_left", left), ("motorcycle_right", right)]
    return [(name, np.ascontiguousarray(img[..., :3], dtype=np.uint8)) for name, img in photos]


def variants(image: np.ndarray, *, scales: tuple[float, ...] = (0.9, 0.75, 0.6)) -> list[tuple[str, np.ndarray]]:
    """The photo, crops of it and their mirror images, as ``(suffix, uint8 [h, w, 3])``.

    Crops: the centre at every scale, and the four corners at every scale but the first; each
    crop is a ``scale`` fraction of both sides. With the default scales: 12 views x 2 (mirrored)
    = 24 images per photo.
    """
    h, w = image.shape[:2]
    views = [("", image)]
    for k, s in enumerate(scales):
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        spots = {"c": ((h - ch) // 2, (w - cw) // 2)}
        if k:
            spots.update(tl=(0, 0), tr=(0, w - cw), bl=(h - ch, 0), br=(h - ch, w - cw))
        views += [(f"-crop{s:g}{at}", image[y:y + ch, x:x + cw]) for at, (y, x) in spots.items()]
    return [v for name, img in views for v in ((name, img), (f"{name}-flip", img[:, ::-1]))]


@dataclass(frozen=True)
class Label:
    """One class of a prediction: ImageNet index, its description, softmax probability."""

    index: int
    name: str
    score: float


def top_k(logits: np.ndarray, k: int = 5) -> list[list[Label]]:
    """The ``k`` most likely ImageNet classes of each row of ``logits`` ``[N, 1000]``, best first.

    Raises:
        UserError: (one line) logits that are not ``[N, 1000]``, or timm missing (``export`` extra).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 1000:
        raise UserError(f"ImageNet labels need logits [N, 1000]; the model gives {list(logits.shape)}")
    info = lazy_import("timm.data", "export").ImageNetInfo()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    best = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[Label(int(i), info.index_to_description(int(i)), float(p[r, i])) for i in row]
            for r, row in enumerate(best)]


def batches(images: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Stack images into batches of ``batch``, cycling through them so every batch is full."""
    n = max(1, -(-len(images) // batch))
    return [np.stack([images[(k * batch + i) % len(images)] for i in range(batch)]) for k in range(n)]
