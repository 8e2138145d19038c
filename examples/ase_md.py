"""ASE molecular dynamics with the distributed calculator: Langevin NVT of Cu, 4 parts.

    OMP_NUM_THREADS=1 python examples/ase_md.py                  # 2,048 atoms, 50 steps
    OMP_NUM_THREADS=1 python examples/ase_md.py --reps 3 --steps 5

Any ASE dynamics works unchanged: the calculator is an ordinary ``ase.calculators.Calculator``.
The model is a small SchNet with random weights (swap in ``distmlip.load("sevennet-0")`` for a
pretrained potential); graph and partition are kept between steps while atoms stay within the skin.
"""

import argparse
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from distmlip import DistributedCalculator
from distmlip.models import SchNet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8, help="cubic FCC Cu repetitions (4 atoms each)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--parts", type=int, default=4)
    args = parser.parse_args(argv)

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((args.reps,) * 3)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    model = SchNet(cutoff=5.0, num_interactions=2, hidden_channels=16, seed=0)
    atoms.calc = DistributedCalculator(model, num_parts=args.parts)
    dyn = Langevin(atoms, timestep=2 * units.fs, temperature_K=300, friction=0.01, fixcm=False,
                   rng=np.random.default_rng(1))
    start = time.perf_counter()

    def report():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        print(f"step {dyn.nsteps:5d}  Epot {epot / len(atoms):.5f}  Etot {(epot + ekin) / len(atoms):.5f} "
              f"eV/atom  T {atoms.get_temperature():6.1f} K  ({time.perf_counter() - start:.1f} s)")

    dyn.attach(report, interval=max(1, args.steps // 5))
    dyn.run(args.steps)
    print(f"{len(atoms)} atoms, {args.parts} parts, {args.steps} steps, "
          f"graph builds {atoms.calc.graph_builds}")
    return atoms


if __name__ == "__main__":
    main()
