"""The interface every backend implements, shaped after Polygraphy's loaders and runners.

A :class:`Backend` builds an engine file from an ONNX file for one batch size and precision
(the loader side) and loads an engine into a :class:`Runner` (the runner side). A runner has the
small life cycle ``activate`` / ``infer`` / ``deactivate`` and is used as a context manager;
subclasses override only the ``*_impl`` methods. Optional heavy modules (tensorrt, cuda) are
imported inside the backend that needs them.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from dsc_export.errors import BackendUnavailable, EngineLoadError, InferenceError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (batch fixed) and numpy dtype of an engine input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    """The build options of one backend: those that change what its engine is (recorded with
    the engine; a change means a rebuild). Each backend subclasses it with its own fields
    (:attr:`Backend.options_type`); this one has none."""

    def recorded(self) -> dict[str, Any]:
        """The options as the manifest records them with an engine (``Engine.options``)."""
        return asdict(self)

    @classmethod
    def pick(cls, given: BackendOptions | BuildOptions | None) -> BackendOptions:
        """These options from ``given``: itself when it is one, the fields of this class that
        ``given`` has (a :class:`BuildOptions` of every backend's settings), or the defaults."""
        if isinstance(given, cls):
            return given
        if given is None:
            return cls()
        return cls(**{f.name: getattr(given, f.name) for f in fields(cls)
                      if hasattr(given, f.name)})


@dataclass(kw_only=True)
class BuildOptions:
    """Every backend's build settings as ``dsc-export build`` takes them; each backend picks
    its own (:meth:`for_backend`).

    Attributes:
        workspace_mb: TensorRT workspace limit.
        version_compatible: TensorRT: engines that run on later TensorRT versions (lean runtime).
        hardware_compatible: TensorRT: engines that run on every Ampere or newer GPU.
        optimization: onnxruntime graph optimisation level baked into the engine.
    """

    workspace_mb: int = 4096
    version_compatible: bool = False
    hardware_compatible: bool = False
    optimization: str = "all"

    def for_backend(self, backend: Backend) -> BackendOptions:
        """The options that change an engine of ``backend`` (its :attr:`Backend.options_type`)."""
        return backend.options_type.pick(self)


@dataclass
class Runner:
    """A loaded engine that runs on numpy arrays; use it as a context manager.

    Subclasses implement ``activate_impl``, ``infer_impl`` and ``deactivate_impl``, and set
    ``inputs`` and ``outputs`` when activated.
    """

    path: str
    threads: int | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    active: bool = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the engine (``activate_impl``) unless active already.

        Raises:
            EngineLoadError: the backend cannot load it.
        """
        if not self.active:
            self.activate_impl()
            self.active = True

    def deactivate(self) -> None:
        """Release the engine (``deactivate_impl``) if active."""
        if self.active:
            self.deactivate_impl()
            self.active = False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on host arrays; returns every output by name.

        Raises:
            InferenceError: the runner is not active, or the backend fails to run it.
        """
        if not self.active:
            raise InferenceError(f"the runner of '{self.path}' is not active; use it in a 'with' block")
        return self.infer_impl(feeds)

    def time_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """One timed run in milliseconds: the engine's execution only, inputs already staged.

        The default stages nothing and times ``infer`` with the wall clock; device backends
        override it with device events around the execution.
        """
        t0 = time.perf_counter()
        self.infer(feeds)
        return (time.perf_counter() - t0) * 1e3

    def activate_impl(self) -> None:
        """Load the engine and set ``inputs`` and ``outputs``; each backend implements it."""
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the active engine on host arrays, by input name; returns every output by name."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Release what ``activate_impl`` acquired; the default has nothing to release."""
        pass


class Backend:
    """Builds and loads engines. Subclasses set ``name`` and ``suffix`` and implement the methods."""

    name = ""
    suffix = ""
    extra = ""  # the dsc-export extra that installs the backend's modules
    runs_onnx = False  # load_onnx works: build can time an engine against its ONNX
    # One engine serves several batch sizes, one optimisation profile each (TensorRT): ``build``
    # takes the list of batch sizes and ``load`` the profile to run.
    profiles = False
    options_type: type[BackendOptions] = BackendOptions  # the build options it takes

    def available(self) -> str | None:
        """None when the backend can be used here, else a one-line reason."""
        return None

    def check(self) -> None:
        """Raise a one-line :class:`UserError` when the backend cannot be used here."""
        why = self.available()
        if why:
            raise BackendUnavailable(why)

    def target(self) -> dict[str, Any]:
        """What engines built now are tied to: backend version, device name, compute capability."""
        raise NotImplementedError

    def compatible(self, target: dict[str, Any], options: dict[str, Any]) -> str | None:
        """None when an engine built for ``target`` with ``options`` runs here, else what differs."""
        return None

    def build(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, batch: int | list[int],
              precision: str, options: BackendOptions | BuildOptions,
              cache_dir: str | os.PathLike | None = None,
              log=lambda s: None) -> None:
        """Build the engine for ``onnx_path`` at a fixed ``batch`` and write it to ``engine_path``.

        Args:
            onnx_path: head, tail or whole model (batch dimension dynamic or equal to ``batch``).
            engine_path: the file to write (written whole or not at all).
            batch: the batch size the engine is optimised for; for a backend with ``profiles``, a
                list of batch sizes, one optimisation profile each (profile ``k``: ``batch[k]``).
            precision: ``fp32`` or ``fp16`` (``fp16``: converted with
                :func:`dsc_export.graph.precision.to_float16_for_build` before the build).
            options: build options (its :attr:`options_type`, or a :class:`BuildOptions` it
                picks them from).
            cache_dir: where a backend keeps state shared by the builds of one model
                (TensorRT's timing cache).
            log: receives notes (fp16: which nodes keep float32, and why).
        """
        raise NotImplementedError

    def load(self, engine_path: str | os.PathLike, threads: int | None = None, *,
             profile: int | None = None) -> Runner:
        """A runner for a built engine (not yet active); ``profile``: the optimisation profile it
        runs (a backend with ``profiles``; None for a batch-fixed engine)."""
        raise NotImplementedError

    def load_onnx(self, onnx_path: str | os.PathLike, threads: int | None = None) -> Runner:
        """A runner for an ONNX file as it is (no build step), where the backend can do that.

        Raises:
            EngineLoadError: the backend runs built engines only (the default).
        """
        raise EngineLoadError(f"the {self.name} backend runs built engines only")
