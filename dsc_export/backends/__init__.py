"""Backends: one interface (:mod:`dsc_export.backends.base`), a registry by name.

``onnxruntime`` (CPU, the embedded default), ``onnxruntime-cuda`` and ``onnxruntime-tensorrt``
(execution providers of onnxruntime-gpu) and ``tensorrt`` (native engines). A backend module is
imported only when its name is asked for.
"""

from __future__ import annotations

from dsc_export.backends.base import Backend, BuildOptions, Runner, TensorSpec
from dsc_export.errors import UserError

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")

__all__ = ["BACKENDS", "Backend", "BuildOptions", "Runner", "TensorSpec", "get_backend"]


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (its optional modules are not imported yet).

    Raises:
        UserError: ``name`` is not a known backend.
    """
    if name.startswith("onnxruntime") and name in BACKENDS:
        from dsc_export.backends.onnxruntime import OnnxruntimeBackend

        return OnnxruntimeBackend(name)
    if name == "tensorrt":
        from dsc_export.backends.tensorrt import TensorrtBackend

        return TensorrtBackend()
    raise UserError(f"unknown backend '{name}'; known: {', '.join(BACKENDS)}")
