"""A run-time session on the device: the batches it feeds the client, the loop that runs them,
and the labels of the images that went through each split.

Used by ``dsc-export run`` and by ``dsc-export demo`` (:mod:`dsc_export.demo`): one home for
the loop and the image loading both need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsc_export.errors import UserError
from dsc_export.images import Label, Preprocess, batches, read_folder, sample_photos, top_k
from dsc_export.ort import random_array


@dataclass
class Feed:
    """The input batches of a session: images (cycled, every batch full) or random arrays.

    Attributes:
        shape: the batch's shape ``[batch, *per-sample shape]``.
        dtype: its dtype.
        names: the images' names (empty for random inputs).
        images: the image batches, each ``shape``; None: random arrays (seeded by ``seed``).
    """

    shape: list[int]
    dtype: np.dtype
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] | None = None
    seed: int = 0

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def batch(self, k: int) -> np.ndarray:
        """The ``k``-th batch (images: ``images[k % len(images)]``; random: the next draw)."""
        if self.images is None:
            return random_array(self.shape, self.dtype, self._rng)
        return self.images[k % len(self.images)]

    def image_at(self, k: int, i: int) -> int:
        """The index (into ``names``) of the image at row ``i`` of batch ``k``."""
        return ((k % len(self.images)) * self.shape[0] + i) % len(self.names)


def random_feed(shape: list[int], dtype, seed: int = 0) -> Feed:
    """Random batches of ``shape`` and ``dtype`` (:func:`dsc_export.ort.random_array`)."""
    return Feed(list(shape), np.dtype(dtype), seed=seed)


def image_feed(model_path: str | Path, shape: list[int], dtype, folder: str | Path | None = None, *,
               max_batches: int | None = None, what: str = "images") -> Feed:
    """Images preprocessed as the model was evaluated (resize, centre crop), in full batches.

    Args:
        model_path: the whole model's ONNX file (its preprocessing metadata).
        shape: the batch's shape ``[batch, H, W, 3]``.
        dtype: the model input's dtype (uint8).
        folder: a folder of images; None: the sample photos
            (:func:`dsc_export.images.sample_photos`).
        max_batches: keep only the first batches.
        what: how the error names what asked for images.

    Raises:
        UserError: a model that does not take square uint8 NHWC images, or an unreadable
            folder (:func:`dsc_export.images.read_folder`).
    """
    dtype = np.dtype(dtype)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
        raise UserError(f"{what} needs a model that takes square uint8 NHWC images "
                        "(dsc-export export's default)")
    pre = Preprocess.for_onnx(model_path, int(shape[1]))
    named = sample_photos() if folder is None else read_folder(folder)
    stacked = batches([pre(a) for _, a in named], shape[0])
    return Feed(list(shape), dtype, [n for n, _ in named], stacked[:max_batches])


def run_batches(client, feed: Feed, count: int, *, before: Callable[[int], None] | None = None,
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run ``count`` batches of ``feed`` through a client
    (:class:`dsc_export.serving.client.DynamicSplitClient`).

    Args:
        client: the client (its ``log`` records each batch: split, bytes, times).
        feed: the batches.
        count: how many.
        before: called with the batch's index before it runs (e.g. to set a simulated rate).

    Yields:
        ``(index, outputs by name)`` per batch.
    """
    for k in range(count):
        if before is not None:
            before(k)
        yield k, client.infer(feed.batch(k))


@dataclass
class Labels:
    """Per image and split: the top-``k`` ImageNet labels the first time the image ran through
    that split (splits in the order first run)."""

    feed: Feed
    output: str
    k: int = 5
    by_image: dict[int, dict[str, list[Label]]] = field(default_factory=dict)

    def add(self, index: int, split: str, outputs: dict[str, np.ndarray]) -> None:
        """Record batch ``index``'s outputs, which ran on ``split``.

        Raises:
            UserError: outputs that are not ImageNet logits (:func:`dsc_export.images.top_k`).
        """
        rows = range(self.feed.shape[0])
        if all(split in self.by_image.get(self.feed.image_at(index, i), {}) for i in rows):
            return
        for i, top in enumerate(top_k(outputs[self.output], self.k)):
            self.by_image.setdefault(self.feed.image_at(index, i), {}).setdefault(split, top)
