"""test_property needs hypothesis (the `test` extra): skipped whole, with the hint, without it."""

from __future__ import annotations

import pytest

from support.optional import skip_if_missing

REQUIRES = {"test_property.py": ("hypothesis", "pip install -e '.[test]'")}


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    return skip_if_missing(module_path, parent, REQUIRES)
