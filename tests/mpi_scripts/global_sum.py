"""Run under a launcher: a model with a system-wide readout (``graph.global_sum``) and the whole
system's composition, split over the ranks (K parts per rank, argument; default 1), must equal the
single-process result (float64, 1e-10 relative) in both modes, with a grid, slab and METIS
partition, including a molecule with fewer atoms than parts (empty parts still meet at the
all-reduce)."""

import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from distmlip import DistributedCalculator
from distmlip.testing.models import GlobalReadoutToy

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


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(float(np.max(np.abs(b))), 1.0)


def main():
    per_rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    model = GlobalReadoutToy(cutoff=4.0, seed=3, scale=4.0).double()
    failures, checks, rank = [], 0, None
    for sname, atoms in structures().items():
        ref = atoms.copy()
        ref.calc = DistributedCalculator(model, backend="local")
        want = {k: ref.calc.get_property(k, ref) for k in ("energy", "forces", "energies")}
        if atoms.cell.rank == 3:
            want["stress"] = ref.get_stress()
        for mode in ("halo", "extended"):
            for partitioner in ("grid", "slab", "metis"):
                test = atoms.copy()
                test.calc = DistributedCalculator(model, num_partitions=2 * per_rank, mode=mode,
                                                  partitioner=partitioner)
                assert test.calc.backend == "torch", test.calc.backend
                rank = test.calc.runner.rank
                for key, value in want.items():
                    checks += 1
                    err = rel(test.calc.get_property(key, test), value)
                    if not err <= RTOL:
                        failures.append(f"{sname}/{mode}/{partitioner}/{key}: {err:.3e}")
    if failures:
        print(f"rank {rank}: {len(failures)} mismatches:\n" + "\n".join(failures), flush=True)
        sys.exit(1)
    print(f"rank {rank}: {checks} global-sum checks passed with {2 * per_rank} parts", flush=True)


if __name__ == "__main__":
    main()
