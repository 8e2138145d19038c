"""Run under a launcher: SchNet's layer protocol in bounded memory across ranks. K parts per rank
(argument; default 2) evaluated one at a time, halo mode: the steps path (counted: no replay of
forward) equals the single-process result (float64, 1e-10 relative), and so does the generic
replay (``runner.layer_steps = False``); a broken step is refused on every rank."""

import sys

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from distmlip import DistributedCalculator
from distmlip.models import SchNet
from distmlip.runtime import Runner

from support import CALLS, CountedSchNet

RTOL = 1e-10


class Broken(SchNet):
    def step(self, i, graph, state):
        if i == 1:
            state = (state[0] + 1e-3,)
        return super().step(i, graph, state)


def structures():
    rng = np.random.default_rng(3)
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    crystal.positions += rng.normal(0, 0.05, crystal.positions.shape)
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=6.0)
    slab.pbc = [True, True, False]
    slab.positions += rng.normal(0, 0.05, slab.positions.shape)
    mol = molecule("C6H6")
    mol.positions += rng.normal(0, 0.05, mol.positions.shape)
    return {"bulk": crystal, "slab": slab, "molecule": Atoms(mol.numbers, mol.positions, pbc=False)}


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / max(float(np.max(np.abs(b))), 1.0)


def bounded(model, parts, partitioner, steps):
    calc = DistributedCalculator(model, num_parts=parts, mode="halo", partitioner=partitioner)
    calc.runner = Runner(model, [calc.distributed], calc.dtype, partitioner, "halo", parts, calc.skin,
                         comm="torch", sequential=True)
    calc.runner.layer_steps = steps
    return calc


def main():
    per_rank = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    model = CountedSchNet(cutoff=4.5, num_interactions=3, hidden_channels=16, seed=1)
    failures, checks, rank = [], 0, None
    for sname, atoms in structures().items():
        ref = atoms.copy()
        ref.calc = DistributedCalculator(model, backend="local")
        want = {k: ref.calc.get_property(k, ref) for k in ("energy", "forces", "energies")}
        if atoms.cell.rank == 3:
            want["stress"] = ref.get_stress()
        for partitioner in ("slab", "grid", "metis"):
            probe = DistributedCalculator(model, partitioner=partitioner)
            rank, world = probe.rank, probe.world_size
            for steps in (True, False):
                test = atoms.copy()
                test.calc = bounded(model, per_rank * world, partitioner, steps)
                CALLS.clear()
                for key, value in want.items():
                    err = rel(test.calc.get_property(key, test), value)
                    checks += 1
                    if not err <= RTOL:
                        failures.append(f"{sname}/{partitioner}/steps={steps}/{key}: {err:.3e}")
                taken = CALLS["forward"] <= 1 and CALLS["step"] > 0 if steps else CALLS["step"] == 0
                checks += 1
                if not taken:
                    failures.append(f"{sname}/{partitioner}/steps={steps}: calls {CALLS}")
    test = structures()["bulk"]
    try:  # refused when the calculator is built (a probe crystal), on every rank
        test.calc = bounded(Broken(cutoff=4.5, num_interactions=3, hidden_channels=16, seed=1),
                            per_rank * world, "grid", True)
        failures.append("broken step not refused")
    except ValueError as exc:
        if "do not compose to its forward" not in str(exc):
            failures.append(f"broken step: {exc}")
    checks += 1
    if failures:
        print(f"rank {rank}: {len(failures)} mismatches:\n" + "\n".join(failures), flush=True)
        sys.exit(1)
    print(f"rank {rank}: {checks} layer-protocol checks passed with {per_rank * world} parts, one at "
          f"a time", flush=True)


if __name__ == "__main__":
    main()
