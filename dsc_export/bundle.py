"""Device and server bundles: what ships to each side, hashed, with safe extraction.

A bundle is a tar file holding a split dir's subset and ``bundle.json`` (schema
``dsc-export.bundle/2``) that lists every other file with its sha256:

- **device**: the manifest, the whole model (``local`` and the fallback), the heads, the
  engines built for them, and the plan;
- **server**: the manifest, the whole model (``offload``), the tails, their engines, and a
  Triton model repository under ``triton/`` that a stock Triton Inference Server serves
  unchanged: one model per split (``onnxruntime_onnx``; ``tensorrt_plan`` with the commands
  that build the plans on the server's GPU; or the Python backend, ``model.py`` running the tail
  with onnxruntime, :mod:`dsc_export.serving.triton_python`), with instance groups, and dynamic
  batching only for a model that may merge requests. The repository's ONNX copies name their input ``input`` and
  serve their outputs as ``dsc-export serve`` does (the output contract of
  :mod:`dsc_export.serving.protocol`), so the device client talks to either server the same way.

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
from dsc_export.errors import UserError, lazy_import
from dsc_export.graph.model import load_model
from dsc_export.graph.wire import check_symmetric
from dsc_export.offload import layout_of
from dsc_export.planning import read_plan
from dsc_export.serving.protocol import INPUT, TRITON_TYPES, fixed_batch, mergeable, served_outputs
from dsc_export.serving.triton_python import write_codec, write_python_model
from dsc_export.weight_store import check_blobs, link_or_copy, save_linked, tree_bytes

BUNDLE_SCHEMA = "dsc-export.bundle/2"  # 2: weights stored once (shared stores, hard links in triton/)
OLD_BUNDLE_SCHEMAS = ("dsc-export.bundle/1",)
BUNDLE_INDEX = "bundle.json"
SIDES = ("device", "server")
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")  # Triton platforms (model_config.proto ``platform``)
# bundle --triton-backend -> the repository's kind: a Triton platform, or ``python`` (the Python
# backend, ``backend: "python"``: :mod:`dsc_export.serving.triton_python`)
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


def make_bundle(split_dir: str | os.PathLike, side: str, out: str | os.PathLike, *, plan: str | os.PathLike | None = None,
                triton_platform: str = "onnxruntime_onnx", max_batch_size: int = 64, instances: int = 1,
                triton: bool = True) -> dict[str, Any]:
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
                for p in sorted(stored + [staging / BUNDLE_INDEX], key=lambda p: (p.relative_to(staging).parts[0] == "triton", p)):
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


def write_triton_repository(root: Path, man: Manifest, *, repo: Path, platform: str = "onnxruntime_onnx",
                            max_batch_size: int = 64, instances: int = 1) -> list[str]:
    """One Triton model per split with a tail: ``repo/<split>/config.pbtxt`` and the model.

    ``repo`` must be inside ``root`` (a bundle's staging folder): the model's weights files are
    hard links to ``root``'s store (Triton model configuration: the model file sits in the version
    folder, and onnxruntime reads external data only below the model file's folder), so the
    repository adds graphs, not weights. What each platform writes is in :data:`TRITON_MODEL_FILES`.

    Each repository model is the tail with its input named ``input`` and its outputs as the
    output contract (:func:`dsc_export.serving.protocol.output_contract`) serves them: outputs
    named as the client asks for them, an output whose batch is on another axis transposed to
    batch first, constant outputs left out (the client has them). ``config.pbtxt`` is written
    through Triton's own ``ModelConfig`` protobuf, so every string is escaped by protobuf. A model
    that may merge requests gets ``dynamic_batching``; one that must not gets none (each request
    runs as it came); one that runs at one batch size only gets ``max_batch_size: 0`` and full
    shapes, so Triton refuses any other batch. ``build-plans.sh`` (``tensorrt_plan``) quotes
    every argument.

    Returns:
        The model names written.

    Raises:
        UserError: an output no server can answer; tritonclient (the ``serve`` extra) missing.
    """
    import onnx


    pb = lazy_import("tritonclient.grpc.model_config_pb2", "serve")
    text_format = lazy_import("google.protobuf.text_format", "serve")
    contract = served_outputs(root, man)
    fixed, merge = fixed_batch(man), mergeable(man)
    if platform == "tensorrt_plan":
        check_symmetric({s.id: s.quant for s in man.splits if s.tail}, "TensorRT (tensorrt_plan)")
    names = []
    extra: list[str] = []  # lines of a script the platform needs beside the models
    for s in man.splits:
        if not s.tail:
            continue
        model = load_model(root / s.tail, load_data=False)  # the graph only: the weights are linked
        _serve_form(model, INPUT, contract)
        inp = model.graph.input[0].type.tensor_type
        in_dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in inp.shape.dim]
        in_type = TRITON_TYPES[onnx.helper.tensor_dtype_to_np_dtype(inp.elem_type).name]
        # an offload codec form: Triton's own backends cannot decode images, the Python backend can
        kind = "python" if s.encodes else platform
        if s.encodes:
            in_dims, in_type = [-1, 1], "TYPE_STRING"  # one encoded image (BYTES) per sample
        d = repo / s.id
        (d / "1").mkdir(parents=True, exist_ok=True)
        extra += TRITON_MODEL_FILES[kind](root, man, s, model, d, in_dims, fixed=fixed,
                                          max_batch_size=max_batch_size)
        config = pb.ModelConfig(name=s.id, max_batch_size=0 if fixed else max_batch_size)
        if kind == "python":  # a backend, not a platform (model_config.proto)
            config.backend = kind
        else:
            config.platform = kind
        if fixed:
            config.input.add(name=INPUT, data_type=pb.DataType.Value(in_type), dims=[fixed] + in_dims[1:])
        else:
            config.input.add(name=INPUT, data_type=pb.DataType.Value(in_type), dims=in_dims[1:])
        for c in contract:
            if c.kind != "constant":
                config.output.add(name=c.wire_name, data_type=pb.DataType.Value(TRITON_TYPES[c.dtype]), dims=c.dims)
        if merge:
            config.dynamic_batching.max_queue_delay_microseconds = 2000
        group = pb.ModelInstanceGroup.KIND_GPU if kind == "tensorrt_plan" else pb.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(count=instances, kind=group)
        config.parameters["dsc_model_sha256"].string_value = man.model.sha256
        if kind == "python":  # model.py and the engines; their names go into the parameters
            write_python_model(root, man, s.id, d, config, lambda m: _serve_form(m, INPUT, contract))
        if s.encodes:  # the codec beside model.py, and what it decodes
            write_codec(d / "1", config, s.wire, layout_of(man), man.model.input.shape[1:])
        (d / "config.pbtxt").write_text(text_format.MessageToString(config))
        names.append(s.id)
    if extra:
        (repo / "build-plans.sh").write_text("\n".join(
            ["#!/bin/sh", "# Build the TensorRT plans of this Triton repository on the server's GPU.", "set -e",
             'cd "$(dirname "$0")"'] + extra) + "\n")
    return names


def _onnxruntime_files(root: Path, man: Manifest, split, model, d: Path, in_dims, *, fixed, max_batch_size) -> list[str]:
    """``onnxruntime_onnx``: the model in the version folder, served as it is."""
    save_linked(model, root, d / "1")
    return []


def _tensorrt_files(root: Path, man: Manifest, split, model, d: Path, in_dims, *, fixed, max_batch_size) -> list[str]:
    """``tensorrt_plan``: the ONNX beside the version folder and the trtexec lines (every
    argument quoted) that build ``1/model.plan`` on the server's GPU."""
    import shlex

    from dsc_export.backends.tensorrt import shape_spec

    save_linked(model, root, d)
    sid = split.id
    argv = ["trtexec", f"--onnx={sid}/model.onnx", f"--saveEngine={sid}/1/model.plan", "--stronglyTyped"]
    per_sample = in_dims[1:]
    if fixed and in_dims[0] > 0:
        pass  # fully static input: trtexec takes no shapes
    elif fixed:
        argv.append(f"--shapes={shape_spec(INPUT, [fixed] + per_sample)}")
    else:
        argv += [f"--minShapes={shape_spec(INPUT, [1] + per_sample)}",
                 f"--optShapes={shape_spec(INPUT, [max(1, max_batch_size // 2)] + per_sample)}",
                 f"--maxShapes={shape_spec(INPUT, [max_batch_size] + per_sample)}"]
    return [shlex.join(["mkdir", "-p", f"{sid}/1"]), shlex.join(argv)]  # a tar keeps no empty folder


# Triton platform -> what a model of the repository holds beside its config.pbtxt (a later
# backend, e.g. Triton's python backend, adds its writer here).
# python: model.onnx as onnxruntime_onnx has it; model.py and the engines come from serving/triton_python.py
TRITON_MODEL_FILES = {"onnxruntime_onnx": _onnxruntime_files, "tensorrt_plan": _tensorrt_files,
                      "python": _onnxruntime_files}


def _serve_form(model, input_name: str, contract) -> None:
    """Give a tail the form the output contract serves, in place: its input named ``input``, its
    outputs named as served, batch moved to axis 0 where it is elsewhere, constants dropped."""
    from onnx import helper

    by_name = {c.name: c for c in contract}
    renames = {model.graph.input[0].name: input_name}
    outputs, moves = [], []
    for o in model.graph.output:
        c = by_name.get(o.name)
        if c is None or c.kind == "constant":
            continue
        tt = o.type.tensor_type
        if c.kind == "batched" and c.batch_axis:
            inner = f"{o.name}__batch_on_axis_{c.batch_axis}"
            renames[o.name] = inner
            perm = [c.batch_axis] + [k for k in range(len(tt.shape.dim)) if k != c.batch_axis]
            dims = [tt.shape.dim[k].dim_param or tt.shape.dim[k].dim_value or None for k in perm]
            moves.append(helper.make_node("Transpose", [inner], [c.wire_name], perm=perm,
                                          name=f"{c.wire_name}__to_batch_first"))
            outputs.append(helper.make_tensor_value_info(c.wire_name, tt.elem_type, dims))
        else:
            renames[o.name] = c.wire_name
            outputs.append(o)
    _rename_io(model, renames)
    model.graph.node.extend(moves)
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def _rename_io(model, renames: dict[str, str]) -> None:
    """Rename tensors in place: every reader, producer, graph input and output follows. An inner
    tensor that already has one of the new names (older torch exports name one ``input``) is
    renamed out of the way first."""
    taken = {t for n in model.graph.node for t in list(n.input) + list(n.output)} | \
        {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    targets = set(renames.values())
    for name in sorted(taken & targets - set(renames)):
        k = 1
        while f"{name}__{k}" in taken:
            k += 1
        renames = {**renames, name: f"{name}__{k}"}
        for t in model.graph.initializer:
            if t.name == name:
                t.name = f"{name}__{k}"
    for n in model.graph.node:
        n.input[:] = [renames.get(x, x) for x in n.input]
        n.output[:] = [renames.get(x, x) for x in n.output]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        vi.name = renames.get(vi.name, vi.name)


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
