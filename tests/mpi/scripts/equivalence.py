"""Run under a launcher: every combination of model x structure x mode x partitioner evaluated with
K parts per rank (argument; default 1) must equal the single-process result (float64, 1e-10
relative)."""

import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from distmlip import DistributedCalculator
from distmlip.models import LennardJones, SchNet

from support.splits import check_splits, report

RTOL = 1e-10


def structures():
    rng = np.random.default_rng(3)
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    crystal.positions += rng.normal(0, 0.05, crystal.positions.shape)
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=6.0)
    slab.pbc = [True, True, False]
    slab.positions += rng.normal(0, 0.05, slab.positions.shape)
    mol = molecule("C6H6")
    mol.positions += rng.normal(0, 0.05, mol.positions.shape)
    mol = Atoms(mol.numbers, mol.positions, pbc=False)
    return {"bulk": crystal, "slab": slab, "molecule": mol}


def models():
    return {
        "lj": LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0),
        "schnet": SchNet(cutoff=4.5, num_interactions=3, hidden_channels=16, seed=1),
    }


def main():
    per_rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    bounded = "--bounded" in sys.argv  # parts evaluated one at a time on each rank
    parts = per_rank * DistributedCalculator(models()["lj"]).world_size
    failures, checks, rank = [], 0, None
    for mname, model in models().items():
        failed, done, rank = check_splits(model, structures(), parts, ("slab", "grid", "metis"),
                                          RTOL, keys=("energy", "forces", "energies"),
                                          stress=True, bounded=bounded)
        failures += [f"{mname}/{f}" for f in failed]
        checks += done
    suffix = f" with {parts} parts" if per_rank > 1 else ""
    suffix += ", one at a time" if bounded else ""
    report(failures, checks, rank, "{checks} checks passed" + suffix)


if __name__ == "__main__":
    main()
