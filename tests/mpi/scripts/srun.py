"""Run as one task of a (faked) srun step: the launch is detected from SLURM's variables, the
ranks meet at task 0's node, and the split result equals this process's own unsplit one."""

import warnings

import numpy as np
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import SchNet
from distmlip.runtime.launch import detect_launch


def main():
    launch = detect_launch()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=3)
    model = SchNet(cutoff=4.0, num_interactions=3, hidden_channels=8, seed=2)
    calc = DistributedCalculator(model, timeout=30.0)
    energy, forces = calc.get_potential_energy(atoms), calc.get_forces(atoms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = DistributedCalculator(model, backend="local")  # warns: every rank repeats the work
        ref_energy, ref_forces = ref.get_potential_energy(atoms), ref.get_forces(atoms)
        DistributedCalculator(model, backend="local")  # once per process
    said = [str(w.message) for w in caught if "backend='local'" in str(w.message)]
    assert len(said) == 1 and "every rank evaluates the whole system" in said[0] \
        and "backend='auto'" in said[0], said
    assert launch is not None and launch.launcher == "slurm", launch
    assert (calc.rank, calc.world_size, calc.backend) == (launch.rank, 2, "torch")
    assert abs(energy - ref_energy) <= 1e-10 * max(abs(ref_energy), 1)
    assert np.abs(forces - ref_forces).max() <= 1e-10 * max(np.abs(ref_forces).max(), 1)
    # ASE's set() under a launcher: every rank rebuilds its runner; the process group stays
    assert calc.set(mode="extended", num_parts=4) == {"mode": "extended", "num_parts": 4}
    assert calc.last_plan is None and calc.backend == "torch"
    forces = calc.get_forces(atoms)
    assert calc.last_plan.num_parts == 4 and calc.last_plan.mode == "extended"
    assert np.abs(forces - ref_forces).max() <= 1e-10 * max(np.abs(ref_forces).max(), 1)
    try:
        calc.set(timeout=99.0)
    except ValueError as exc:
        assert str(exc).startswith("timeout: cannot change under a multi-process launch"), exc
    else:
        raise AssertionError("set(timeout=...) under a launcher must raise")
    print(f"rank {calc.rank}: srun launch equal to one process", flush=True)


if __name__ == "__main__":
    main()
