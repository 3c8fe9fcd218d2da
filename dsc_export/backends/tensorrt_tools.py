"""TensorRT's offline tools: the trtexec script that builds a split dir's engines on another
machine (``build --emit-trtexec``), and the import of the engines it built (``build --import``).

The command lines come from the one writer of trtexec lines,
:func:`dsc_export.backends.tensorrt.trtexec_line` (through :meth:`TensorrtBackend.trtexec_command`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dsc_export.artifacts import (
    MANIFEST_NAME,
    Engine,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from dsc_export.backends.base import BackendOptions, BuildOptions
from dsc_export.engines.build import BuildReport
from dsc_export.engines.jobs import (
    ENGINES_DIR,
    checked_jobs,
    engine_data,
    engine_key,
    prepare_build,
)
from dsc_export.errors import UserError
from dsc_export.graph.model import load_model
from dsc_export.graph.precision import to_float16_for_build
from dsc_export.graph.signature import input_signature
from dsc_export.inputs import SampleInputs


def emit_trtexec(split_dir: str | os.PathLike, out_file: str | os.PathLike, *, batch_sizes: list[int],
                 parts: str = "all", precision: str = "fp32", options: BackendOptions | BuildOptions | None = None,
                 log: Callable[[str], None] = lambda s: None) -> int:
    """Write the ``trtexec`` commands that build this split dir's engines on another machine.

    The commands are relative to the split dir and write the engine files where ``build
    --import`` looks for them: one engine per part, one optimisation profile per batch size
    (``--profile=K`` then that profile's ``--minShapes`` = ``--optShapes`` = ``--maxShapes``, in
    ascending batch order, as :meth:`TensorrtBackend.build` adds them). For fp16 the converted ONNX
    files are written first (the commands read them), since TensorRT 11 takes precision from the
    ONNX types. Every argument is quoted for ``sh`` (tensor names may hold ``;``, spaces, quotes,
    ``$``); an input that is fully static gets no shapes.

    Returns:
        The number of engine commands written.

    Raises:
        UserError: not a split dir, a changed file, an output no server can answer, or an input
            name trtexec cannot express (a ``,`` or ``'``).
    """
    import shlex

    from dsc_export.backends.tensorrt import TIMING_CACHE, TensorrtBackend, shape_spec

    root = Path(split_dir)
    manifest = read_manifest(root)
    backend = TensorrtBackend()
    options = backend.options_type.pick(options)
    batch_sizes, jobs = checked_jobs(root, manifest, backend, batch_sizes=batch_sizes, parts=parts,
                                     precision=precision, log=log)
    import_cmd = shlex.join(["dsc-export", "build", ".", "--backend", "tensorrt", "--import", "--batch-sizes",
                             ",".join(map(str, batch_sizes)), "--parts", parts, "--precision", precision])
    lines = ["#!/bin/sh", "# Build the TensorRT engines of this split dir on the machine that will run them",
             "# (engines are tied to its GPU and TensorRT version). Run from the split dir, then:",
             f"#   {import_cmd}", "set -e", shlex.join(["mkdir", "-p", f"{ENGINES_DIR}/tensorrt"])]
    commands, inputs = [], {}
    for job in jobs:
        if job.source not in inputs:
            inputs[job.source] = _onnx_input(root / job.source)
        name, dims = inputs[job.source]
        static = all(isinstance(d, int) and d > 0 for d in dims)
        if not static and any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            raise UserError(f"input '{name}' of {job.source} has dynamic dimensions other than the batch: {dims}")
        shapes = [[b] + list(dims[1:]) for b in job.batches]
        if not static:
            shape_spec(name, shapes[0])  # refuse a name trtexec cannot take before anything is written
        commands.append((job, None if static else name, shapes))
    converted: dict[str, str] = {}
    for job, name, shapes in commands:  # every name checked before any file is written
        onnx_path = job.source
        if precision == "fp16":
            if job.source not in converted:
                converted[job.source] = _fp16_copy(root, job.source)
            onnx_path = converted[job.source]
        lines.append(backend.trtexec_command(onnx_path, job.path, input_name=name, input_shapes=shapes,
                                             precision=precision, options=options,
                                             cache_path=f"{ENGINES_DIR}/tensorrt/{TIMING_CACHE}"))
    text = "\n".join(lines) + "\n"
    out_file = Path(out_file)
    write_json_atomic(out_file, text)
    out_file.chmod(0o755)
    return len(jobs)


def _onnx_input(path: Path) -> tuple[str, list]:
    """Name and shape (ints, symbolic dims as strings) of an ONNX file's one data input."""
    name, dims, _ = input_signature(load_model(path, load_data=False))[0]
    return name, dims


def _fp16_copy(root: Path, source: str) -> str:
    import onnx

    rel = f"{ENGINES_DIR}/tensorrt/onnx-fp16/{source.replace('/', '-')}"
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(root / source)
    model = to_float16_for_build(model, SampleInputs.random(model))
    onnx.save(model, os.fspath(dst), save_as_external_data=model.ByteSize() > 1_500_000_000,
              location=dst.name + ".data")
    return rel


def import_engines(split_dir: str | os.PathLike, backend_name: str, *, batch_sizes: list[int], parts: str = "all",
                   precision: str = "fp32", options: BackendOptions | BuildOptions | None = None,
                   log: Callable[[str], None] = lambda s: None) -> BuildReport:
    """Record engines built outside dsc-export (e.g. by the ``--emit-trtexec`` commands).

    Each expected engine file that exists is loaded once per batch size it serves (so a wrong or
    corrupt file, or one without the optimisation profile a batch size needs, is refused) and
    recorded with this machine's target; missing files are reported as failed.
    """
    root, manifest, backend, options, opts, jobs = prepare_build(split_dir, backend_name, parts, batch_sizes,
                                                                 precision, options, log)
    target = backend.target()
    report = BuildReport()
    for job in jobs:
        path = root / job.path
        if not path.is_file():
            report.failed.append((job, "not found"))
            continue
        for b in job.batches:
            with backend.load(path, profile=job.profile(backend, b)):
                pass
        sha = sha256_file(path)
        for b in job.batches:
            for sid, part in job.records:
                manifest.engines = [e for e in manifest.engines
                                    if engine_key(e) != (sid, part, backend.name, b, precision)]
                rec = Engine(split=sid, part=part, backend=backend.name, batch=b, precision=precision,
                             path=job.path, sha256=sha, target=dict(target), source=job.source,
                             source_sha256=manifest.files[job.source], options=dict(opts), seconds=None,
                             data=engine_data(root, job.path), profile=job.profile(backend, b))
                manifest.engines.append(rec)
                report.built.append(rec)
        log(f"imported {job.path}")
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return report
