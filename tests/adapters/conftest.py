"""The adapter tests need their package: a file whose package does not import is skipped whole,
with the install hint (``support.optional``)."""

from __future__ import annotations

import pytest

from support.optional import skip_if_missing

REQUIRES = {
    "test_sevenn.py": ("sevenn", "pip install sevenn torch==2.13.0"),
    "test_chgnet.py": ("chgnet", "pip install distmlip[chgnet]"),
    "test_mace.py": ("mace.modules.models", "pip install distmlip[mace], then mace-torch --no-deps"),
    "test_nequip.py": ("nequip.model", "pip install distmlip[nequip]"),
    "test_matgl.py": ("matgl", "pip install distmlip[matgl]"),
    "test_orb.py": ("orb_models", "pip install distmlip[orb]"),
    "test_fairchem.py": ("fairchem.core", "pip install distmlip[fairchem]"),
    "test_mattersim.py": ("mattersim", "pip install distmlip[mattersim], then mattersim --no-deps"),
}


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    return skip_if_missing(module_path, parent, REQUIRES)
