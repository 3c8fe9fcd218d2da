"""Device and server bundles: what ships to each side, hashed, with safe extraction.

A bundle is a tar file holding a split dir's subset and ``bundle.json`` (schema
``dsc-export.bundle/2``) that lists every other file with its sha256:

- **device**: the manifest, the whole model (``local`` and the fallback), the heads, the
  engines built for them, and the plan;
- **server**: the manifest, the whole model (``offload``), the tails, their engines, and a
  Triton model repository under ``triton/`` that a stock Triton Inference Server serves
  unchanged: one model per split (``onnxruntime_onnx``; ``tensorrt_plan`` with the commands
  that build the plans on the server's GPU; or the Python backend, ``model.py`` running the tail
  with onnxruntime), with instance groups, and dynamic batching only for a model that may merge
  requests (:mod:`dsc_export.triton_repository`). The repository's ONNX copies name their input
  ``input`` and serve their outputs as ``dsc-export serve`` does (the output contract of
  :mod:`dsc_export.contract`), so the device client talks to either server the same way.

Weights are stored once per bundle (:mod:`dsc_export.weight_store`): the split dir's one store
(``weights/``), shared by the model, the parts and the onnxruntime engines beside them, so a
tensor equal in a part and in an engine is one file in the tar and on the disk it is extracted
to. A Triton model reads
its weights from its own version folder (onnxruntime refuses external data outside it), so the
repository's weights files are hard links to the bundle's ``weights/``: the tar stores each
once, and Triton (through onnxruntime, which accepts hard links) reads them in place. Its graph
is the tail's with the served names (kilobytes).

Opening a bundle extracts it to a temporary directory, refusing absolute paths, ``..``, symbolic
links, hard links to anything but an earlier regular file of the bundle, and special files,
checks every file against ``bundle.json`` (and refuses files it does not list), then moves it
into place. A bundle whose engines were built for another backend version,
or of another model than expected, is refused with what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from dsc_export import __version__
from dsc_export.artifacts import MANIFEST_NAME, Manifest, read_manifest, sha256_file, verify_files
from dsc_export.backends import get_backend
from dsc_export.contract import served_outputs
from dsc_export.errors import UserError
from dsc_export.planning import read_plan
from dsc_export.triton_repository import write_triton_repository
from dsc_export.weight_store import check_blobs, link_or_copy, tree_bytes

BUNDLE_SCHEMA = "dsc-export.bundle/2"  # 2: weights stored once (shared stores, hard links in triton/)
OLD_BUNDLE_SCHEMAS = ("dsc-export.bundle/1",)
BUNDLE_INDEX = "bundle.json"
SIDES = ("device", "server")
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")  # Triton platforms (model_config.proto ``platform``)
# bundle --triton-backend -> the repository's kind: a Triton platform, or ``python`` (the Python
# backend, ``backend: "python"``: :mod:`dsc_export.triton_repository`)
TRITON_BACKENDS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": "python"}



def _side_files(man: Manifest, side: str) -> tuple[list[str], list[Any]]:
    part = "head" if side == "device" else "tail"
    onnx_files = sorted({path for _, path in man.parts(part)} | {man.model.path})
    files: list[str] = []
    for rel in onnx_files:
        files += man.files_of(rel)
    engines = [e for e in man.engines if e.part == part]
    files += [d for e in engines for d in e.data]
    return sorted(set(files)), engines


def make_bundle(split_dir: str | os.PathLike, side: str, out: str | os.PathLike, *,
                plan: str | os.PathLike | None = None, triton_platform: str = "onnxruntime_onnx",
                max_batch_size: int = 64, instances: int = 1, triton: bool = True) -> dict[str, Any]:
    """Write a device or server bundle of ``split_dir`` to ``out`` (a tar file, written atomically).

    Args:
        split_dir: the split dir.
        side: ``device`` or ``server``.
        out: the tar file to write.
        plan: the plan to ship to the device [default: ``split_dir/plan.json``; a device bundle
            without a plan is refused].
        triton_platform: Triton platform of the server's model repository (``PLATFORMS``), or
            ``python``: the Python backend.
        max_batch_size, instances: Triton ``max_batch_size`` and CPU/GPU instance count per model.
        triton: include the Triton model repository (server side).

    Returns:
        The bundle index (``bundle.json``).

    Raises:
        UserError: a changed file, an output no server can answer, a device bundle without a
            plan (or with a plan of another model).
    """
    if side not in SIDES:
        raise UserError(f"bundle side must be device or server, not '{side}'")
    if triton_platform not in TRITON_BACKENDS.values():
        raise UserError(f"the Triton repository's platform must be one of {', '.join(TRITON_BACKENDS.values())}")

    root = Path(split_dir)
    man = read_manifest(root)
    served_outputs(root, man)  # an output no server can answer: refused as by build, serve and run
    plan_path = Path(plan) if plan else root / "plan.json"
    if side == "device" and not plan_path.is_file():
        if plan:
            raise UserError(f"plan '{plan}' does not exist")
        raise UserError(f"'{root}' has no plan.json, which the device needs to choose its split; run "
                        "dsc-export plan first (or pass --plan)")
    files, engines = _side_files(man, side)
    verify_files(man, root, [f for f in files if f.endswith(".onnx")])
    for e in engines:
        if not (root / e.path).is_file() or sha256_file(root / e.path) != e.sha256:
            raise UserError(f"engine '{root / e.path}' is missing or changed; run dsc-export build again")
    check_blobs(root, sorted({d for e in engines for d in e.data}))
    staging = Path(tempfile.mkdtemp(prefix="dsc-bundle-"))
    try:
        part = "head" if side == "device" else "tail"
        sub = Manifest(model=man.model, wire_dtype=man.wire_dtype, cut_points=man.cut_points, splits=man.splits,
                       engines=engines, verification=man.verification,
                       files={f: h for f, h in man.files.items() if f in files},
                       data={f: d for f, d in man.data.items() if f in files},
                       dropped=[e for e in man.dropped if e.part == part],
                       samples=man.samples, wires=man.wires)
        (staging / MANIFEST_NAME).write_text(sub.to_json())
        for rel in files + sorted({e.path for e in engines}):
            link_or_copy(root / rel, staging / rel)
        if side == "server" and triton:
            write_triton_repository(staging, sub, repo=staging / "triton", platform=triton_platform,
                                    max_batch_size=max_batch_size, instances=instances)
        if side == "device":

            if read_plan(plan_path).model_sha256 != man.model.sha256:
                raise UserError(f"plan '{plan_path}' was made for another model than '{root}'")
            shutil.copy2(plan_path, staging / "plan.json")
        backends = sorted({(e.backend, e.target.get("version", "")) for e in engines})
        stored = [p for p in sorted(staging.rglob("*")) if p.is_file()]
        index = {"schema": BUNDLE_SCHEMA, "side": side, "model_sha256": man.model.sha256,
                 "dsc_export": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "backends": [{"backend": b, "version": v} for b, v in backends],
                 "files": _hashes(staging, stored),
                 "sizes": side_sizes(staging, sub, part, stored)}
        (staging / BUNDLE_INDEX).write_text(json.dumps(index, indent=1) + "\n")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with tarfile.open(tmp, "w") as tar:
                for p in sorted(stored + [staging / BUNDLE_INDEX],
                                key=lambda p: (p.relative_to(staging).parts[0] == "triton", p)):
                    # the store before triton/: its weights files are the regular members, the
                    # repository's hard links to them
                    tar.add(p, arcname=p.relative_to(staging).as_posix(), recursive=False)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return index
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hashes(root: Path, paths: list[Path]) -> dict[str, str]:
    """sha256 of each file (relative POSIX path -> hex), each hard-linked file read once."""
    by_inode: dict[tuple[int, int], str] = {}
    out = {}
    for p in paths:
        st = p.stat()
        key = (st.st_dev, st.st_ino)
        if key not in by_inode:
            by_inode[key] = sha256_file(p)
        out[p.relative_to(root).as_posix()] = by_inode[key]
    return out


def side_sizes(root: Path, man: Manifest, part: str, paths: list[Path]) -> dict[str, int | float]:
    """What one side stores, in bytes: ``total`` (each file once, hard links once), ``weights``
    (the distinct weights of the side's ONNX files, source form), ``model`` (the whole model's
    ONNX file and weights) and the ratios ``total / model`` and ``total / weights``.

    ``root`` is a split dir or an unpacked bundle; ``paths`` the files the side stores.
    """

    onnx_files = sorted({p for _, p in man.parts(part)} | {man.model.path})
    weights = sorted({d for f in onnx_files for d in man.data.get(f, [])})
    total = tree_bytes(paths)
    unique = sum((root / w).stat().st_size for w in weights)
    model = tree_bytes([root / f for f in man.files_of(man.model.path)])
    return {"total": total, "weights": unique, "model": model,
            "x_model": round(total / model, 3) if model else None,
            "x_weights": round(total / unique, 3) if unique else None}


def side_sizes_of_split(split_dir: str | os.PathLike) -> dict[str, dict[str, int | float]]:
    """:func:`side_sizes` of each side as a bundle of ``split_dir`` would hold it (without the
    plan and the Triton repository), in bytes."""
    root = Path(split_dir)
    man = read_manifest(root)
    out = {}
    for side in SIDES:
        files, engines = _side_files(man, side)
        paths = [root / f for f in files + sorted({e.path for e in engines}) if (root / f).is_file()]
        out[side] = side_sizes(root, man, "head" if side == "device" else "tail", paths)
    return out


def describe_sizes(side: str, sizes: dict[str, int | float]) -> str:
    """One line: a side's bytes, its distinct weights and the ratios to them and to the model."""
    return (f"{side} side: {_size(sizes['total'])} = {sizes['x_model']}x the model "
            f"({_size(sizes['model'])}), {sizes['x_weights']}x its distinct weights "
            f"({_size(sizes['weights'])})")


def _size(n: int) -> str:
    """Bytes for a reader: ``21.2 MB``, ``96.0 kB``, ``512 B`` (SI units, as the tables use)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _safe_members(tar: tarfile.TarFile, source: str) -> list[tarfile.TarInfo]:
    members, regular = [], set()
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")) or ":" in p.parts[0]:
            raise UserError(f"bundle '{source}' holds an unsafe path '{m.name}'; refusing to extract it")
        if m.islnk() and m.linkname not in regular:  # a weights file stored once, linked in triton/
            raise UserError(f"bundle '{source}' holds a link '{m.name}' to '{m.linkname}', which is not a file of "
                            "the bundle stored before it; refusing to extract it")
        if m.issym():
            raise UserError(f"bundle '{source}' holds a link '{m.name}'; refusing to extract it")
        if not (m.isfile() or m.isdir() or m.islnk()):
            raise UserError(f"bundle '{source}' holds a special file '{m.name}'; refusing to extract it")
        if m.isfile():
            regular.add(m.name)
        members.append(m)
    return members


def open_bundle(path: str | os.PathLike, dest: str | os.PathLike, *, expect_side: str | None = None,
                expect_model_sha256: str | None = None, check_backends: bool = True) -> dict[str, Any]:
    """Extract and check a bundle into ``dest`` (which must not exist, or be an earlier copy).

    Raises:
        UserError: unsafe members, a file that does not match its sha256 or is not listed, the
            wrong side, another model, or engines built for another backend version.
    """
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise UserError(f"bundle '{path}' does not exist")
    try:
        tar = tarfile.open(path, "r")
    except tarfile.TarError as exc:
        raise UserError(f"'{path}' is not a bundle (not a tar file)") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        with tar:
            members = _safe_members(tar, str(path))
            tar.extractall(tmp, members=members, filter="data")
        index_path = tmp / BUNDLE_INDEX
        if not index_path.is_file():
            raise UserError(f"'{path}' is not a dsc-export bundle (no {BUNDLE_INDEX})")
        index = json.loads(index_path.read_text())
        if index.get("schema") in OLD_BUNDLE_SCHEMAS:
            raise UserError(f"'{path}' was made by an older dsc-export ({index['schema']}); make it again with "
                            "dsc-export bundle (after dsc-export split and build)")
        if index.get("schema") != BUNDLE_SCHEMA:
            raise UserError(f"'{path}' is not a {BUNDLE_SCHEMA} bundle (schema: {index.get('schema')!r})")
        listed = index.get("files", {})
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and rel != BUNDLE_INDEX and rel not in listed:
                raise UserError(f"bundle '{path}' holds '{rel}', which its index does not list; refusing it")
        hashes: dict[tuple[int, int], str] = {}  # a hard-linked weights file is read once
        for rel, sha in listed.items():
            f = tmp / rel
            if not f.is_file():
                raise UserError(f"bundle '{path}' is missing '{rel}'")
            st = f.stat()
            key = (st.st_dev, st.st_ino)
            if key not in hashes:
                hashes[key] = sha256_file(f)
            if hashes[key] != sha:
                raise UserError(f"'{rel}' in bundle '{path}' does not match its sha256; the bundle was changed "
                                "or damaged — make it again with dsc-export bundle")
        if expect_side and index.get("side") != expect_side:
            raise UserError(f"'{path}' is a {index.get('side')} bundle; this needs a {expect_side} bundle")
        if expect_model_sha256 and index.get("model_sha256") != expect_model_sha256:
            raise UserError(f"bundle '{path}' is of another model (sha256 {index.get('model_sha256', '')[:12]}…, "
                            f"expected {expect_model_sha256[:12]}…)")
        if check_backends:
            for b in index.get("backends", []):
                why = _backend_differs(b["backend"], b["version"])
                if why:
                    raise UserError(f"bundle '{path}' has {b['backend']} engines built with version {b['version']}, "
                                    f"{why}; rebuild them here with dsc-export build")
        if dest.exists():
            if not (dest / BUNDLE_INDEX).is_file():
                raise UserError(f"'{dest}' exists and is not an unpacked bundle; choose another place")
            shutil.rmtree(dest)
        tmp.rename(dest)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _backend_differs(backend: str, version: str) -> str | None:
    b = get_backend(backend)
    if b.available():
        return f"and {backend} cannot run here ({b.available()})"
    here = b.target().get("version")
    return None if here == version else f"this machine has {here}"
