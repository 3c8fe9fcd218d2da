"""Weights stored once: content-addressed ONNX external data shared by every file of a folder.

Every initializer of at least :data:`MIN_BYTES` is stored as ONNX external data (spec: "External
Data" in the ONNX IR; ``onnx.external_data_helper``) in ``weights/<sha256>.bin`` beside the ONNX
file, named by the sha256 of its raw bytes. Files of one folder that hold the same tensor refer
to the same blob, so it is stored once however many heads, tails or batch sizes read it. A split
dir has one store: the model, the heads and tails and the onnxruntime engines all sit in its root,
so adding an engine for another batch size adds its graph (kilobytes) and only the blobs no other
file of the dir already holds (the tensors the optimiser changed).

The store is per folder because onnxruntime refuses external data outside the model's folder
(``External data path escapes model directory``, symbolic links resolved) and onnx refuses
external data with several hard links. A blob's name is its hash, so each blob is checked on
its own: :func:`check_blobs` refuses a changed one by name.

Pure core: :func:`externalize` (a model in memory -> its blobs, the model referring to them);
I/O: :func:`write_blobs`, :func:`save_shared`, :func:`check_blobs`, :func:`prune`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

from dsc_export.artifacts import sha256_file
from dsc_export.errors import UserError
from dsc_export.graph.model import all_initializers

WEIGHTS_DIR = "weights"
SUFFIX = ".bin"
MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph: kilobytes, and no file each


def blob_name(data: bytes) -> str:
    """``weights/<sha256 of data>.bin``: where a tensor of these raw bytes is stored (relative
    to the folder of the ONNX files that read it)."""
    return f"{WEIGHTS_DIR}/{hashlib.sha256(data).hexdigest()}{SUFFIX}"


def externalize(model: onnx.ModelProto, *, min_bytes: int = MIN_BYTES) -> dict[str, bytes]:
    """Move every initializer of ``model`` with at least ``min_bytes`` of raw data to external
    data named by its content, in place (pure: nothing is written).

    Initializers of subgraphs (If/Loop bodies) are included; a tensor already external, or held
    in typed fields instead of ``raw_data``, is left as it is.

    Returns:
        The blobs: relative location (``weights/<sha256>.bin``) -> raw bytes. Tensors of equal
        bytes share one location.
    """

    blobs: dict[str, bytes] = {}
    for t in all_initializers(model.graph):
        if external_data_helper.uses_external_data(t) or not t.HasField("raw_data") or len(t.raw_data) < min_bytes:
            continue
        data = t.raw_data
        loc = blob_name(data)
        blobs.setdefault(loc, data)
        external_data_helper.set_external_data(t, loc, offset=0, length=len(data))
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
    return blobs


def referenced(model: onnx.ModelProto) -> list[str]:
    """The external data locations ``model`` reads (relative to its folder), sorted."""

    return sorted({external_data_helper.ExternalDataInfo(t).location for t in all_initializers(model.graph)
                   if external_data_helper.uses_external_data(t)})


def write_blobs(folder: str | os.PathLike, blobs: dict[str, bytes]) -> None:
    """Write the blobs that ``folder`` does not hold yet (each through a temporary sibling and a
    rename: never half-written). A blob already there is left alone: its name is its content."""
    folder = Path(folder)
    for loc, data in blobs.items():
        dst = folder / loc
        if dst.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_shared(model: onnx.ModelProto, path: str | os.PathLike, *, min_bytes: int = MIN_BYTES) -> list[str]:
    """Save ``model`` to ``path`` with its weights in the content-addressed store of its folder.

    The model is changed in place (its large tensors become external references). Blobs are
    written before the graph, so a reader never finds a graph whose weights are missing.

    Returns:
        Every blob the file reads, relative to its folder (``weights/<sha256>.bin``).
    """
    path = Path(path)
    write_blobs(path.parent, externalize(model, min_bytes=min_bytes))
    onnx.save_model(model, os.fspath(path))
    return referenced(model)


def check_blobs(root: str | os.PathLike, rels: list[str]) -> None:
    """Refuse (one line, naming the file) a blob that is missing or whose sha256 is not its name.

    A blob read and found right is not read again in this process while its size and
    modification time stay the same: the engines of a split dir share most blobs, and loading
    each of them (``serve``, ``run``, ``bench``) would otherwise hash the same weights again.

    Args:
        root: the folder ``rels`` are relative to.
        rels: blob paths (``.../weights/<sha256>.bin``).

    Raises:
        UserError: a missing or changed blob.
    """
    root = Path(root)
    for rel in rels:
        p = root / rel
        if not p.is_file():
            raise UserError(f"weights file '{p}' is missing; run the verb that wrote it again")
        st = p.stat()
        key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
        if key in _CHECKED:
            continue
        if sha256_file(p) != p.name.removesuffix(SUFFIX):
            raise UserError(f"weights file '{p}' does not match its sha256 (its name): it was changed; refusing it")
        _CHECKED.add(key)


_CHECKED: set[tuple[str, int, int]] = set()  # blobs found right: (real path, size, mtime ns)


def prune(folder: str | os.PathLike, keep: set[str]) -> int:
    """Remove the blobs of ``folder/weights/`` that no file reads any more (``keep``: the
    locations still read, relative to ``folder``). Returns the bytes freed."""
    store = Path(folder) / WEIGHTS_DIR
    freed = 0
    if store.is_dir():
        for p in store.iterdir():
            if p.is_file() and f"{WEIGHTS_DIR}/{p.name}" not in keep:
                freed += p.stat().st_size
                p.unlink()
    return freed


def tree_bytes(paths: list[Path]) -> int:
    """Bytes on disk of ``paths``, each file counted once (hard links to one file count once)."""
    seen, total = set(), 0
    for p in paths:
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where the file system has no links); an existing
    ``dst`` is kept (blobs are named by their content, so it holds the same bytes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)  # staging only: the tar stores one regular file and links to it
    except OSError:
        shutil.copy2(src, dst)


def save_linked(model: onnx.ModelProto, src_dir: Path, folder: Path, name: str = "model.onnx") -> None:
    """Save ``model`` as ``folder/name`` with its weights files hard links to ``src_dir``'s.

    Args:
        model: a graph whose external data locations are relative to ``src_dir`` (loaded with
            ``load_data=False``).
        src_dir: the folder the model was read from (a split dir).
        folder: where it is saved; its ``weights/`` gets a link per blob the model reads.
    """
    for loc in referenced(model):
        link_or_copy(Path(src_dir) / loc, Path(folder) / loc)
    onnx.save_model(model, os.fspath(Path(folder) / name))
