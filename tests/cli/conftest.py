"""Fixtures of the command-line tests."""

from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
from ase.build import bulk


@pytest.fixture
def cu(tmp_path) -> Path:
    """A rattled 32-atom Cu cell as extxyz."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    path = tmp_path / "cu.xyz"
    ase.io.write(path, atoms)
    return path
