"""Is axis 0 of the model's input a batch? The one rule that tells a batch-less image from a batch.

dsc-export reads axis 0 of the input as the batch (dynamic, or fixed at N). torchvision's
detection models (SSDlite, Faster R-CNN, RetinaNet, ...) take a *list* of images and export one
image ``[3, H, W]`` with no batch axis, unsqueezed inside the graph; read as a fixed batch of 3,
the colour planes would pass for samples (a third of the bytes per sample, cut points sized per
plane, data-dependent ``boxes [-1, 4]`` outputs let through as if per request).

The rule (:func:`batchless_image`): a rank-3 input that is shaped like one image and not like a
batch of samples. A real batch of images is rank 4 (``[N, C, H, W]`` / ``[N, H, W, C]``), so a
rank-3 input is image-like when

- channels first: axis 0 is a fixed 3 or 4 (RGB, RGBA) and axes 1, 2 are image-sized (both at
  least :data:`MIN_SIDE`, or symbolic: torchvision's dynamic ``height`` and ``width``); or
- channels last: axis 2 is a fixed 1, 3 or 4 and axes 0, 1 are image-sized (axis 0 fixed:
  a symbolic axis 0 is a batch, ``[N, T, 3]``);

and, where both sides are fixed, they are within :data:`MAX_ASPECT` of each other (a fixed batch
of token embeddings ``[4, 77, 512]`` is not an image). ``[1, H, W]`` is not refused: at batch 1
the two readings are the same sample. Rank 4 is never questioned, so a real fixed batch
``[N, C, H, W]`` is a batch whatever N is.
"""

from __future__ import annotations

MIN_SIDE = 16  # pixels: below this an axis is not an image side
MAX_ASPECT = 4.0  # the longer fixed side over the shorter, at most, for an image
PLANES_FIRST = (3, 4)
PLANES_LAST = (1, 3, 4)


def _side(d) -> bool:
    return not isinstance(d, int) or d <= 0 or d >= MIN_SIDE


def _aspect_ok(h, w) -> bool:
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return max(h, w) / min(h, w) <= MAX_ASPECT
    return True


def batchless_image(name: str, dims: list) -> str | None:
    """Why input ``name`` of shape ``dims`` (ints, symbolic dims as strings) is one image with
    no batch axis, as one line naming the missing axis and how to re-export; None when axis 0
    may be a batch (see the module docstring for the rule).

    Args:
        name: the input's name, for the message.
        dims: its shape as declared.

    Returns:
        The refusal's text, or None.
    """
    if len(dims) != 3:
        return None
    a, b, c = dims
    shown = "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else repr(d) for d in dims) + "]"
    how = ("re-export it with a batch axis, an input [N, 3, H, W] or [1, 3, H, W] (e.g. export a "
           "wrapper whose forward(x) returns model(list(x)) or model([x[0]]))")
    if a in PLANES_FIRST and _side(b) and _side(c) and _aspect_ok(b, c):
        return (f"input '{name}' has shape {shown}: one image with no batch axis (channels first: "
                f"{a} colour planes, as torchvision's detection models export a list of images), not "
                f"a batch of {a}; dsc-export needs axis 0 to be the batch: {how}")
    if (c in PLANES_LAST and isinstance(a, int) and a >= MIN_SIDE and _side(b) and _aspect_ok(a, b)):
        return (f"input '{name}' has shape {shown}: one image with no batch axis (channels last: "
                f"{c} channel(s) of {a} rows), not a batch of {a}; dsc-export needs axis 0 to be the "
                f"batch: re-export it with an input [N, H, W, {c}] or [1, H, W, {c}]")
    return None
