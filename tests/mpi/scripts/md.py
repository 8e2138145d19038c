"""Run under a launcher: 50 steps of VelocityVerlet with two parts per rank and graph reuse (the
default skin), then the cell strained twice (NPT-like: an expansion the graph survives, then a
compression beyond the bound of ``Runner._stale``, which rebuilds); rank 0 then runs the same in one
process with a fresh graph every step (skin=0; a new calculator for each strained cell) and compares
the trajectories step by step."""

import sys

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from distmlip import DistributedCalculator
from distmlip.models import SchNet

STEPS = 50


def run(backend, fresh=False, **options):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    thermalize_momenta(atoms, temperature_K=1500, rng=np.random.default_rng(0))
    model = SchNet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    atoms.calc = calc = DistributedCalculator(model, backend=backend, **options)
    frames = []
    dyn = VelocityVerlet(atoms, timestep=4 * units.fs)
    dyn.attach(lambda: frames.append((atoms.positions.copy(), atoms.get_potential_energy())), interval=1)
    dyn.run(STEPS)
    builds = atoms.calc.graph_builds
    for strain in (1.01, [1.0, 0.85, 1.0]):  # kept (an expansion), then rebuilt (compressed 15 %)
        atoms.set_cell(atoms.cell.array * np.asarray(strain)[..., None], scale_atoms=True)
        if fresh:
            atoms.calc = DistributedCalculator(model, backend=backend, **options)
        frames.append((atoms.positions.copy(), atoms.get_potential_energy()))
    return calc, frames, builds


def main():
    from distmlip.runtime.launch import detect_launch

    world = detect_launch().world_size
    calc, frames, builds = run("auto", num_parts=2 * world)
    assert calc.backend == "torch"
    rank = calc.rank
    print(f"rank {rank}: builds {builds} then {calc.graph_builds}", flush=True)
    if not 1 < builds < STEPS or calc.graph_builds != builds + 1:
        sys.exit(f"rank {rank}: expected several rebuilds in {STEPS} steps and one for the two cells, "
                 f"got {builds} then {calc.graph_builds}")
    if rank != 0:
        return
    _, reference, _ = run("local", fresh=True, skin=0.0)
    worst_x = max(np.abs(a[0] - b[0]).max() for a, b in zip(frames, reference, strict=True))
    worst_e = max(abs(a[1] - b[1]) for a, b in zip(frames, reference, strict=True))
    print(f"steps {len(frames) - 1} worst |dx| {worst_x:.3e} A, worst |dE| {worst_e:.3e} eV", flush=True)
    if len(frames) != len(reference) or worst_x > 1e-9 or worst_e > 1e-9:
        sys.exit(1)


if __name__ == "__main__":
    main()
