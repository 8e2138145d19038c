"""Shared by the MPI scripts: a model split over the ranks against the same model in one process."""

import sys

import numpy as np

from distmlip import DistributedCalculator


def rel(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (at least 1)."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(float(np.max(np.abs(b))), 1.0)


def check_splits(model, structures: dict, num_parts: int, partitioners, rtol: float,
                 keys=("energy", "forces"), stress: bool = False, bounded: bool = False):
    """Every structure x mode x partitioner, split over the launch into ``num_parts`` parts,
    against a single-process (``backend="local"``) evaluation. ``bounded``: each rank evaluates
    its parts one at a time (the path a tight ``max_memory`` takes). Returns (failures, checks,
    rank)."""
    failures, checks, rank = [], 0, None
    for sname, atoms in structures.items():
        ref = atoms.copy()
        ref.calc = DistributedCalculator(model, backend="local")
        want = {k: ref.calc.get_property(k, ref) for k in keys}
        if stress and atoms.cell.rank == 3:
            want["stress"] = ref.get_stress()
        for mode in ("halo", "extended"):
            for partitioner in partitioners:
                test = atoms.copy()
                test.calc = DistributedCalculator(model, num_parts=num_parts, mode=mode,
                                                  partitioner=partitioner)
                assert test.calc.backend == "torch", test.calc.backend
                if bounded:
                    from distmlip.runtime import Runner

                    c = test.calc
                    c.runner = Runner(model, [c.distributed], c.dtype, partitioner, mode,
                                      num_parts, c.skin, comm="torch", sequential=True)
                rank = test.calc.rank
                for key, value in want.items():
                    checks += 1
                    err = rel(test.calc.get_property(key, test), value)
                    if not err <= rtol:
                        failures.append(f"{sname}/{mode}/{partitioner}/{key}: {err:.3e}")
    return failures, checks, rank


def report(failures, checks: int, rank, passed: str) -> None:
    """Print the mismatches and exit 1, or print ``rank R: `` and ``passed`` with ``{checks}``
    filled in."""
    if failures:
        print(f"rank {rank}: {len(failures)} mismatches:\n" + "\n".join(failures), flush=True)
        sys.exit(1)
    print(f"rank {rank}: " + passed.format(checks=checks), flush=True)
