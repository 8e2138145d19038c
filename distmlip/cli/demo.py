"""``distmlip demo`` (what ``make demo`` runs): the shipped SevenNet-0 on rutile TiO2.

1. A partitioned Langevin MD through ``distmlip md`` itself (progress bar, trajectory, log,
   checkpoint, plots in ``DIR/md``) and a picture of the partition (``DIR/partition.png``).
2. The last MD frame evaluated by SevenNet's own ASE calculator, by distmlip unpartitioned and
   by distmlip partitioned: a table of the differences.
3. A large crystal (Cu, ~11k atoms) with SchNet (random weights, float64): whole vs split, and
   within a memory budget of 0.3x its need (skip with ``--schnet-atoms 0``).

Exit status 1 if a partitioned result differs from the unpartitioned one beyond rounding.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from ..calculators import DistributedCalculator
from ..md import TRAJECTORY
from ..models import SchNet
from ..partition.plot import plot_partition
from ..runtime import estimate_memory
from ..testing import count_work
from . import md
from ._common import check_writable_dir, load_model
from ._parser import Parser

__all__ = ["add_parser", "command"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="SevenNet-0 MD of rutile, split vs whole vs sevenn, a large SchNet",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", default="demo-output", metavar="DIR")
    p.add_argument("--supercell", default="4x4x4", metavar="AxBxC",
                   help="rutile TiO2 unit cells (6 atoms each) for SevenNet-0")
    p.add_argument("--steps", type=int, default=20, help="MD steps (1 fs)")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--device", default="cpu,cpu" if (os.cpu_count() or 1) > 1 else "cpu",
                   help="devices the MD's parts run on (cpu,cpu: two worker threads)")
    p.add_argument("--schnet-atoms", type=int, default=10976,
                   help="atoms of the large SchNet part (Cu fcc; 0 skips it)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=command)


def _rutile():
    from ase.spacegroup import crystal

    return crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                   cellpar=[4.594, 4.594, 2.959, 90, 90, 90])


def command(args) -> int:
    import ase.io

    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", message="No tensor product accelerator")  # sevenn's, on CPU
    out = check_writable_dir(args.output)
    try:
        import sevenn  # noqa: F401

        model, what = "sevennet-0", "SevenNet-0 (weights shipped in the sevenn wheel, float32)"
    except ImportError:
        model, what = "schnet:hidden_channels=32", "SchNet (random weights: sevenn is not installed)"
    structure = out / "rutile_TiO2.cif"
    ase.io.write(structure, _rutile(), parallel=False)
    print(f"== 1. distmlip md: {what}, rutile TiO2 {args.supercell} cells, {args.partitions} parts ==")
    md_args = ["md", str(structure), "--model", model, "--supercell", args.supercell, "--steps",
               str(args.steps), "--ensemble", "nvt", "--temperature", "600", "--timestep", "1",
               "--partitions", str(args.partitions), "--device", args.device,
               "--write-every", str(max(1, args.steps // 4)),
               "--output", str(out / "md"), "--overwrite", "--plot"]
    print("$ distmlip " + " ".join(md_args))
    status = _md(md_args + (["--quiet"] if args.quiet else []))
    if status:
        return status
    atoms = ase.io.read(out / "md" / TRAJECTORY, index=-1, parallel=False)
    atoms.calc = None
    failed = _table(atoms, model, args.partitions, out)
    if args.schnet_atoms:
        failed += _schnet(args.schnet_atoms, args.partitions)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; outputs in {out}/")
    for line in failed:
        print("FAILED:", line)
    return 1 if failed else 0


def _md(argv: list[str]) -> int:
    """``distmlip md ARGV`` in this process (its errors reach the caller as ``CLIError``)."""
    parser = Parser(prog="distmlip")
    md.add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    return int(md.command(parser.parse_args(argv)) or 0)


def _table(atoms, model_name: str, parts: int, out: Path) -> list[str]:
    print(f"\n== 2. the last frame ({len(atoms)} atoms): split vs whole vs the package's own calculator ==")
    model = load_model(model_name)
    rows = []

    def evaluate(label, calc):
        a = atoms.copy()
        a.calc = calc
        t0 = time.perf_counter()
        rows.append((label, a.get_potential_energy(), a.get_forces(), a.get_stress(),
                     time.perf_counter() - t0))
        return calc

    if model_name == "sevennet-0":
        from sevenn.calculator import SevenNetCalculator

        evaluate("SevenNetCalculator (sevenn)", SevenNetCalculator("7net-0", device="cpu"))
    evaluate("distmlip, 1 part", DistributedCalculator(model, backend="local"))
    calc = evaluate(f"distmlip, {parts} parts (grid, halo)",
                    DistributedCalculator(model, num_parts=parts, backend="local"))
    plot_partition(atoms, calc.last_plan, out / "partition.png")
    _, e0, f0, s0, _ = rows[0]
    print(f"{'calculator':<30} {'energy (eV)':>16} {'|dE|/atom eV':>12} {'max|dF| eV/Å':>13} "
          f"{'max|dS| eV/Å3':>13} {'time s':>7}")
    failed = []
    for label, e, f, s, t in rows:
        de, df, ds = abs(e - e0) / len(atoms), float(np.abs(f - f0).max()), float(np.abs(s - s0).max())
        print(f"{label:<30} {e:16.6f} {de:12.1e} {df:13.1e} {ds:13.1e} {t:7.2f}")
        if de > 1e-6 or df > 1e-5:  # a float32 model against its own float32 evaluation
            failed.append(f"{label}: |dE|/atom {de:.1e}, max|dF| {df:.1e}")
    print(f"(differences from the first row; wrote {out / 'partition.png'})")
    return failed


def _schnet(n_atoms: int, parts: int) -> list[str]:
    from ase.build import bulk

    n = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    atoms.rattle(stdev=0.05, seed=0)
    model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, num_gaussians=25, seed=0)
    print(f"\n== 3. a large crystal: Cu fcc {len(atoms)} atoms, SchNet (3 interactions, 32 channels, "
          f"random weights, float64) ==")
    need = estimate_memory(model, atoms)
    configs = [("1 part", {}), (f"{parts} parts, halo", {"num_parts": parts}),
               (f"max_memory {0.3 * need / 1e9:.2f} GB", {"max_memory": int(0.3 * need)})]
    print(f"{'evaluation':<26} {'energy (eV)':>18} {'max|dF| eV/Å':>13} {'parts':>5} {'redund.':>7} "
          f"{'time s':>7}")
    failed, ref = [], None
    for label, options in configs:
        calc = DistributedCalculator(model, backend="local", **options)
        a = atoms.copy()
        a.calc = calc
        t0 = time.perf_counter()
        e, f = a.get_potential_energy(), a.get_forces()
        t = time.perf_counter() - t0
        ref = ref or (e, f)
        df = float(np.abs(f - ref[1]).max())
        w = count_work(calc)
        print(f"{label:<26} {e:18.10f} {df:13.1e} {w['num_parts']:>5} {w['redundancy']:7.2f} {t:7.2f}")
        if abs(e - ref[0]) > 1e-10 * max(abs(ref[0]), 1.0) or df > 1e-10 * max(np.abs(ref[1]).max(), 1.0):
            failed.append(f"SchNet {label}: dE {abs(e - ref[0]):.1e}, max|dF| {df:.1e}")
    print(f"(predicted need of one unbounded evaluation {need / 1e9:.2f} GB; redund.: edges "
          f"evaluated / graph edges)")
    return failed
