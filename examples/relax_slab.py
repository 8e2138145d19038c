"""Relax a Cu(111) slab with a partitioned calculator: the two bottom layers held fixed, FIRE on
the rest, then the relaxation of the top layer printed.

    OMP_NUM_THREADS=1 python examples/relax_slab.py                     # SevenNet-0, 6x6x5 slab
    OMP_NUM_THREADS=1 python examples/relax_slab.py --model lj --size 3 # quick, Lennard-Jones

The same from the command line: ``distmlip relax slab.cif --model sevennet-0 --partitions 2``.
"""

import argparse

import numpy as np
from ase.build import fcc111
from ase.constraints import FixAtoms
from ase.optimize import FIRE

from distmlip import DistributedCalculator, load
from distmlip.models import LennardJones


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sevennet-0", help="a name distmlip.load accepts, or lj")
    p.add_argument("--size", type=int, default=6, help="surface cells along each in-plane axis")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--fmax", type=float, default=0.02, help="eV/Å")
    args = p.parse_args()

    slab = fcc111("Cu", size=(args.size, args.size, args.layers), a=3.61, vacuum=8.0, periodic=True)
    tags = slab.get_tags()  # 1 = top layer ... layers = bottom layer
    slab.set_constraint(FixAtoms(mask=tags >= args.layers - 1))
    # lj: Lennard-Jones roughly fitted to Cu (minimum at 2.58 Å), for a quick run
    model = LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0) if args.model == "lj" else load(args.model)
    slab.calc = DistributedCalculator(model, num_parts=args.partitions, partitioner="slab")
    top = tags == 1
    z0 = slab.positions[top, 2].mean()
    e0 = slab.get_potential_energy()
    FIRE(slab, logfile=None).run(fmax=args.fmax, steps=300)
    dz = slab.positions[top, 2].mean() - z0
    fmax = np.linalg.norm(slab.get_forces(), axis=1).max()
    print(f"{len(slab)} atoms, {args.partitions} parts: relaxed, energy {e0:.4f} -> "
          f"{slab.get_potential_energy():.4f} eV, max force {fmax:.4f} eV/Å, top layer moved {dz:+.4f} Å")


if __name__ == "__main__":
    main()
