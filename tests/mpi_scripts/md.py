"""Run under a launcher: 50 steps of VelocityVerlet with one part per rank; rank 0 then runs the
same MD in one process and compares the trajectories step by step."""

import sys

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from distmlip import DistributedCalculator
from distmlip.models import SchNet

STEPS = 50


def run(backend):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(0))
    model = SchNet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    atoms.calc = DistributedCalculator(model, backend=backend)
    frames = []
    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    dyn.attach(lambda: frames.append((atoms.positions.copy(), atoms.get_potential_energy())), interval=1)
    dyn.run(STEPS)
    return atoms.calc, frames


def main():
    calc, frames = run("auto")
    assert calc.backend == "torch"
    rank = calc.runner.rank
    if rank != 0:
        return
    _, reference = run("local")
    worst_x = max(np.abs(a[0] - b[0]).max() for a, b in zip(frames, reference))
    worst_e = max(abs(a[1] - b[1]) for a, b in zip(frames, reference))
    print(f"steps {len(frames)} worst |dx| {worst_x:.3e} A, worst |dE| {worst_e:.3e} eV", flush=True)
    if len(frames) != len(reference) or worst_x > 1e-9 or worst_e > 1e-9:
        sys.exit(1)


if __name__ == "__main__":
    main()
