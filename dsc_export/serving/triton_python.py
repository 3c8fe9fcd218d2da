"""The Python-backend form of a server bundle's Triton repository (``bundle --server
--triton-backend python``), which the ``tritonserver`` in PyTriton's wheel serves.

Per split, beside the ``config.pbtxt`` that :func:`dsc_export.bundle.write_triton_repository`
writes for every backend (same input, outputs, ``dsc_model_sha256`` parameter, dynamic batching
and instance group; ``backend: "python"``, ``KIND_CPU``), ``<split>/1/`` holds:

- ``model.py``: :mod:`dsc_export.serving.triton_python_model`, copied as it is;
- ``model.onnx``: the tail in its served form (written by ``write_triton_repository``);
- ``model.b<N>.onnx``: each onnxruntime engine built for the tail (CPU, fp32: what
  ``dsc-export serve`` runs), given the same served form;
- for an offload codec form (``offload-jpeg95``...), in every repository whatever its backend
  (Triton's onnxruntime and TensorRT backends cannot decode an image): ``dsc_codecs.py``
  (:mod:`dsc_export.codecs`, copied as it is) and the parameter ``dsc_codec`` (JSON ``form``,
  ``layout``, ``shape``); the input is ``TYPE_STRING`` ``[1]``, one encoded image per sample.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsc_export import codecs
from dsc_export.artifacts import Manifest
from dsc_export.engines import PartRunner
from dsc_export.graph.model import load_model
from dsc_export.serving import triton_python_model
from dsc_export.weight_store import save_linked


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
            ``input``, outputs as the output contract serves them (``bundle._serve_form``).

    Returns:
        The engine files written, relative to ``model_dir/1``.
    """


    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(triton_python_model.__file__, version_dir / "model.py")
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
