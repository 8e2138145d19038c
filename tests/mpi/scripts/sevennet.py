"""Run under a launcher: SevenNet-0 on the rutile of ``support.adapters`` (one part per rank), both
modes; rank 0 writes the results (and the world size) as JSON to the file named by the argument,
which tests/adapters/test_sevenn.py compares with SevenNet's own calculator. (Not named
``sevenn.py``: this folder is first on the script's path, and it would shadow the package.)"""

import json
import sys
import warnings

import torch.distributed as dist

import distmlip

from support.adapters import sevenn_rutile


def main():
    warnings.filterwarnings("ignore")
    atoms = sevenn_rutile()
    out = {}
    for mode in ("halo", "extended"):
        atoms.calc = distmlip.DistributedCalculator(distmlip.load("sevennet-0"), mode=mode)
        out[mode] = {"energy": float(atoms.get_potential_energy()),
                     "forces": atoms.get_forces().tolist(),
                     "energies": atoms.get_potential_energies().tolist(),
                     "stress": atoms.get_stress().tolist(), "world": dist.get_world_size()}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
