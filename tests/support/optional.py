"""Test files that need an optional package: skipped whole, with the reason, when the package does
not import (used by the ``pytest_pycollect_makemodule`` hooks of the folders' ``conftest.py``).
The test file itself then imports the package like any other (no ``pytest.importorskip`` before
its imports)."""

from __future__ import annotations

import importlib
from functools import cache

import pytest


class MissingPackage(pytest.File):
    """A test file whose package is missing: one skip, with the install hint, instead of its tests."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason)


@cache
def import_error(module: str) -> str | None:
    """Why ``module`` does not import (``None``: it does)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def skip_if_missing(module_path, parent, requires: dict[str, tuple[str, str]]):
    """For ``pytest_pycollect_makemodule``: ``requires`` maps a file name to (module, install hint);
    returns a ``MissingPackage`` collector if that module does not import, else ``None`` (pytest
    then collects the file as usual)."""
    need = requires.get(module_path.name)
    if need is None:
        return None
    module, hint = need
    error = import_error(module)
    if error is None:
        return None
    collector = MissingPackage.from_parent(parent, path=module_path)
    collector.reason = f"{module_path.name}: {module} is not installed ({hint}): {error}"
    return collector
