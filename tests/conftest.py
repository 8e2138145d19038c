"""Shared fixtures: the awkward structures and small float64 reference models (the helpers behind
them are in ``support``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from distmlip.models import LennardJones, SchNet
from distmlip.testing import awkward_structures

from support import STRUCTURE_NAMES, make_lj, make_schnet

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lj_model() -> LennardJones:
    return make_lj()


@pytest.fixture(scope="session")
def schnet_model() -> SchNet:
    return make_schnet()


@pytest.fixture
def structures():
    """Fresh copies of every awkward structure (tests may modify them)."""
    return awkward_structures()


@pytest.fixture(params=STRUCTURE_NAMES)
def structure(request):
    """(name, atoms) for each awkward structure."""
    return request.param, awkward_structures()[request.param]
