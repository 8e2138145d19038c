"""Molecular dynamics with one partition per process.

Launch the same script on every rank; each evaluates its own part of the system, and every rank
ends each step with the full, identical forces, so ASE's integrator stays in lock-step:

    .venv/bin/mpirun -n 2 .venv/bin/python examples/mpirun_md.py
    .venv/bin/torchrun --nproc-per-node 2 examples/mpirun_md.py
    # a node with 4 GPUs:  mpirun -n 4 python examples/mpirun_md.py --device cuda

On GPUs each rank takes the GPU of its local rank and communicates through NCCL; on CPU, gloo.
Only rank 0 prints and writes the trajectory.
"""

import argparse
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.io import Trajectory
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from distmlip import DistributedCalculator
from distmlip.models import SchNet


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="cubic FCC Cu repetitions (4 atoms each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (rank -> local GPU)")
    parser.add_argument("--mode", default="halo", choices=["halo", "extended"])
    parser.add_argument("--partitioner", default="grid", choices=["grid", "slab", "metis"])
    parser.add_argument("--trajectory", default=None, help="write frames here (rank 0 only)")
    args = parser.parse_args()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((args.reps,) * 3)
    # the same seed on every rank; positions are taken from rank 0 at every call anyway
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0)
    atoms.calc = DistributedCalculator(model, mode=args.mode, partitioner=args.partitioner,
                                       device=args.device)
    calc = atoms.calc
    rank = calc.rank  # 0 in one process
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{len(atoms)} atoms, {calc.num_parts} partition(s), backend {calc.backend}, {args.mode} mode")

    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    if args.trajectory and rank == 0:
        dyn.attach(Trajectory(args.trajectory, "w", atoms).write, interval=1)
    clock = [time.perf_counter()]

    def report():
        now = time.perf_counter()
        epot = atoms.get_potential_energy() / len(atoms)
        ekin = atoms.get_kinetic_energy() / len(atoms)
        say(f"step {dyn.nsteps:5d}  Etot {epot + ekin:12.6f} eV/atom  T {ekin / (1.5 * units.kB):7.1f} K"
            f"  {now - clock[0]:6.2f} s/step")
        clock[0] = now

    dyn.attach(report, interval=1)
    dyn.run(args.steps)


if __name__ == "__main__":
    main()
