"""LAMMPS's ``pair_style distmlip``: the plugin's overhead against distmlip's own MD, and 2 ranks
against 1.

Per family, on one system, ``--steps`` NVE steps (velocity Verlet, 2 fs, from 300 K velocities)
three ways, each in fresh processes, one torch thread per process (``OMP_NUM_THREADS=1``):

- ``mpirun -n 1 lmp`` with ``pair_style distmlip`` (``fix nve``; Verlet lists with ``neighbor SKIN
  bin``, checked every step: rebuilt once an atom moved more than half the skin);
- distmlip's own MD in one process: ASE's ``VelocityVerlet`` with ``DistributedCalculator(model,
  skin=SKIN)`` (the graph is built with cutoff + skin and reused until an atom moved more than half
  the skin: the same rule), 1 part;
- ``mpirun -n RANKS lmp``, the same input.

Times are of the steps only: LAMMPS's ``Loop time`` (its set-up, the first force evaluation with
the model's warm-up, is outside), and for ASE the ``run`` after one warm-up force call. CPU is
the processes' CPU time in that loop, summed over ranks (LAMMPS: the ranks' CPU time read from
/proc when LAMMPS prints its thermo header, after the set-up, and its ``Loop time``; MPICH's ranks
busy-wait in MPI calls, so a rank waiting for the other counts as busy).
The overhead is LAMMPS 1 rank / distmlip, the speedup LAMMPS 1 rank / LAMMPS RANKS ranks.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lammps.py [--families lj schnet sevennet ...]
        [--steps N] [--size S] [--ranks 2] [--skin 1.0] [--quick]
Writes bench/results/lammps.md (``--quick``: small systems, few steps, a check that everything
runs: printed only, unless ``--output``). Needs the plugin (``make lammps``: built here if missing)
and, per family, its package (sevenn, chgnet, mace, nequip, allegro, matgl, fairchem, mattersim,
orb_models); a family that cannot run is a row saying why. Families: Lennard-Jones and SchNet
(distmlip's reference models), SevenNet-0 and CHGNet 0.3.0 (pretrained, shipped in their
packages) and the random modules the LAMMPS tests run (tests/support/adapters.py: MACE, NequIP,
Allegro, TensorNet, M3GNet, UMA, MatterSim, Orb), each on FCC Cu of a size its speed allows.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's distmlip (its workers and lmp's get it too)
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
TIMESTEP_FS = 2.0
TEMPERATURE = 300.0

#: family -> (pair_style model, dtype, structure, full size, full steps, quick size, quick steps);
#: size: FCC Cu cubic cells per edge (4 atoms each) or rutile TiO2 cells (6 atoms each) as AxBxC;
#: model None: the small random module of the LAMMPS tests (``SAVED``), saved with ``torch.save``
#: (its file is the pair_style model); dtype "": the model's own
FAMILIES = {
    "lj": ("lj:epsilon=0.4,sigma=2.3,cutoff=5.0", "float64", "cu", "10", 200, "4", 20),
    "schnet": ("schnet:cutoff=5.0,num_interactions=3,hidden_channels=64", "float32", "cu", "10", 20,
               "4", 3),
    "sevennet": ("sevennet-0", "float32", "tio2", "4x4x8", 3, "2x2x3", 2),
    "chgnet": ("chgnet-0.3.0", "float32", "tio2", "4x4x8", 5, "2x2x3", 2),
    "mace": (None, "", "cu", "3", 3, "2", 1),
    "nequip": (None, "", "cu", "4", 5, "2", 2),
    "allegro": (None, "", "cu", "4", 5, "2", 2),
    "tensornet": (None, "", "cu", "6", 10, "3", 2),
    "m3gnet": (None, "", "cu", "6", 10, "3", 2),
    "uma": (None, "", "cu", "5", 5, "3", 2),
    "mattersim": (None, "", "cu", "6", 10, "3", 2),
    "orb": (None, "", "cu", "5", 5, "3", 2),
}
PACKAGES = {"sevennet": "sevenn", "chgnet": "chgnet", "mace": "mace", "nequip": "nequip",
            "allegro": "allegro", "tensornet": "matgl", "m3gnet": "matgl", "uma": "fairchem",
            "mattersim": "mattersim", "orb": "orb_models"}
#: family -> (builder in tests/support/adapters.py, its options): the LAMMPS tests' random modules
#: (tests/lammps/test_pair_style.py), saved as they are (M3GNet wrapped, MatterSim's inner M3Gnet)
SAVED = {
    "mace": ("make_mace", {}),
    "nequip": ("make_nequip", {}),
    "allegro": ("make_allegro", {}),
    "tensornet": ("make_matgl", {"arch": "TensorNet"}),
    "m3gnet": ("make_matgl", {"arch": "M3GNet"}),
    "uma": ("make_uma", {}),
    "mattersim": ("make_mattersim", {}),
    "orb": ("make_orb", {}),
}


def structure(kind: str, size: str):
    """The system: FCC Cu (``size`` cubic cells per edge) or rutile TiO2 (``size`` = AxBxC cells),
    rattled by 0.05 Å; orthogonal cells (LAMMPS's box is the cell as it is)."""
    import numpy as np
    from ase.build import bulk
    from ase.spacegroup import crystal

    if kind == "cu":
        n = int(size)
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    else:
        reps = tuple(int(x) for x in size.split("x"))
        atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                        cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat(reps)
    atoms.set_cell(np.diag(atoms.cell.lengths()))  # exactly orthogonal (LAMMPS's frame)
    atoms.rattle(0.05, seed=0)
    atoms.wrap()
    return atoms


INPUT = """\
units metal
atom_style atomic
atom_modify map array
read_data data.lmp
pair_style distmlip {model}
pair_coeff * * {elements}
neighbor {skin} bin
neigh_modify every 1 delay 0 check yes
velocity all create {temperature} 4928459 mom yes rot no dist gaussian
timestep {timestep}
fix md all nve
thermo {steps}
run {steps}
"""


def plugin() -> Path:
    """``build/lammps/distmlipplugin.so``, built if missing or out of date (``lammps/build.py``)."""
    spec = importlib.util.spec_from_file_location("distmlip_lammps_build", ROOT / "lammps" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def save_model(family: str, path: Path) -> None:
    """``torch.save`` the LAMMPS tests' random module of ``family`` (``SAVED``) at ``path``."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import distmlip

    from support import adapters

    builder, options = SAVED[family]
    module = getattr(adapters, builder)(**options)
    if family == "m3gnet":
        module = distmlip.wrap(module)  # matgl's Potential does not pickle; the wrapped model does
    elif family == "mattersim":
        module = module.model  # MatterSim's Potential does not pickle; its M3Gnet does
    torch.save(module, path)


def run_lammps(workdir: Path, so: Path, model: str, dtype: str, atoms, steps: int, skin: float,
               ranks: int, timeout: float) -> dict:
    """``mpirun -n ranks lmp`` on ``atoms``: wall and CPU seconds of the ``steps`` steps, neighbour
    list builds, the final potential energy, and the whole command's wall time."""
    from distmlip.drivers.lammps import mpich_lib_dir, write_lammps_data

    elements = sorted(set(atoms.get_chemical_symbols()))
    write_lammps_data(workdir / "data.lmp", atoms, elements, title="distmlip bench_lammps")
    (workdir / "in.lmp").write_text(INPUT.format(
        model=model + (f" dtype {dtype}" if dtype else ""), elements=" ".join(elements), skin=skin,
        temperature=TEMPERATURE, timestep=TIMESTEP_FS / 1000, steps=steps))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path,
               LD_LIBRARY_PATH=str(mpich_lib_dir()), LAMMPS_PLUGIN_PATH=str(so.parent))
    cmd = [str(BIN / "mpirun"), "-n", str(ranks), str(BIN / "lmp"), "-in", "in.lmp", "-log", "log.lammps",
           "-nocite"]
    t0 = time.perf_counter()
    with open(workdir / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                bufsize=1)
        lines, marks = [], {}
        try:
            for line in proc.stdout:  # LAMMPS flushes its thermo lines: the loop's start and end
                lines.append(line)
                if "header" not in marks and re.match(r"\s*Step\s", line):
                    marks["header"] = _tree_cpu(proc.pid)
                elif line.startswith("Loop time"):
                    marks["loop"] = _tree_cpu(proc.pid)
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    total = time.perf_counter() - t0
    out = "".join(lines)
    loop = re.search(r"Loop time of ([\d.eE+-]+) on (\d+) procs for (\d+) steps", out)
    if proc.returncode != 0 or loop is None:
        error = next((line for line in (out + stderr).splitlines() if "ERROR" in line),
                     (out + stderr)[-500:])
        raise RuntimeError(f"lmp on {ranks} rank(s) failed (exit {proc.returncode}): {error}")
    builds = re.search(r"Neighbor list builds = (\d+)", out)
    thermo = [line.split() for line in out.splitlines() if re.match(rf"\s+{steps}\s", line)]
    cpu = marks["loop"] - marks["header"] if len(marks) == 2 else float("nan")
    return {"wall": float(loop.group(1)), "cpu": cpu, "builds": int(builds.group(1)) if builds else -1,
            "total": total, "pe": float(thermo[-1][2]) if thermo else float("nan")}


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``'s descendants (mpirun's ranks: LAMMPS's
    own ``% CPU use`` counts less than the ranks' CPU time here, about half with the model's
    Python in the rank)."""
    import psutil

    total = 0.0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def worker(job: dict) -> dict:
    """distmlip's own MD (one process): ASE's VelocityVerlet with ``DistributedCalculator``; or
    (``job["save"]``) the family's random module saved there."""
    if "save" in job:
        save_model(job["family"], Path(job["save"]))
        return {"saved": job["save"]}
    import numpy as np
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from distmlip import DistributedCalculator
    from distmlip.models.registry import load_spec

    torch.set_num_threads(1)
    atoms = structure(job["kind"], job["size"])
    atoms.calc = DistributedCalculator(load_spec(job["model"]), dtype=job["dtype"] or None,
                                       skin=job["skin"])
    MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    atoms.get_forces()  # warm-up (LAMMPS's set-up evaluates once before its loop, too)
    builds = atoms.calc.graph_builds
    t0, c0 = time.perf_counter(), time.process_time()
    dyn.run(job["steps"])
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "builds": atoms.calc.graph_builds - builds, "pe": float(atoms.get_potential_energy()),
            "peak": harness.peak_gb()}


def bench_family(family: str, args, so: Path) -> dict:
    """The three runs of one family: {"atoms", "steps", "one", "ase", "many"} or {"error"}."""
    model, dtype, kind, size, steps, quick_size, quick_steps = FAMILIES[family]
    size = args.size or (quick_size if args.quick else size)
    steps = args.steps or (quick_steps if args.quick else steps)
    row = {"family": family, "size": size, "steps": steps}
    package = PACKAGES.get(family)
    if package and importlib.util.find_spec(package) is None:
        return {**row, "error": f"{package} is not installed"}
    atoms = structure(kind, size)
    row["atoms"] = len(atoms)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_lammps_") as tmp:
            if model is None:
                model = str(Path(tmp) / f"{family}.pt")
                harness.launch(__file__, {"family": family, "save": model}, timeout=args.timeout)
            for key, ranks in (("one", 1), ("many", args.ranks)):
                run = Path(tmp) / key
                run.mkdir()
                row[key] = run_lammps(run, so, model, dtype, atoms, steps, args.skin, ranks,
                                      args.timeout)
                row[f"load_{key}"] = os.getloadavg()[0]
            row["ase"] = harness.launch(__file__, {"family": family, "kind": kind, "size": size,
                                                   "steps": steps, "skin": args.skin, "model": model,
                                                   "dtype": dtype}, timeout=args.timeout)
            row["load_ase"] = os.getloadavg()[0]
    except (RuntimeError, subprocess.TimeoutExpired, harness.WorkerFailed) as exc:
        row["error"] = harness.failure(exc)
    return row


def table(rows: list[dict], ranks: int) -> list[str]:
    lines = [f"| family | atoms | steps | LAMMPS 1 rank ms/step (CPU) | distmlip ASE MD ms/step (CPU) | "
             f"overhead (LAMMPS / distmlip) | LAMMPS {ranks} ranks ms/step (CPU, summed) | "
             f"speedup {ranks} vs 1 rank | neighbour builds (LAMMPS 1 / distmlip) | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('atoms', '–')} | {r['steps']} | {r['error']} "
                         "| | | | | | |")
            continue
        one, ase, many, n = r["one"], r["ase"], r["many"], r["steps"]

        def ms(x):
            return f"{1000 * x['wall'] / n:.1f} ({1000 * x['cpu'] / n:.1f})"

        lines.append(
            f"| {r['family']} | {r['atoms']:,} | {n} | {ms(one)} | {ms(ase)} | "
            f"{one['wall'] / ase['wall']:.2f}x | {ms(many)} | {one['wall'] / many['wall']:.2f}x | "
            f"{one['builds']} / {ase['builds']} | {r['load_one']:.1f} / {r['load_ase']:.1f} / "
            f"{r['load_many']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=None, help="MD steps (default: per family)")
    parser.add_argument("--size", default=None,
                        help="system size: Cu cells per edge (lj, schnet) or TiO2 AxBxC (default: per family)")
    parser.add_argument("--ranks", type=int, default=2, help="LAMMPS ranks of the speedup (default 2)")
    parser.add_argument("--skin", type=float, default=1.0,
                        help="neighbour skin, Å, of both LAMMPS and distmlip (default 1.0)")
    parser.add_argument("--quick", action="store_true", help="small systems, few steps: a check")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--output", default=None,
                        help="markdown file (default bench/results/lammps.md; --quick: none)")
    args = parser.parse_args()
    output = Path(args.output) if args.output else None if args.quick else RESULTS / "lammps.md"
    import platform

    import torch

    so = plugin()
    start = harness.uptime()
    t0 = time.perf_counter()
    rows = []
    for family in harness.progress(args.families, "families"):
        rows.append(bench_family(family, args, so))
        print(table(rows[-1:], args.ranks)[-1], flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lammps.py", *sys.argv[1:]])
    lines = [
        "## LAMMPS `pair_style distmlip`: plugin overhead and 2 ranks vs 1", "",
        f"Command: `{command}` (commit {harness.git_head()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"total {time.perf_counter() - t0:.0f} s)", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}, one torch thread per process. Load at the start: {start}; at the end: "
        f"{harness.uptime()}.", "",
        f"NVE, velocity Verlet, {TIMESTEP_FS:g} fs, velocities drawn at {TEMPERATURE:g} K (LAMMPS's and "
        f"ASE's draws differ), skin {args.skin:g} Å on both sides (rebuild once an atom moved more "
        "than half of it). Systems: rutile TiO2 (sevennet, chgnet) and FCC Cu (the others), rattled "
        "0.05 Å. Models: lj = Lennard-Jones (epsilon 0.4 eV, sigma 2.3 Å, 5 Å) float64; schnet = "
        "SchNet (64 channels, 3 interactions, 5 Å, random weights) float32; sevennet = SevenNet-0 "
        "(pretrained, shipped in sevenn) float32; chgnet = CHGNet 0.3.0 (pretrained, shipped in chgnet) "
        "float32; mace, nequip, allegro, tensornet, m3gnet, uma, mattersim, orb: the small random "
        "modules of the LAMMPS tests (tests/support/adapters.py; MACE, NequIP and Allegro float64, "
        "the others float32), saved with torch.save, in their own precision.", "",
        "ms/step: wall time of the steps (LAMMPS's `Loop time`, the set-up with the first force "
        "evaluation excluded; distmlip: `VelocityVerlet.run` after a warm-up call) per step; CPU in "
        "brackets, summed over ranks (MPICH busy-waits: a waiting rank counts as busy). overhead: "
        "LAMMPS 1 rank / distmlip (target <= 1.1x); speedup: LAMMPS 1 rank / LAMMPS "
        f"{args.ranks} ranks (target >= 1.8x on the larger systems). load: the 1-minute load "
        "average after the LAMMPS 1-rank, the distmlip and the LAMMPS multi-rank run.", "",
        *table(rows, args.ranks), "",
    ]
    if output is None:
        print("\n".join(lines))
    else:
        harness.write_result(output, lines)


if __name__ == "__main__":
    harness.main_or_worker(main, worker)
