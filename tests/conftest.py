"""Shared fixtures: the awkward structures and small float64 reference models."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from distmlip.models import LennardJones, SchNet
from distmlip.testing import awkward_structures

torch.set_num_threads(1)

STRUCTURE_NAMES = tuple(awkward_structures())

# Lennard-Jones roughly fitted to Cu: minimum at 2^(1/6) * 2.3 = 2.58 Å (Cu-Cu: 2.55 Å).
LJ_PARAMS = {"epsilon": 0.4, "sigma": 2.3, "cutoff": 5.0}


def make_lj() -> LennardJones:
    return LennardJones(**LJ_PARAMS)


def make_schnet(cutoff: float = 5.0, num_interactions: int = 3, hidden_channels: int = 16,
                seed: int = 1, scale: float = 30.0) -> SchNet:
    """A small float64 SchNet with random weights. Its last readout layer is multiplied by
    ``scale`` (and its bias zeroed) so that forces are 0.1-1 eV/Å rather than ~0.005 eV/Å: the
    relative error max|a-b| / max(max|ref|, 1) then measures the forces at their own scale."""
    model = SchNet(cutoff=cutoff, num_interactions=num_interactions,
                   hidden_channels=hidden_channels, num_gaussians=25, seed=seed)
    with torch.no_grad():
        model.readout[-1].weight.mul_(scale)
        model.readout[-1].bias.zero_()
    return model


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


def assert_ranks_pass(script: str, *args: str, expect: str, ranks: int = 2) -> None:
    """Run ``tests/mpi_scripts/<script> *args`` under ``mpirun -n ranks`` and check that it
    exited 0 and that every rank printed ``rank R: <expect>`` (its count of passed checks); the
    output's tail is the failure message."""
    from test_mpi import launch

    proc, _ = launch("mpirun", ranks, script, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(ranks):
        assert f"rank {rank}: {expect}" in out, out[-4000:]
