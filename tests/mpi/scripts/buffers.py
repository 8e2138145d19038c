"""Run under a launcher (2 ranks): the point-to-point exchange and its send and receive buffers
are made once per build and reused. Two steps without a rebuild use the same buffers (data_ptr),
with two exchanges of the same width per layer (each call refills the buffers the one before
used), and both steps equal the single-process results (float64, 1e-10)."""

import sys

import numpy as np
from ase.build import bulk
from two_exchanges import TwoStreams

from distmlip import DistributedCalculator


def worst(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(got[k]) - want[k])) / max(np.max(np.abs(want[k])), 1.0))
               for k in want)


def results(atoms, calc) -> dict:
    work = atoms.copy()
    work.calc = calc
    return {"energy": work.get_potential_energy(), "forces": work.get_forces(),
            "stress": work.get_stress(), "energies": work.get_potential_energies()}


def main():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=2)
    moved = atoms.copy()
    moved.positions += np.random.default_rng(3).uniform(-0.05, 0.05, atoms.positions.shape)
    model = TwoStreams()
    calc = DistributedCalculator(model, skin=0.5)
    assert calc.backend == "torch"
    first = results(atoms, calc)
    (exchange,) = calc.runner._built.on_device[("exchanges", True)]
    pointers = {key: buf.data_ptr() for key, buf in exchange.buffers.items()}
    second = results(moved, calc)
    (again,) = calc.runner._built.on_device[("exchanges", True)]
    same = again is exchange and calc.runner.graph_builds == 1 and pointers and \
        {key: buf.data_ptr() for key, buf in again.buffers.items()} == pointers
    kinds = sorted({key[0] for key in pointers})
    err = max(worst(first, results(atoms, DistributedCalculator(model, backend="local"))),
              worst(second, results(moved, DistributedCalculator(model, backend="local"))))
    rank = calc.rank
    print(f"rank {rank}: {len(pointers)} buffers {kinds}, same buffers {bool(same)}, "
          f"{calc.runner.last_exchange_calls} exchanges, worst relative error {err:.2e}", flush=True)
    sys.exit(0 if same and err <= 1e-10 and calc.runner.last_exchange_calls == 4 else 1)


if __name__ == "__main__":
    main()
