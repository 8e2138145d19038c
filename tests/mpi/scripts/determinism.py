"""Run under a launcher (mpirun -n 2): for each setting, two fresh calculators on the same model
and structure give bit-identical energy, forces, stress and per-atom energies on every rank, and
rank 0's results equal every other rank's bit for bit; the results a rank sends a step are its
owned rows (4 float64 each), its halo atoms' forces (3 each, once per atom) and its virial, not
the (4N + 9) all-reduce."""

import sys

import numpy as np
import torch.distributed as dist
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import SchNet

KEYS = ("energy", "forces", "stress", "energies")
SETTINGS = [{"partitioner": "grid"}, {"partitioner": "metis", "mode": "extended"},
            {"partitioner": "slab", "dtype": "float32"}]


def evaluate(model, atoms, world, **settings):
    a = atoms.copy()
    a.calc = DistributedCalculator(model, num_parts=2 * world, **settings)
    a.get_potential_energy()
    a.get_stress()
    return a.calc, {k: np.array(a.calc.results[k], copy=True) for k in KEYS}


def main():
    from distmlip.runtime.launch import detect_launch

    world = detect_launch().world_size
    model = SchNet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.positions += np.random.default_rng(1).normal(0, 0.05, atoms.positions.shape)
    failures = []
    for settings in SETTINGS:
        calc, first = evaluate(model, atoms, world, **settings)
        assert calc.backend == "torch", calc.backend
        rank = calc.rank
        _, second = evaluate(model, atoms, world, **settings)
        b = calc.runner._built
        shard = b.shards[0]
        ids = shard.atoms if b.ids is None else b.ids[shard.atoms]
        halo = np.setdiff1d(ids[shard.num_owned:], ids[: shard.num_owned])  # others' atoms
        expected = 8 * (4 * shard.num_owned + 3 * len(halo) + 9)
        if calc.runner.result_bytes_sent != expected:
            failures.append(f"{settings}: {calc.runner.result_bytes_sent} result bytes sent, "
                            f"expected {expected}")
        if not expected < 8 * (4 * len(atoms) + 9):
            failures.append(f"{settings}: {expected} bytes is not below the full buffer's")
        for k in KEYS:
            if not np.array_equal(first[k], second[k]):
                failures.append(f"{settings} {k}: run to run")
        everyone = [None] * world
        dist.all_gather_object(everyone, first)
        for other in everyone:
            for k in KEYS:
                if not np.array_equal(first[k], other[k]):
                    failures.append(f"{settings} {k}: ranks differ")
    if failures:
        sys.exit(f"rank {rank}: " + "; ".join(failures))
    print(f"rank {rank}: bit-identical in {len(SETTINGS)} settings", flush=True)


if __name__ == "__main__":
    main()
