"""Image codecs of the offload wire forms: what the device sends instead of the raw pixels.

An offload form sends the model's own input, a uint8 image at model resolution, through an
image codec (Pillow), and the server decodes it and runs the whole model:

- ``raw``: the pixels as they are (the paper's full offloading, split id ``offload``);
- ``png``: PNG, lossless, zlib level 1 (a device encodes: at Lite0's 224 x 224 level 1 takes
  about half the time of Pillow's default 6 for 2 % more bytes), split id ``offload-png``;
- ``webp``: WebP lossless (Pillow built with libwebp) at its fastest effort (method 0,
  quality 0: a tenth of the default's time for 8 % more bytes), split id ``offload-webp``;
- ``jpegNN``: baseline JPEG at quality NN (1..100; Pillow's defaults otherwise: 4:2:0 chroma
  subsampling, no optimisation pass), split id ``offload-jpegNN``. Lossy: the answer may change.

A batch travels as one Triton ``BYTES`` tensor ``[B, 1]``, one encoded image per sample (the
protocol frames each with a 4-byte length, like any header: not counted as payload).

Only numpy and Pillow are imported here, never the rest of the package: a server bundle's
Triton Python-backend model copies this file beside its ``model.py`` and decodes with it.
Errors are ``ValueError`` (the caller words them for the user).
"""

from __future__ import annotations

import io
import re

import numpy as np

RAW = "raw"
LOSSLESS = ("raw", "png", "webp")
_FORM = re.compile(r"^(raw|png|webp|jpeg(\d+))$")
LAYOUTS = ("NHWC", "NCHW")
CHANNELS = (1, 3)


def parse_form(form: str) -> tuple[str, int | None]:
    """``jpeg95`` -> ``("jpeg", 95)``; ``png`` -> ``("png", None)``.

    Raises:
        ValueError: not ``raw``, ``png``, ``webp`` or ``jpegNN`` with NN in 1..100, or WebP
            without libwebp in this Pillow.
    """
    m = _FORM.match(form)
    if not m:
        raise ValueError(f"unknown offload form '{form}' (the forms: raw, png, webp, jpegNN with "
                         "quality NN 1..100, e.g. jpeg95)")
    if m.group(2) is not None:
        q = int(m.group(2))
        if not 1 <= q <= 100 or m.group(2) != str(q):
            raise ValueError(f"offload form '{form}': JPEG quality must be 1..100, e.g. jpeg95")
        return "jpeg", q
    if form == "webp" and not webp_available():
        raise ValueError("offload form 'webp' needs Pillow built with libwebp, which this one is not")
    return form, None


def webp_available() -> bool:
    """True when this Pillow can write WebP."""
    from PIL import features

    return bool(features.check("webp"))


def split_id(form: str) -> str:
    """The split id of an offload form: ``offload`` for ``raw``, else ``offload-<form>``."""
    return "offload" if form == RAW else f"offload-{form}"


def is_lossless(form: str) -> bool:
    """True for the forms that return the pixels exactly (raw, png, webp)."""
    return form in LOSSLESS


def image_layout(shape: tuple[int, ...] | list[int], dtype: str) -> str:
    """``NHWC`` or ``NCHW`` for a per-sample input ``shape`` (no batch axis) that a codec can carry.

    Raises:
        ValueError: not uint8, not 3-D, or no axis of 1 or 3 channels at either end.
    """
    shape = tuple(int(d) for d in shape)
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"the input is {dtype}, and an image codec needs uint8 pixels")
    if len(shape) != 3:
        raise ValueError(f"the input's per-sample shape {list(shape)} is not an image [H, W, C] or "
                         "[C, H, W]")
    if shape[-1] in CHANNELS and shape[0] not in CHANNELS:
        return "NHWC"
    if shape[0] in CHANNELS and shape[-1] not in CHANNELS:
        return "NCHW"
    if shape[-1] in CHANNELS and shape[0] in CHANNELS:
        return "NHWC" if shape[-1] == 3 or shape[0] != 3 else "NCHW"
    raise ValueError(f"the input's per-sample shape {list(shape)} has no 1- or 3-channel axis first "
                     "or last (an image codec carries grey or RGB images)")


def _hwc(image: np.ndarray, layout: str) -> np.ndarray:
    return image if layout == "NHWC" else np.transpose(image, (1, 2, 0))


def encode(image: np.ndarray, form: str, layout: str = "NHWC") -> bytes:
    """One image (uint8, per-sample ``[H, W, C]`` or ``[C, H, W]``) in ``form``'s bytes.

    Raises:
        ValueError: an unknown form, or not a uint8 image of 1 or 3 channels.
    """
    codec, quality = parse_form(form)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"an image codec needs uint8 pixels, not {image.dtype}")
    if codec == RAW:
        return np.ascontiguousarray(image).tobytes()
    from PIL import Image

    hwc = _hwc(image, layout)
    if hwc.ndim != 3 or hwc.shape[-1] not in CHANNELS:
        raise ValueError(f"an image codec needs [H, W, 1 or 3] pixels, not {list(image.shape)} ({layout})")
    im = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc),
                         "L" if hwc.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    if codec == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    elif codec == "png":
        im.save(buf, "PNG", compress_level=1)
    else:
        im.save(buf, "WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def decode(data: bytes, form: str, shape: tuple[int, ...] | list[int], layout: str = "NHWC") -> np.ndarray:
    """``form``'s bytes back to one uint8 image of per-sample ``shape`` in ``layout``.

    Raises:
        ValueError: bytes that do not decode to an image of that shape.
    """
    codec, _ = parse_form(form)
    shape = tuple(int(d) for d in shape)
    if codec == RAW:
        arr = np.frombuffer(data, np.uint8)
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{arr.size} bytes are not a raw image of shape {list(shape)}")
        return arr.reshape(shape)
    from PIL import Image

    channels = shape[-1] if layout == "NHWC" else shape[0]
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            hwc = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # Pillow raises several types for a bad stream
        raise ValueError(f"the {codec} bytes do not decode: {type(exc).__name__}: {exc}") from exc
    if hwc.ndim == 2:
        hwc = hwc[..., None]
    out = hwc if layout == "NHWC" else np.transpose(hwc, (2, 0, 1))
    if out.shape != shape:
        raise ValueError(f"the {codec} image decodes to {list(out.shape)}, not {list(shape)}")
    return np.ascontiguousarray(out)


def encode_batch(x: np.ndarray, form: str, layout: str = "NHWC") -> np.ndarray:
    """A batch ``[B, ...]`` of uint8 images as what travels: an object array ``[B, 1]`` of
    ``bytes`` (Triton ``BYTES``), one encoded image per sample."""
    out = np.empty((len(x), 1), dtype=np.object_)
    for i in range(len(x)):
        out[i, 0] = encode(x[i], form, layout)
    return out


def decode_batch(z: np.ndarray, form: str, shape: tuple[int, ...] | list[int],
                 layout: str = "NHWC") -> np.ndarray:
    """What :func:`encode_batch` made (``[B, 1]`` or ``[B]`` of bytes) back to uint8
    ``[B, *shape]``."""
    flat = np.asarray(z, dtype=np.object_).reshape(len(z), -1)
    return np.stack([decode(flat[i, 0], form, shape, layout) for i in range(len(flat))])


def payload_bytes(z: np.ndarray) -> int:
    """Bytes of payload in what a candidate sends: the encoded images' lengths for a ``BYTES``
    batch, the array's bytes otherwise (a raw image, a cut tensor)."""
    z = np.asarray(z)
    if z.dtype == np.object_:
        return int(sum(len(b) for b in z.ravel()))
    return int(z.nbytes)
