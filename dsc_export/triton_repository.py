"""The Triton model repository of a server bundle: one model per split that a stock Triton
Inference Server serves unchanged (``bundle --server``, under ``triton/``).

Per platform (:data:`TRITON_MODEL_FILES`): ``onnxruntime_onnx`` (the tail's ONNX in the version
folder), ``tensorrt_plan`` (the ONNX and ``build-plans.sh``, the trtexec lines that build the
plans on the server's GPU), or Triton's Python backend (``python``): per split, ``<split>/1/``
holds

- ``model.py``: :mod:`dsc_export.serving.triton_python_model` (the run time inside Triton), copied
  as it is: a file this module ships, never runs;
- ``model.onnx``: the tail in its served form;
- ``model.b<N>.onnx``: each onnxruntime engine built for the tail (CPU, fp32: what
  ``dsc-export serve`` runs), given the same served form;
- for an offload codec form (``offload-jpeg95``...), in every repository whatever its backend
  (Triton's onnxruntime and TensorRT backends cannot decode an image): ``dsc_codecs.py``
  (:mod:`dsc_export.codecs`, copied as it is) and the parameter ``dsc_codec`` (JSON ``form``,
  ``layout``, ``shape``); the input is ``TYPE_STRING`` ``[1]``, one encoded image per sample;

which the ``tritonserver`` in PyTriton's wheel serves. Every ``config.pbtxt`` has the same
input, outputs, ``dsc_model_sha256`` parameter, dynamic batching and instance group.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsc_export import codecs
from dsc_export.artifacts import Manifest
from dsc_export.contract import (
    INPUT,
    MODEL_SHA256_PARAMETER,
    TRITON_TYPES,
    fixed_batch,
    mergeable,
    served_outputs,
    tail_contract,
)
from dsc_export.engines.runtime import PartRunner
from dsc_export.errors import lazy_import
from dsc_export.graph.model import load_model
from dsc_export.graph.surgery import serve_form
from dsc_export.graph.wire import check_symmetric
from dsc_export.offload import layout_of
from dsc_export.weight_store import save_linked

# Triton's Python backend runs this file (shipped as data: the pipeline does not import the run
# time)
PYTHON_MODEL_FILE = Path(__file__).parent / "serving" / "triton_python_model.py"


def write_triton_repository(root: Path, man: Manifest, *, repo: Path, platform: str = "onnxruntime_onnx",
                            max_batch_size: int = 64, instances: int = 1) -> list[str]:
    """One Triton model per split with a tail: ``repo/<split>/config.pbtxt`` and the model.

    ``repo`` must be inside ``root`` (a bundle's staging folder): the model's weights files are
    hard links to ``root``'s store (Triton model configuration: the model file sits in the version
    folder, and onnxruntime reads external data only below the model file's folder), so the
    repository adds graphs, not weights. What each platform writes is in :data:`TRITON_MODEL_FILES`.

    Each repository model is the tail with its input named ``input`` and its outputs as the
    output contract (:func:`dsc_export.contract.output_contract`) serves them: outputs
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
        serve_form(model, INPUT, contract)
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
        for c in tail_contract(contract, man, s):  # not what the head keeps (a cut at an output)
            if c.kind != "constant":
                config.output.add(name=c.wire_name, data_type=pb.DataType.Value(TRITON_TYPES[c.dtype]), dims=c.dims)
        if merge:
            config.dynamic_batching.max_queue_delay_microseconds = 2000
        group = pb.ModelInstanceGroup.KIND_GPU if kind == "tensorrt_plan" else pb.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(count=instances, kind=group)
        config.parameters[MODEL_SHA256_PARAMETER].string_value = man.model.sha256
        if kind == "python":  # model.py and the engines; their names go into the parameters
            write_python_model(root, man, s.id, d, config, lambda m: serve_form(m, INPUT, contract))
        if s.encodes:  # the codec beside model.py, and what it decodes
            write_codec(d / "1", config, s.wire, layout_of(man), man.model.input.shape[1:])
        (d / "config.pbtxt").write_text(text_format.MessageToString(config))
        names.append(s.id)
    if extra:
        (repo / "build-plans.sh").write_text("\n".join(
            ["#!/bin/sh", "# Build the TensorRT plans of this Triton repository on the server's GPU.", "set -e",
             'cd "$(dirname "$0")"'] + extra) + "\n")
    return names


def _onnxruntime_files(root: Path, man: Manifest, split, model, d: Path, in_dims, *, fixed,
                       max_batch_size) -> list[str]:
    """``onnxruntime_onnx``: the model in the version folder, served as it is."""
    save_linked(model, root, d / "1")
    return []


def _tensorrt_files(root: Path, man: Manifest, split, model, d: Path, in_dims, *, fixed, max_batch_size) -> list[str]:
    """``tensorrt_plan``: the ONNX beside the version folder and the trtexec lines (every
    argument quoted; :func:`dsc_export.backends.tensorrt.trtexec_line`, so a float32 plan is
    built without TF32 as ``build`` builds it) that build ``1/model.plan`` on the server's GPU:
    one optimisation profile from batch 1 to ``max_batch_size``, or the one batch size."""
    import shlex

    from dsc_export.backends.tensorrt import trtexec_line

    save_linked(model, root, d)
    sid = split.id
    per_sample = in_dims[1:]
    if fixed and in_dims[0] > 0:
        profiles = []  # fully static input: trtexec takes no shapes
    elif fixed:
        profiles = [([fixed] + per_sample,) * 3]
    else:
        profiles = [([1] + per_sample, [max(1, max_batch_size // 2)] + per_sample,
                     [max_batch_size] + per_sample)]
    # the repository's ONNX is the tail as it is (no conversion): its types decide, float32
    # without TF32
    line = trtexec_line(f"{sid}/model.onnx", f"{sid}/1/model.plan", precision="fp32",
                        input_name=INPUT if profiles else None, profiles=profiles, numbered=False)
    return [shlex.join(["mkdir", "-p", f"{sid}/1"]), line]  # a tar keeps no empty folder


# Triton platform -> what a model of the repository holds beside its config.pbtxt (a later
# backend, e.g. Triton's python backend, adds its writer here).
# python: model.onnx as onnxruntime_onnx has it; model.py and the engines: write_python_model
TRITON_MODEL_FILES = {"onnxruntime_onnx": _onnxruntime_files, "tensorrt_plan": _tensorrt_files,
                      "python": _onnxruntime_files}


def write_python_model(root: Path, man: Manifest, split: str, model_dir: Path, config,
                       serve_form: Callable[[Any], None]) -> list[str]:
    """Write ``model.py`` and the tail's engines (served form) into ``model_dir/1`` and name them in
    ``config``'s parameters ``dsc_engines`` and ``dsc_threads``.

    Args:
        root: the split dir.
        man: its manifest.
        split: the split id.
        model_dir: the repository's directory of this split's model.
        config: its ``ModelConfig`` message (``tritonclient.grpc.model_config_pb2``), changed in
            place before it is written.
        serve_form: gives a tail (an ``onnx.ModelProto``) its served form in place: input
            ``input``, outputs as the output contract serves them (:func:`dsc_export.graph.surgery.serve_form`).

    Returns:
        The engine files written, relative to ``model_dir/1``.
    """
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PYTHON_MODEL_FILE, version_dir / "model.py")
    engines = {}
    for batch, rec in sorted(PartRunner(root, man, split, "tail").records.items()):
        model = load_model(root / rec.path, load_data=False)  # the graph; its weights are linked
        serve_form(model)
        name = f"model.b{batch}.onnx"
        save_linked(model, (root / rec.path).parent, version_dir, name)
        engines[str(batch)] = {"file": name, "onnxruntime": rec.target.get("version", "")}
    config.parameters["dsc_engines"].string_value = json.dumps(engines, sort_keys=True)
    config.parameters["dsc_threads"].string_value = "0"
    return [e["file"] for e in engines.values()]


def write_codec(version_dir: Path, config, form: str, layout: str, shape) -> None:
    """Copy the codecs beside ``model.py`` (as ``dsc_codecs.py``: no package on the server) and
    say in ``config``'s parameter ``dsc_codec`` what to decode: ``{"form", "layout", "shape"}``."""
    shutil.copyfile(codecs.__file__, version_dir / "dsc_codecs.py")
    config.parameters["dsc_codec"].string_value = json.dumps(
        {"form": form, "layout": layout, "shape": [int(d) for d in shape]}, sort_keys=True)
