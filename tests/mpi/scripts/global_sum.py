"""Run under a launcher: a model with a system-wide readout (``graph.global_sum``) and the whole
system's composition, split over the ranks (K parts per rank, argument; default 1), must equal the
single-process result (float64, 1e-10 relative) in both modes, with a grid, slab and METIS
partition, including a molecule with fewer atoms than parts (empty parts still meet at the
all-reduce). ``--bounded``: each rank evaluates its parts one at a time (bounded memory)."""

import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from distmlip.testing.models import GlobalReadoutToy

from support.splits import check_splits, report

RTOL = 1e-10


def structures():
    rng = np.random.default_rng(5)
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    salt.positions += rng.normal(0, 0.08, salt.positions.shape)
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    slab.pbc = [True, True, False]
    slab.positions += rng.normal(0, 0.05, slab.positions.shape)
    water = molecule("H2O")
    return {"salt": salt, "slab": slab, "water": Atoms(water.numbers, water.positions, pbc=False)}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    per_rank = int(args[0]) if args else 1
    bounded = "--bounded" in sys.argv
    model = GlobalReadoutToy(cutoff=4.0, seed=3, scale=4.0).double()
    result = check_splits(model, structures(), 2 * per_rank, ("grid", "slab", "metis"), RTOL,
                          keys=("energy", "forces", "energies"), stress=True, bounded=bounded)
    report(*result, "{checks} global-sum checks passed with " f"{2 * per_rank} parts"
           + (", one at a time" if bounded else ""))


if __name__ == "__main__":
    main()
