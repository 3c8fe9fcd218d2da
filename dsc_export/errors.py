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
