"""Run under a launcher: every combination of model x structure x mode x partitioner evaluated with
K parts per rank (argument; default 1) must equal the single-process result (float64, 1e-10
relative)."""

import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from distmlip import DistributedCalculator
from distmlip.models import LennardJones, SchNet

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


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(float(np.max(np.abs(b))), 1.0)


def main():
    per_rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    bounded = "--bounded" in sys.argv  # parts evaluated one at a time on each rank
    failures, checks, rank, parts = [], 0, None, None
    for mname, model in models().items():
        for sname, atoms in structures().items():
            ref = atoms.copy()
            ref.calc = DistributedCalculator(model, backend="local")
            want = {k: ref.calc.get_property(k, ref) for k in ("energy", "forces", "energies")}
            if atoms.cell.rank == 3:
                want["stress"] = ref.get_stress()
            for mode in ("halo", "extended"):
                for partitioner in ("slab", "grid", "metis"):
                    test = atoms.copy()
                    test.calc = DistributedCalculator(model, mode=mode, partitioner=partitioner)
                    assert test.calc.backend == "torch", test.calc.backend
                    rank, world = test.calc.rank, test.calc.world_size
                    parts = per_rank * world
                    test.calc = DistributedCalculator(model, num_parts=parts, mode=mode,
                                                      partitioner=partitioner)
                    if bounded:  # the path a tight max_memory takes, with these parts
                        from distmlip.runtime import Runner

                        c = test.calc
                        c.runner = Runner(model, [c.distributed], c.dtype, partitioner, mode, parts,
                                          c.skin, comm="torch", sequential=True)
                    for key, value in want.items():
                        got = test.calc.get_property(key, test)
                        checks += 1
                        err = rel(got, value)
                        if not err <= RTOL:
                            failures.append(f"{mname}/{sname}/{mode}/{partitioner}/{key}: {err:.3e}")
    if failures:
        print(f"rank {rank}: {len(failures)} mismatches:\n" + "\n".join(failures), flush=True)
        sys.exit(1)
    suffix = f" with {parts} parts" if per_rank > 1 else ""
    suffix += ", one at a time" if bounded else ""
    print(f"rank {rank}: {checks} checks passed{suffix}", flush=True)


if __name__ == "__main__":
    main()
