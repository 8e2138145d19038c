"""Run under a launcher: serve the i-PI server at ADDRESS (argv[1]) with one part per rank; rank 0
talks to the socket, every rank evaluates. Every rank prints ``rank R: served N`` when the server
ends the run, or ``rank R: stopped: <error>`` and exits with status 3 if serving failed.
argv[2]: the timeout in seconds."""

import sys

import numpy as np
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.drivers.ipi import serve_ipi
from distmlip.models import LennardJones


def structure():
    """The structure the test's server simulates (the test imports this)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    return atoms


def model():
    # Lennard-Jones roughly fitted to Cu (tests/support: LJ_PARAMS): no torch_geometric import,
    # so the two ranks start seconds sooner
    return LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0)


def main():
    calc = DistributedCalculator(model())
    assert calc.backend == "torch" and calc.world_size > 1, (calc.backend, calc.world_size)
    try:
        served = serve_ipi(calc, structure(), sys.argv[1], timeout=float(sys.argv[2]))
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank says
        print(f"rank {calc.rank}: stopped: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print(f"rank {calc.rank}: served {served} with {calc.num_parts} parts, "
          f"last energy {np.float64(calc.results['energy']):.12f}", flush=True)


if __name__ == "__main__":
    main()
