"""Run under a launcher: an adapter's model (argument: ``matgl``, ...) split over the ranks equals
the single-process result (float64, 1e-10 relative) on the adapter structures, both modes, grid
and METIS partitions."""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests directory

from distmlip import wrap  # noqa: E402
from distmlip.testing.adapters import adapter_structures  # noqa: E402

from _splits import check_splits, report  # noqa: E402

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
    if name == "fairchem-moe":  # the experts mixed by the whole system's composition
        from test_fairchem import make_uma_moe

        return wrap(make_uma_moe().double(), task="omat")
    if name == "orb":
        from test_orb import make_orb

        return wrap(make_orb().double())
    raise SystemExit(f"unknown adapter {name!r}")


def main():
    warnings.simplefilter("ignore")
    name = sys.argv[1]
    structures = {k: v for k, v in adapter_structures().items() if k in ("oxide", "slab", "molecule")}
    result = check_splits(make(name), structures, 2, ("grid", "metis"), RTOL)
    report(*result, f"{name} {{checks}} checks passed")


if __name__ == "__main__":
    main()
