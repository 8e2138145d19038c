"""``distmlip run | relax | partition | models | plot | bench | serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..drivers.ipi import serve_ipi
from ..graph import NeighborGraph
from ..md import plot_run
from ..models import registry
from ..models.registry import ADAPTERS, REFERENCE_MODELS, adapter_info
from ..partition import PartitionPlan
from ..partition.plot import partition_table, plot_partition
from ..typing import MODES, PARTITIONERS
from ._common import (
    CLIError,
    add_calculator_options,
    add_model_option,
    build_calculator,
    calculator_kwargs,
    check_output_file,
    load_model,
    parse_supercell,
    read_structure,
    repeat_structure,
)
from .md import library_errors

__all__ = ["add_parsers", "bench"]

OPTIMIZERS = ("fire", "bfgs", "lbfgs")


def _structure_args(p, model_required: bool = True) -> None:
    p.add_argument("structure", metavar="STRUCTURE", help="structure file (CIF, POSCAR, extxyz, ...)")
    add_model_option(p, required=model_required)
    p.add_argument("--supercell", default=None, metavar="AxBxC", help="repeat the structure, e.g. 2x2x2")


def _setup(args):
    """Structure (repeated), model, calculator from the common options."""
    supercell = parse_supercell(args.supercell)
    atoms = repeat_structure(read_structure(args.structure, getattr(args, "verbose", False)), supercell)
    calc = build_calculator(load_model(args.model), calculator_kwargs(args))
    atoms.calc = calc
    return atoms, calc


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="single point: energy, forces, stress")
    _structure_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (energy, forces, stress, ...)")
    p.add_argument("--show", type=int, default=10, metavar="N", help="atoms listed in the force table")
    p.add_argument("--index", default=":", metavar="I|SLICE",
                   help="the frames of a trajectory to evaluate: ':' every frame (default), -1 the "
                        "last, 0:10:2 a slice")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write the frames with energy, forces, stress and per-atom energies "
                        "(extxyz, or a format from the name)")
    add_calculator_options(p)
    p.set_defaults(func=run)

    p = sub.add_parser("relax", help="relax positions (and --cell) with FIRE")
    _structure_args(p)
    p.add_argument("--fmax", type=float, default=0.05, help="force criterion, eV/Å (default 0.05)")
    p.add_argument("--steps", type=int, default=500, help="most optimiser steps (default 500)")
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--pressure", type=float, default=None, metavar="GPA",
                   help="relax the cell under this external pressure, GPa (implies --cell)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="fire",
                   help="fire (default), bfgs or lbfgs (ASE's)")
    p.add_argument("--trajectory", default=None, metavar="FILE",
                   help="every optimiser step as frames (extxyz, .traj, ...: format from the name)")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="relaxed structure (format from the extension; default relaxed.extxyz)")
    add_calculator_options(p)
    p.set_defaults(func=relax)

    p = sub.add_parser("partition", help="partition statistics and a picture of parts and halos")
    _structure_args(p, model_required=False)
    p.add_argument("--cutoff", type=float, default=None, help="graph cutoff, Å (instead of --model)")
    p.add_argument("--layers", type=int, default=None,
                   help="message-passing layers (extended mode's halo depth; from --model if given)")
    p.add_argument("--partitions", "-p", type=int, default=2, help="number of parts (default 2)")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="grid")
    p.add_argument("--mode", choices=MODES, default="halo")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a picture of parts and halos")
    p.add_argument("--show-part", type=int, default=0, help="the part whose halo the picture marks")
    p.set_defaults(func=partition)

    p = sub.add_parser("models", help="models --model accepts on this installation (loads nothing)")
    p.add_argument("--check", action="store_true",
                   help="load each model: its cutoff, layers and elements (tens of seconds)")
    p.set_defaults(func=models)

    p = sub.add_parser("plot", help="energy/temperature/pressure PNGs of an md run directory")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=plot)

    sub.add_parser("bench", help="the benchmark suite (bench/run.py of a source checkout)",
                   add_help=False)

    p = sub.add_parser("serve", help="evaluate forces for i-PI (socket client)")
    _structure_args(p)
    p.add_argument("--ipi", required=True, metavar="ADDRESS", help="HOST:PORT or unix:NAME")
    p.add_argument("--socket-timeout", type=float, default=None, help="seconds to wait for the server")
    p.add_argument("--progress", action="store_true",
                   help="a sign of life per evaluation on stderr (count, energy, rate)")
    add_calculator_options(p)
    p.set_defaults(func=serve)


# ----------------------------------------------------------------------------- run
def _read_frames(args) -> list:
    """The frames ``--index`` selects (repeated by ``--supercell``); a file only pymatgen reads is
    one frame."""
    import ase.io

    supercell = parse_supercell(args.supercell)
    first = read_structure(args.structure, getattr(args, "verbose", False))  # checks; last frame
    index = args.index.strip()
    try:
        frames = ase.io.read(args.structure, index=index)
    except (ValueError, IndexError) as exc:
        raise CLIError(f"--index: expected a frame index or slice of {args.structure!r} (':' every "
                       f"frame, -1 the last, 0:10:2), got {args.index!r} ({exc})") from None
    except Exception:  # noqa: BLE001 - a file ASE cannot read as a trajectory: the one frame
        if index not in (":", "-1", "0"):
            raise CLIError(f"--index: {args.structure!r} holds one structure; pass --index : or "
                           f"drop --index") from None
        frames = [first]
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise CLIError(f"--index: selects no frame of {args.structure!r}, got {args.index!r}; pass "
                       f"--index : for every frame")
    return [repeat_structure(f, supercell) for f in frames]


def run(args) -> int:
    output = check_output_file(args.output, "--output") if args.output else None
    frames = _read_frames(args)
    calc = build_calculator(load_model(args.model), calculator_kwargs(args))
    evaluated = []
    for atoms in frames:
        atoms.calc = calc
        atoms.get_potential_energy()
        evaluated.append(_frame(atoms))
    if output is not None and calc.rank == 0:
        written = _write_or_save(output, evaluated, "--output")
        print(f"wrote {len(evaluated)} frame{'s' if len(evaluated) != 1 else ''} (energy, forces, "
              f"stress, per-atom energies) to {written}", file=sys.stderr if args.json else sys.stdout)
    if len(frames) > 1:
        return 0 if calc.rank != 0 else _run_frames(args, evaluated, calc)
    atoms = frames[0]
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces(apply_constraint=False)  # the model's, on fixed atoms too
    stress = atoms.get_stress() if atoms.cell.rank == 3 else None
    if calc.rank != 0:
        return 0
    run_info = calc.last_run
    if args.json:
        json.dump({"natoms": len(atoms), "formula": atoms.get_chemical_formula(), "energy_eV": energy,
                   "forces_eV_per_A": forces.tolist(),
                   "stress_eV_per_A3_voigt": None if stress is None else stress.tolist(),
                   **run_info.todict(), "timings_s": calc.timings},
                  sys.stdout, indent=1)
        print()
        return 0
    from ase import units

    n = len(atoms)
    print(f"{n} atoms ({atoms.get_chemical_formula()}), model {args.model} ({calc.partitioner}, "
          f"{calc.mode}): {run_info.describe()}")
    print(f"energy        {energy:18.8f} eV   ({energy / n:.8f} eV/atom)")
    norms = np.linalg.norm(forces, axis=1)
    print(f"max |force|   {norms.max():18.8f} eV/Å  (atom {int(norms.argmax())})")
    if stress is not None:
        gpa = stress / units.GPa
        labels = ("xx", "yy", "zz", "yz", "xz", "xy")
        print("stress (GPa)  " + "  ".join(f"{k} {v:10.5f}" for k, v in zip(labels, gpa, strict=True)))
        print(f"pressure      {-gpa[:3].mean():18.8f} GPa")
    shown = min(n, max(args.show, 0))
    if shown:
        print(f"\n{'atom':>6} {'el':>3} {'Fx (eV/Å)':>14} {'Fy (eV/Å)':>14} {'Fz (eV/Å)':>14}")
        for i in range(shown):
            fx, fy, fz = forces[i]
            print(f"{i:>6} {atoms[i].symbol:>3} {fx:14.8f} {fy:14.8f} {fz:14.8f}")
        if shown < n:
            print(f"... {n - shown} more atoms (--show N, or --json for all)")
    t = calc.timings
    print("\ntime: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))
    return 0


def _run_frames(args, frames, calc) -> int:
    """Several frames: one line each (or a JSON list)."""
    from ase import units

    rows = []
    for i, f in enumerate(frames):
        forces = f.get_forces(apply_constraint=False)
        stress = f.get_stress() if f.cell.rank == 3 else None
        rows.append({"frame": i, "natoms": len(f), "formula": f.get_chemical_formula(),
                     "energy_eV": f.get_potential_energy(), "forces_eV_per_A": forces.tolist(),
                     "stress_eV_per_A3_voigt": None if stress is None else stress.tolist()})
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{len(frames)} frames of {args.structure} (--index {args.index}), model {args.model}, "
          f"{calc.num_parts} part(s) ({calc.partitioner}, {calc.mode})")
    print(f"{'frame':>6} {'atoms':>6} {'energy (eV)':>18} {'eV/atom':>14} {'max|F| eV/Å':>12} "
          f"{'P (GPa)':>10}")
    for row in rows:
        n, e = row["natoms"], row["energy_eV"]
        fmax = float(np.linalg.norm(np.array(row["forces_eV_per_A"]), axis=1).max())
        s = row["stress_eV_per_A3_voigt"]
        p = "-" if s is None else f"{-np.mean(s[:3]) / units.GPa:.5f}"
        print(f"{row['frame']:>6} {n:>6} {e:18.8f} {e / n:14.8f} {fmax:12.6f} {p:>10}")
    return 0


# ----------------------------------------------------------------------------- relax
def relax(args) -> int:
    from ase import units
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE, LBFGS

    if args.pressure is not None and not np.isfinite(args.pressure):
        raise CLIError(f"--pressure: expected a finite number of GPa, got {args.pressure}; pass e.g. "
                       f"--pressure 1.5")
    cell = args.cell or args.pressure is not None
    trajectory = None
    if args.trajectory is not None:
        trajectory = check_output_file(args.trajectory, "--trajectory")
    if not args.fmax > 0:
        raise CLIError(f"--fmax: expected a positive number of eV/Å, got {args.fmax}")
    if args.steps < 0:
        raise CLIError(f"--steps: expected an integer >= 0, got {args.steps}")
    output = check_output_file(args.output or "relaxed.extxyz", "--output")
    atoms, calc = _setup(args)
    if cell and atoms.cell.rank < 3:
        flag = "--cell" if args.cell else "--pressure"
        raise CLIError(f"{flag}: needs a periodic cell with three lattice vectors; this structure "
                       f"has none (relax positions only: drop {flag})")
    root = calc.rank == 0
    e0 = atoms.get_potential_energy()
    pressure = (args.pressure or 0.0) * units.GPa
    target = FrechetCellFilter(atoms, scalar_pressure=pressure) if cell else atoms
    optimizer = {"fire": FIRE, "bfgs": BFGS, "lbfgs": LBFGS}[args.optimizer]
    opt = optimizer(target, logfile="-" if root else None)
    frames = []
    if trajectory is not None:
        opt.attach(lambda: frames.append(_frame(atoms)), interval=1)
    converged = opt.run(fmax=args.fmax, steps=args.steps)
    e1 = atoms.get_potential_energy()
    fmax = float(np.linalg.norm(target.get_forces(), axis=1).max())
    if root:

        atoms_out = atoms.copy()
        output = _write_or_save(output, atoms_out, "--output")
        print(f"{'converged' if converged else 'NOT converged'} after {opt.nsteps} steps: energy "
              f"{e0:.6f} -> {e1:.6f} eV, max force {fmax:.4f} eV/Å (fmax {args.fmax}); wrote {output}")
        if trajectory is not None:
            trajectory = _write_or_save(trajectory, frames, "--trajectory")
            print(f"wrote {len(frames)} frames to {trajectory}")
    return 0 if converged else 1


def _frame(atoms):
    """A copy of ``atoms`` holding its current results (energy, forces, stress, energies)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    results = {k: atoms.calc.results[k] for k in ("energy", "forces", "stress", "energies")
               if k in atoms.calc.results}
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def _write_or_save(path: Path, images, flag: str) -> Path:
    """Write ``images`` to ``path``; if that fails, to ``<stem>.saved.extxyz`` next to it (the
    result is not lost), saying where on stderr. Returns the path written."""
    import ase.io

    try:
        ase.io.write(path, images, parallel=False)
        return path
    except Exception as exc:  # noqa: BLE001 - any writer failure: save the result anyway
        fallback = path.with_name(path.stem + ".saved.extxyz")
        ase.io.write(fallback, images, format="extxyz", parallel=False)
        print(f"distmlip: warning: {flag}: could not write {str(path)!r} ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); saved the result as {fallback}",
              file=sys.stderr)
        return fallback


# ----------------------------------------------------------------------------- partition
def partition(args) -> int:

    if (args.model is None) == (args.cutoff is None):
        raise CLIError("--cutoff/--model: expected exactly one (the graph's cutoff, or a model's), "
                       f"got {'both' if args.model else 'neither'}")
    if args.partitions < 1:
        raise CLIError(f"--partitions: expected an integer >= 1, got {args.partitions}")
    if args.plot:
        check_output_file(args.plot, "--plot", "picture")
    supercell = parse_supercell(args.supercell)
    atoms = repeat_structure(read_structure(args.structure, getattr(args, "verbose", False)), supercell)
    if args.model is not None:
        model = load_model(args.model)
        cutoff, layers = float(model.cutoff), int(model.num_layers)
        if args.layers is not None:
            layers = args.layers
    else:
        cutoff, layers = args.cutoff, args.layers or 1
        if args.mode == "extended" and args.layers is None:
            raise CLIError("--layers: extended mode needs the halo depth (the model's layers) with "
                           "--cutoff, got none; pass --layers L or --model")
    num_hops = layers if args.mode == "extended" else 1
    graph = NeighborGraph.from_atoms(atoms, cutoff)
    plan = PartitionPlan.build(graph, args.partitions, args.partitioner, args.mode, num_hops=num_hops)
    print(f"{len(atoms)} atoms ({atoms.get_chemical_formula()}), cutoff {cutoff} Å, "
          f"{graph.num_edges} edges; {args.partitions} parts, {args.partitioner}, {args.mode} mode "
          f"({num_hops}-hop halo)")
    print(partition_table(plan))
    if args.plot:
        if not any(p.index == args.show_part for p in plan.parts):
            raise CLIError(f"--show-part: expected a part index in [0, {args.partitions}), "
                           f"got {args.show_part}")
        plot_partition(atoms, plan, args.plot, args.show_part)
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------- models
def _elements(model) -> str:
    """The elements a model covers, as a count or a range, from its adapter's ``ElementTable``."""
    from ase.data import chemical_symbols

    numbers = sorted(getattr(getattr(model, "elements", None), "numbers", None) or ())
    if not numbers:
        return "any"
    first, last = chemical_symbols[numbers[0]], chemical_symbols[numbers[-1]]
    if len(numbers) > 3 and numbers[-1] - numbers[0] == len(numbers) - 1:  # a range
        return f"Z {numbers[0]}-{numbers[-1]} ({first}-{last})"
    return f"{len(numbers)} ({first}-{last})"


def _distributions() -> dict[str, str]:
    """adapter -> the distribution that brings its package (pip's name), from the registry."""
    return {name: info.distribution for name, info in ADAPTERS.items()}


#: adapter -> the distribution that brings its package (for its version; pip's name)
_DISTRIBUTIONS = _distributions()


def _installed(adapter: str) -> tuple[str, str | None]:
    """``(distribution, version)`` of the package an adapter wraps; version ``None`` when the
    package is not installed. Asks the import system and the installed metadata only: imports
    nothing."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    info = adapter_info(adapter)
    dist = info.distribution
    try:
        found = importlib.util.find_spec(info.packages[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return dist, None
    try:
        return dist, version(dist)
    except PackageNotFoundError:
        return dist, "installed"


def _table(head, rows) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def models(args) -> int:
    """The names ``--model`` accepts: from each adapter's ``PRETRAINED`` table and the installed
    packages' metadata, loading nothing (the adapters import torch only); ``--check`` loads each
    model to show its cutoff, layers and elements (tens of seconds)."""
    import importlib

    rows, adapters, missing = [], [], []
    for adapter, info in registry.ADAPTERS.items():
        module = importlib.import_module(f"distmlip.models.{adapter}")
        pretrained = module.PRETRAINED
        dist, ver = _installed(adapter)
        state = ver if ver is not None else "no"
        what = info.description.rsplit(" (", 1)[0]
        adapters.append((adapter, dist, state, what))
        if ver is None:
            missing.append(f"pip install 'distmlip[{info.extra}]'" + (
                f" && pip install --no-deps {info.distribution}" if info.no_deps else ""))
        rows.extend((name, dist, state, desc.rsplit(" (", 1)[0]) for name, desc in pretrained.items())
    for name, desc in REFERENCE_MODELS.items():
        rows.append((name, "distmlip", "yes", desc.split(";")[0]))
    if args.check:
        return _check_models(rows)
    _table(("name", "package", "installed", "description"), rows)
    print("\nadapters (distmlip.wrap(obj), or --model FILE of a saved model of the package):")
    _table(("adapter", "package", "installed", "wraps"), adapters)
    if missing:
        print("not installed: " + "; ".join(missing))
    print("--model also takes a saved model file (SevenNet .pth checkpoint, CHGNet file, torch.save-d "
          "module); `distmlip models --check` loads each model listed (slow) to show its cutoff, "
          "layers and elements")
    return 0


def _check_models(rows) -> int:
    """Load each listed model: its cutoff, layers and elements, or why it does not load. Exit
    status 1 if one whose package is installed does not load."""
    table, failed = [], 0
    for name, dist, state, _ in rows:
        if state == "no":
            table.append((name, "-", "-", "-", dist, "package not installed"))
            continue
        try:
            model = load_model(name)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failed += 1
            table.append((name, "-", "-", "-", dist,
                          f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
            continue
        if name == "lj":
            elements = "any"
        elif name == "schnet":
            elements = f"Z 0-{model.embedding.num_embeddings - 1}"
        else:
            elements = _elements(model)
        table.append((name, f"{model.cutoff:g}", str(model.num_layers), elements, dist, "ok"))
    _table(("name", "cutoff Å", "layers", "elements", "package", "loads"), table)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- plot, bench, serve
def plot(args) -> int:
    d = Path(args.directory)
    if not (d / "log.csv").is_file():
        what = ("which does not exist" if not d.exists() else "which is not a directory" if not d.is_dir()
                else "which holds no log.csv")
        raise CLIError(f"DIR: expected a run directory of distmlip md (holding log.csv), got "
                       f"{args.directory!r}, {what}; pass the --output directory of an md run")
    if not os.access(d, os.W_OK):
        raise CLIError(f"DIR: expected a run directory distmlip can write the plots in, got "
                       f"{args.directory!r} (permission denied)")
    with library_errors(directory="DIR"):
        written = plot_run(args.directory)
    for path in written:
        print(f"wrote {path}")
    return 0


def bench(argv: list[str]) -> int:
    """Forward to ``bench/run.py`` of the source checkout this package runs from."""
    script = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not script.is_file():
        raise CLIError(f"bench: expected the benchmark suite at {script} (it ships with a source "
                       f"checkout, not with the package); clone the repository and run there")
    return subprocess.call([sys.executable, str(script), *argv])


def serve(args) -> int:
    atoms, calc = _setup(args)
    if atoms.constraints:  # i-PI integrates and constrains; a force server sends the model's forces
        names = sorted({type(c).__name__ for c in atoms.constraints})
        atoms.set_constraint()
        if calc.rank == 0:
            print(f"distmlip serve: note: the structure's constraints ({', '.join(names)}) are not "
                  f"applied to the forces sent; constrain the atoms in i-PI (e.g. <fixatoms>)",
                  file=sys.stderr)
    root = calc.rank == 0
    if root:
        wait = ("one attempt" if args.socket_timeout is None
                else f"waiting up to --socket-timeout {args.socket_timeout:g} s")
        print(f"distmlip serve: {len(atoms)} atoms ({atoms.get_chemical_formula()}), model {args.model}, "
              f"{calc.num_parts} part(s) ({calc.partitioner}, {calc.mode}), {calc.world_size} "
              f"process(es); connecting to the i-PI server at {args.ipi} ({wait})", flush=True)
    bar = None

    def on_step(count, energy):
        nonlocal bar
        if count == 0:
            print(f"distmlip serve: connected to {args.ipi}; serving", flush=True)
            if args.progress:
                from tqdm import tqdm

                bar = tqdm(unit="eval", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            return
        if bar is not None:
            bar.set_postfix_str(f"E={energy:.6f} eV", refresh=False)
            bar.update(1)

    try:
        count = serve_ipi(calc, atoms, args.ipi, timeout=args.socket_timeout,
                          on_step=on_step if root else None)
    except (ConnectionError, ValueError) as exc:
        text = str(exc)
        for old, new in (("pass a timeout to wait for it", "pass --socket-timeout SECONDS to wait for it"),
                         ("within the timeout of", "within --socket-timeout")):
            text = text.replace(old, new)
        key, sep, rest = text.partition(":")
        flags = {"address": "--ipi", "timeout": "--socket-timeout"}
        raise CLIError(f"{flags[key]}:{rest}" if sep and key in flags else text) from exc
    finally:
        if bar is not None:
            bar.close()
    if calc.rank == 0:
        print(f"served {count} force evaluations to {args.ipi}")
    return 0
