"""The feeds of a part: what a head, a tail or the whole model of a split dir really receives.

A head and the whole model read the model's input: the sample inputs (a user's ``--inputs``,
or random ones within the ranges the graph implies, :class:`dsc_export.inputs.SampleInputs`).
A tail reads its head's output: the head is run on those sample inputs and the tail is fed
what it returned, so the tail sees the cut tensor's real dtype (uint8 / int8 in a quantized
model, int64 for an ArgMax mask, float16 on a float16 wire) and real values (a quantized
tensor's zero point, a ReLU's zeros, a mask's classes), never random data of a guessed type.

Every place that runs a part on inputs it did not get from a user goes through
:class:`PartFeeds`: the engine checks and the keep-or-drop timing of ``build``, the timing of
``bench`` (both roles), the client's warm-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsc_export.artifacts import Manifest
from dsc_export.errors import ModelRunError, UserError
from dsc_export.graph.model import load_model
from dsc_export.inputs import SampleInputs
from dsc_export.ort import make_session


def model_samples(root: str | os.PathLike, manifest: Manifest, inputs=None, seed: int = 0) -> SampleInputs:
    """The sample inputs of a split dir's model: ``inputs`` as it is (a SampleInputs), a path
    (``.npz`` / image folder, checked against the model), or None: random within the ranges the
    graph implies (only the model's structure is read, never its weights)."""
    if hasattr(inputs, "feeds"):
        return inputs
    structure = load_model(Path(root) / manifest.model.path, load_data=False)
    if inputs is None:
        return SampleInputs.random(structure, seed)
    return SampleInputs.from_path(inputs, structure)


def reads_model_input(manifest: Manifest, split_id: str, part: str) -> bool:
    """True when ``part`` of ``split_id`` reads the model's input (a head, ``offload``'s tail:
    the whole model), False for the tail of a cut."""
    s = manifest.split(split_id)
    return part == "head" or s.kind != "split"


class PartFeeds:
    """Batches for one part of a split dir, as it receives them.

    Args:
        root: the split dir.
        manifest: its manifest.
        split_id: the split (``offload``, ``local`` or a cut).
        part: ``head`` or ``tail``.
        samples: the model's sample inputs (:func:`model_samples`) [default: random, seed 0].

    :meth:`feeds` gives ``{input name: array}`` for a batch of the part: the model's input for a
    head or the whole model, ``{wire tensor: head output}`` for a tail. A tail's batches are
    computed once per ``(batch, index)`` by running its head's ONNX (one session, created on
    first use; :meth:`release` frees it) and kept.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, split_id: str, part: str, samples=None):
        self.root, self.manifest, self.part = Path(root), manifest, part
        self.split = manifest.split(split_id)
        self.samples = samples if samples is not None else model_samples(root, manifest)
        self.model_input = reads_model_input(manifest, split_id, part)
        self._head = None
        self._made: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    @property
    def description(self) -> str:
        """What the feeds are, for logs and records."""
        if self.model_input:
            return self.samples.description
        return f"the outputs of {self.split.head} on the model's sample inputs ({self.samples.description})"

    def feeds(self, batch: int, index: int = 0) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``batch`` samples for the part (the same on every call).

        Raises:
            UserError: the head fails on the sample inputs (one line naming the node), or the
                sample inputs cannot be drawn (a symbolic non-batch dimension).
        """
        if self.model_input:
            return self.samples.feeds(batch, index)
        key = (batch, index)
        if key not in self._made:
            x = self.samples.feeds(batch, index)
            if self._head is None:
                self._head = make_session(self.root / self.split.head, optimization="extended", arena=False)
            try:
                (z,) = self._head.run([self.split.wire_tensor], x)
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise UserError(f"{ModelRunError(f'the head of {self.split.id}', batch, exc)}; its tail "
                                "is fed the head's outputs on the sample inputs") from exc
            self._made[key] = {self.split.wire_tensor: z}
        return self._made[key]

    def prepare(self, batches, count: int = 1) -> PartFeeds:
        """Compute batches ``0 .. count - 1`` at each of ``batches`` now, then :meth:`release` the
        head (so no head session is alive while the caller loads its own); nothing to do for a
        part that reads the model's input. Returns ``self``."""
        if self.model_input:
            return self
        for b in batches:
            for k in range(count):
                self.feeds(b, k)
        self.release()
        return self

    def release(self) -> None:
        """Drop the head's session (the batches computed stay)."""
        self._head = None


def part_feeds(root: str | os.PathLike, manifest: Manifest, split_id: str, part: str, *, inputs=None,
               seed: int = 0) -> PartFeeds:
    """:class:`PartFeeds` of ``part`` of ``split_id``, on ``inputs`` (see :func:`model_samples`)."""
    return PartFeeds(root, manifest, split_id, part, model_samples(root, manifest, inputs, seed))
