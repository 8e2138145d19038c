"""The distmlip demo (what ``make demo`` runs): ``distmlip demo``, here as a script.

    OMP_NUM_THREADS=1 python examples/demo.py                       # default sizes, < 5 min on 2 cores
    OMP_NUM_THREADS=1 python examples/demo.py --supercell 2x2x3 --steps 5 --schnet-atoms 2000

1. SevenNet-0 (weights shipped in the sevenn wheel) runs a partitioned Langevin MD of rutile TiO2
   through ``distmlip md`` itself: progress bar, trajectory, log, checkpoint and plots in
   ``demo-output/md``, and a picture of the partition in ``demo-output/partition.png``.
2. The last frame evaluated by SevenNet's own calculator, by distmlip whole and split.
3. A ~11k-atom Cu crystal with SchNet (random weights): whole vs split vs within a memory
   budget. Exit status 1 if a split result differs beyond rounding.

See ``distmlip demo --help`` for the options.
"""

import sys

from distmlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
