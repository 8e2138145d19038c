"""Run under a launcher: an adapter's model (argument: ``matgl``, ...) split over the ranks equals
the single-process result (float64, 1e-10 relative) on the adapter structures, both modes, grid
and METIS partitions."""

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests directory

from distmlip import DistributedCalculator, wrap  # noqa: E402
from distmlip.testing.adapters import adapter_structures  # noqa: E402

RTOL = 1e-10


def make(name):
    if name == "matgl":
        from test_matgl import make_potential

        return wrap(make_potential().double())
    if name == "matgl-m3gnet":
        from test_matgl import make_potential

        return wrap(make_potential(arch="M3GNet").double())
    if name == "mattersim":
        from test_mattersim import make_potential as make_mattersim

        return wrap(make_mattersim()).double()
    if name == "fairchem":
        from test_fairchem import make_uma

        return wrap(make_uma().double(), task="omat")
    if name == "orb":
        from test_orb import make_orb

        return wrap(make_orb().double())
    raise SystemExit(f"unknown adapter {name!r}")


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(float(np.max(np.abs(b))), 1.0)


def main():
    warnings.simplefilter("ignore")
    name = sys.argv[1]
    model = make(name)
    structures = adapter_structures()
    failures, checks, rank = [], 0, None
    for sname in ("oxide", "slab", "molecule"):
        atoms = structures[sname]
        ref = atoms.copy()
        ref.calc = DistributedCalculator(model, backend="local")
        want = {k: ref.calc.get_property(k, ref) for k in ("energy", "forces")}
        for mode in ("halo", "extended"):
            for partitioner in ("grid", "metis"):
                test = atoms.copy()
                test.calc = DistributedCalculator(model, num_partitions=2, mode=mode,
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
    print(f"rank {rank}: {name} {checks} checks passed", flush=True)


if __name__ == "__main__":
    main()
