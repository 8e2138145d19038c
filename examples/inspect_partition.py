"""Look at what the partitioner did: per-part owned atoms, halo and edges, and a picture.

    python examples/inspect_partition.py --reps 8 --parts 8 --partitioner metis --plot parts.png

The same from the command line: ``distmlip partition STRUCTURE --partitions 8 --cutoff 5 --plot parts.png``.
"""

import argparse

import numpy as np
from ase.build import bulk

from distmlip import NeighborGraph, PartitionPlan


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=8, help="cubic Cu cells along each axis (4 atoms each)")
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--partitioner", default="grid", choices=["grid", "slab", "metis"])
    p.add_argument("--mode", default="halo", choices=["halo", "extended"])
    p.add_argument("--layers", type=int, default=3, help="halo depth in extended mode")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--plot", default=None, help="write a PNG of parts and halos")
    args = p.parse_args()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((args.reps,) * 3)
    graph = NeighborGraph.from_atoms(atoms, args.cutoff)
    hops = args.layers if args.mode == "extended" else 1
    plan = PartitionPlan.build(graph, args.parts, args.partitioner, args.mode, num_hops=hops)

    owned = np.array([part.num_owned for part in plan.parts])
    print(f"{len(atoms)} atoms, {graph.num_edges} edges, {args.parts} parts "
          f"({args.partitioner}, {args.mode})")
    print(f"{'part':>4} {'owned':>7} {'halo':>7} {'edges':>8}")
    for part in plan.parts:
        print(f"{part.index:>4} {part.num_owned:>7} {part.num_halo:>7} {len(part.edges):>8}")
    print(f"imbalance {owned.max() / owned.mean():.3f}, redundancy {plan.redundancy():.3f}, "
          f"halo {plan.halo_fraction():.2f} x the atoms")
    if args.plot:
        from distmlip.partition.plot import plot_partition

        plot_partition(atoms, plan, args.plot, show_part=0)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
