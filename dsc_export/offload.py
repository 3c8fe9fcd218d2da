"""The offload wire forms of a split dir (``split --offload raw,png,jpeg95``): checks, bytes per
sample, fidelity, and the codec's runners on either side.

An offload form's candidate sends the model's input through an image codec
(:mod:`dsc_export.codecs`): its **head** is the encoder on the device, its **tail** the decoder
and the whole model on the server. Its manifest record (``Split``, kind ``offload``) has no head
file and ``model.onnx`` as its tail; ``wire`` is the form, and:

- ``bytes``: the **mean** encoded size per sample over every sample input (rounded up; a
  compressed form's size depends on the image), with the mean, median, min and max in
  ``encoded``. ``raw`` is the input's bytes exactly. Without ``--inputs``: the random draws of
  both parts.
- ``fidelity``: :func:`dsc_export.fidelity.measure` of the whole model on the decoded held-out
  samples against the whole model on the raw ones (the held-out part of
  :func:`dsc_export.calibration.sample_parts`, as for the cut forms; the codecs calibrate
  nothing, so the sizes use every sample). A lossless form
  (png, webp) is checked to decode to the raw pixels exactly on every sample, or split fails.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dsc_export import codecs
from dsc_export.artifacts import Split, TensorSig
from dsc_export.errors import UserError, VerificationError
from dsc_export.fidelity import concat_batches, exact, measure
from dsc_export.ort import make_session

RUN_BATCH = 8  # samples per run of the whole model while measuring fidelity
FLOAT_HINT = ("export it with uint8 input and the preprocessing in the graph: dsc-export export NAME "
              "(without --float-input) takes uint8 [N, H, W, 3] RGB and normalises inside")


def parse_forms(text: str | Sequence[str] | None) -> list[str]:
    """``"raw,png,jpeg95"`` (or a list of such) -> the forms, in order, each once; ``raw`` is
    always first (the paper's full offloading stays a candidate).

    Raises:
        UserError: an unknown form, a JPEG quality outside 1..100, or WebP without libwebp.
    """
    items = [text] if isinstance(text, str) else list(text or [])
    forms = [codecs.RAW]
    for item in items:
        for f in (x.strip().lower() for x in item.split(",")):
            if not f:
                continue
            try:
                codecs.parse_form(f)
            except ValueError as exc:
                raise UserError(f"--offload: {exc}") from None
            if f not in forms:
                forms.append(f)
    return forms


def input_layout(sig: TensorSig, forms: Sequence[str]) -> str | None:
    """The input's image layout (NHWC / NCHW) when ``forms`` need a codec, None when they do not.

    Raises:
        UserError: a codec form for an input that is not a uint8 image of 1 or 3 channels
            (one line: why, and how to get a model that takes one).
    """
    coded = [f for f in forms if f != codecs.RAW]
    if not coded:
        return None
    try:
        return codecs.image_layout(sig.shape[1:], sig.dtype)
    except ValueError as exc:
        hint = FLOAT_HINT if np.dtype(sig.dtype).kind == "f" else (
            "an image codec carries uint8 grey or RGB images, NCHW or NHWC")
        what = "takes floats" if np.dtype(sig.dtype).kind == "f" else f"takes {sig.dtype} {sig.shape}"
        raise UserError(f"--offload {','.join(coded)}: input '{sig.name}' {what}: {exc}; {hint}") from None


def _sample_images(samples, parts, name: str) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """(every sample input [K, ...], the held-out ones [H, ...], names of all, random?) of input
    ``name``: the held-out part is the one that measures every form's fidelity
    (:func:`dsc_export.calibration.sample_parts`)."""
    held = np.concatenate([f[name] for f in parts.held_out_feeds(None)])[:parts.held_out_count]
    if samples.samples is not None:
        return np.asarray(samples.samples[name]), held, samples.sample_names, False
    cal = parts.calibration.feeds(parts.calibration_count)[name]
    every = np.concatenate([cal, held])
    return every, held, [f"random #{k}" for k in range(len(every))], True


def _run_whole(session, name: str, x: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """The whole model's outputs on ``x`` [K, ...], run in batches of RUN_BATCH (of the model's
    fixed batch size, the last one padded with its first sample and trimmed)."""
    b = fixed or RUN_BATCH
    runs = []
    for k in range(0, len(x), b):
        chunk = x[k:k + b]
        n = len(chunk)
        if fixed and n < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - n, axis=0)])
        runs.append([o[:n] for o in session.run(None, {name: chunk})])
    return concat_batches(runs)


def offload_splits(model_file: Path, sig: TensorSig, input_bytes: int, samples, forms: Sequence[str], *,
                   parts=None, fixed: int | None = None, log: Callable[[str], None] = lambda s: None,
                   tolerance_rel: float | None = None) -> tuple[list[Split], list[str]]:
    """The manifest records of the offload forms, in ``forms``' order, and notes.

    Args:
        model_file: the whole model (the split dir's ``model.onnx``).
        sig: its input (per-sample shape after the batch dimension).
        input_bytes: bytes of one raw input sample.
        samples: :class:`dsc_export.inputs.SampleInputs`.
        forms: from :func:`parse_forms` (``raw`` first).
        parts: their calibration / held-out parts (:func:`dsc_export.calibration.sample_parts`;
            default: made from ``samples``).
        fixed: the only batch size the model runs at, if any.
        log: progress lines.
        tolerance_rel: the relative tolerance recorded for lossless forms' fidelity.

    Raises:
        UserError: a codec for an input that cannot take one (:func:`input_layout`).
        VerificationError: a lossless form that does not give the pixels back exactly.
    """
    layout = input_layout(sig, forms)
    raw = Split(id="offload", kind="offload", tensor=None, head=None, tail="model.onnx",
                bytes=input_bytes, max_abs_diff=0.0, max_rel_diff=0.0, wire_tensor=sig.name, ratio=1.0,
                wire=codecs.RAW)
    if layout is None:
        return [raw], []
    if parts is None:
        from dsc_export.calibration import sample_parts

        parts = sample_parts(samples)
    x, held_x, names, random = _sample_images(samples, parts, sig.name)
    session = make_session(model_file, optimization="extended", arena=False)
    out_names = [o.name for o in session.get_outputs()]
    reference = _run_whole(session, sig.name, held_x, fixed)
    raw.fidelity = exact(reference, out_names).as_dict()
    splits, notes = [raw], []
    shape = tuple(int(d) for d in sig.shape[1:])
    for k, form in enumerate([f for f in forms if f != codecs.RAW], 1):
        log(f"[{k}/{len(forms) - 1}] offload form {form}: encoding {len(x)} sample(s), "
            f"fidelity on {len(held_x)} held out")
        t0 = time.perf_counter()
        encoded = [codecs.encode(img, form, layout) for img in x]
        encode_ms = (time.perf_counter() - t0) * 1e3 / len(x)
        decoded = np.stack([codecs.decode(b, form, shape, layout) for b in encoded])
        sizes = np.array([len(b) for b in encoded], dtype=np.float64)
        if codecs.is_lossless(form):
            bad = [names[i] for i in range(len(x)) if not np.array_equal(decoded[i], x[i])]
            if bad:
                raise VerificationError(f"offload form {form} is meant to be lossless but does not give "
                                        f"back the pixels of {len(bad)} sample(s) ({bad[0]}, ...); "
                                        "nothing was written")
        held_dec = np.stack([codecs.decode(codecs.encode(img, form, layout), form, shape, layout)
                             for img in held_x])
        got = _run_whole(session, sig.name, held_dec, fixed)
        fid = measure(reference, got, out_names,
                      tolerance=tolerance_rel if codecs.is_lossless(form) else None)
        mean = float(sizes.mean())
        splits.append(Split(
            id=codecs.split_id(form), kind="offload", tensor=None, head=None, tail="model.onnx",
            bytes=int(math.ceil(mean)), max_abs_diff=fid.max_abs, max_rel_diff=fid.max_rel,
            wire_tensor=sig.name, ratio=mean / input_bytes, wire=form, fidelity=fid.as_dict(),
            encoded={"statistic": "mean", "mean": mean, "median": float(np.median(sizes)),
                     "min": int(sizes.min()), "max": int(sizes.max()), "samples": len(x),
                     "lossless": codecs.is_lossless(form), "layout": layout,
                     "encode_ms_per_sample": encode_ms},
        ))
        if random:
            notes.append(f"offload form {form} was sized and measured on random pixels, which compress "
                         "like no photo: give real images (--inputs DIR) for a trustworthy size and "
                         "agreement")
    return splits, notes


# --- run time: the codec on either side ---------------------------------------------------

def form_of(split: Split) -> str | None:
    """The codec form an offload candidate needs (``png``, ``jpeg95``...), None for raw, a cut
    or local."""
    return split.wire if split.encodes else None


def layout_of(manifest) -> str:
    """The image layout of a split dir's input (NHWC / NCHW).

    Raises:
        UserError: the input cannot carry an image codec.
    """
    sig = manifest.model.input
    return input_layout(sig, ["png"])


class Encoder:
    """The head of an offload form on the device: a batch of raw images -> ``BYTES`` [B, 1].
    ``run`` has :class:`dsc_export.engines.PartRunner`'s signature (slowed down alike)."""

    def __init__(self, form: str, layout: str, input_name: str):
        self.form, self.layout, self.input_name = form, layout, input_name

    def run(self, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
        """``[encode_batch(feeds[input])]``."""
        return [codecs.encode_batch(feeds[self.input_name], self.form, self.layout)]


class DecodingRunner:
    """The tail of an offload form on a server: decode the ``BYTES`` batch, then the whole
    model's runner (a :class:`dsc_export.engines.PartRunner`)."""

    def __init__(self, inner, form: str, layout: str, shape: Sequence[int]):
        self.inner, self.form, self.layout, self.shape = inner, form, layout, tuple(int(d) for d in shape)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Decode every input of ``feeds`` and run the whole model on the pixels.

        Raises:
            ValueError: bytes that are not an image of the model's input shape.
        """
        pixels = {k: codecs.decode_batch(v, self.form, self.shape, self.layout) for k, v in feeds.items()}
        return self.inner.run(pixels, outputs)

    def onnx_session(self):
        """The whole model's session (its signature)."""
        return self.inner.onnx_session()

    def close(self) -> None:
        """Close the whole model's runner."""
        self.inner.close()


# --- profiles: the encoder is the head on the device, the decoder part of the tail ----------

CODEC_IMAGES = 48  # distinct photos (the packages' sample photos, crops and mirror images)


def codec_images(sig: TensorSig, count: int = CODEC_IMAGES) -> tuple[np.ndarray, str]:
    """Real photos at the input's resolution, channels and layout, to time a codec on (an
    encoder's time and a JPEG's size depend on the picture; random pixels are the worst case of
    both): :func:`dsc_export.images.sample_photos`, their crops and mirror images, each resized
    (bilinear) to H x W. Returns ``(uint8 [count, ...], what they are)``.

    Raises:
        UserError: the input cannot carry an image codec.
    """
    from PIL import Image

    from dsc_export.images import sample_photos, variants

    layout = input_layout(sig, ["png"])
    per = [int(d) for d in sig.shape[1:]]
    h, w, c = (per[0], per[1], per[2]) if layout == "NHWC" else (per[1], per[2], per[0])
    pool = [v for _, photo in sample_photos() for _, v in variants(photo)]
    step = max(1, len(pool) // count)
    out = []
    for img in pool[::step][:count]:
        im = Image.fromarray(np.ascontiguousarray(img)).convert("L" if c == 1 else "RGB")
        a = np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8)
        a = a[..., None] if a.ndim == 2 else a
        out.append(a if layout == "NHWC" else a.transpose(2, 0, 1))
    return np.stack(out), f"{len(out)} sample photos (crops, mirror images) resized to {h}x{w}"


def codec_timer(form: str, layout: str, images: np.ndarray, batch: int, rng: np.random.Generator, *,
                side: str) -> Callable[[], float]:
    """A ``run_once_ms`` for :func:`dsc_export.profiling.measure` of an offload form's codec at
    ``batch``, on a fresh draw of ``images`` per run (wall clock): ``side="device"`` encodes the
    batch (the form's head), ``side="server"`` decodes it (the tail adds the whole model's time:
    :func:`dsc_export.profiling.profile_split_dir`).
    """
    shape = images.shape[1:]
    encoded = [codecs.encode(im, form, layout) for im in images] if side == "server" else []

    def once() -> float:
        idx = rng.choice(len(images), batch)
        if side == "device":
            t = time.perf_counter()
            codecs.encode_batch(images[idx], form, layout)
            return (time.perf_counter() - t) * 1e3
        z = np.empty((batch, 1), dtype=np.object_)
        for k, i in enumerate(idx):
            z[k, 0] = encoded[i]
        t = time.perf_counter()
        codecs.decode_batch(z, form, shape, layout)
        return (time.perf_counter() - t) * 1e3

    return once
