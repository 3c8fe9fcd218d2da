"""User-facing errors and lazy optional imports.

A :class:`UserError` is a problem with what the user asked for or gave us (a bad file, an
unknown model, a missing optional extra). The CLI prints its message as one line and exits
non-zero; it never shows a traceback for one.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """An error the user can fix; its message is one line that says what and how."""


class VerificationError(UserError):
    """A split whose head+tail does not reproduce the whole model."""


class BackendError(UserError):
    """A backend cannot be used here, or cannot build, load or run an engine.

    The message is one line naming the file and the backend's own reason. Subclasses say which
    step failed, so a caller can tell a build to retry from an engine to rebuild.
    """


class BackendUnavailable(BackendError):
    """The backend's modules, driver or device are missing here (the message names the extra)."""


class BuildError(BackendError):
    """Building an engine failed: the parser, a profile, or the builder refused the model."""


class EngineLoadError(BackendError):
    """A built engine cannot be loaded or prepared to run here (version, device, memory)."""


class InferenceError(BackendError):
    """Running a loaded engine failed, or it was given inputs of the wrong shape or dtype, or the
    runner was used outside its ``with`` block."""


class ModelRunError(UserError):
    """onnxruntime failed while running a model: where (node, op) and at which batch size.

    Attributes:
        batch: the batch size it ran at.
        node: the failing node's name ('' when onnxruntime did not say).
        op: its op type ('' when unknown).
        reason: onnxruntime's status message, first line.
    """

    def __init__(self, what: str, batch: int, exc: BaseException):
        import re

        text = " ".join(str(exc).split())
        m = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
        self.op, self.node = (m.group(1), m.group(2)) if m else ("", "")
        status = text.split("Status Message:", 1)[-1].strip()
        status = re.sub(r"^\S*/onnxruntime_src/\S+ ", "", status)  # drop the C++ source location
        status = re.sub(r"^\S+::\S+\(.*?\)\s+", "", status)  # ... and function
        status = status.split(" was false. ", 1)[-1]  # ... and the failed assertion's text
        self.batch, self.reason = batch, status[:300]
        where = (f" in {self.op} node '{self.node}'" if self.node else f" in an unnamed {self.op} node") if m else ""
        super().__init__(f"onnxruntime fails to run {what} at batch {batch}{where}: {self.reason}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty):
    third-party errors (onnxruntime, onnx, torch) span many lines, ours are one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def lazy_import(module: str, extra: str) -> ModuleType:
    """Import an optional heavy dependency, or raise a one-line :class:`UserError`.

    Args:
        module: dotted module name, e.g. ``"torch"``.
        extra: the ``dsc-export`` extra that installs it, e.g. ``"export"``.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"{module} is not installed ({exc}); install the '{extra}' extra: "
            f"pip install 'dsc-export[{extra}]'"
        ) from exc
