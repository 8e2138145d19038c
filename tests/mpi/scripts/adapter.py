"""Run under a launcher: an adapter's model (argument: ``matgl``, ...) split over the ranks equals
the single-process result (float64, 1e-10 relative) on the adapter structures, both modes, grid
and METIS partitions."""

import sys
import warnings

from distmlip import wrap
from distmlip.testing.adapters import adapter_structures

from support import adapters
from support.splits import check_splits, report

RTOL = 1e-10


def make(name):
    if name == "matgl":
        return wrap(adapters.make_matgl().double())
    if name == "matgl-m3gnet":
        return wrap(adapters.make_matgl(arch="M3GNet").double())
    if name == "mattersim":
        return wrap(adapters.make_mattersim()).double()
    if name == "fairchem":
        return wrap(adapters.make_uma().double(), task="omat")
    if name == "fairchem-moe":  # the experts mixed by the whole system's composition
        return wrap(adapters.make_uma_moe().double(), task="omat")
    if name == "orb":
        return wrap(adapters.make_orb().double())
    raise SystemExit(f"unknown adapter {name!r}")


def main():
    warnings.simplefilter("ignore")
    name = sys.argv[1]
    structures = {k: v for k, v in adapter_structures().items() if k in ("oxide", "slab", "molecule")}
    result = check_splits(make(name), structures, 2, ("grid", "metis"), RTOL)
    report(*result, f"{name} {{checks}} checks passed")


if __name__ == "__main__":
    main()
