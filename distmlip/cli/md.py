"""``distmlip md``: restartable molecular dynamics with a progress bar, a log, a trajectory and plots.

A run directory holds ``trajectory.extxyz`` (every ``--write-every`` steps and the last),
``log.csv`` (every ``--log-every`` steps and the last), ``checkpoint.npz`` (with every frame written
and at the end) and, with ``--plot``, ``energy.png``, ``temperature.png``, ``pressure.png``.

The checkpoint holds the positions, momenta, cell, masses, the structure's constraints (FixAtoms,
FixCartesian, ...), ``info`` and other per-atom arrays (charges, magnetic moments, tags), the step,
the run's settings, the random state of the Langevin thermostat, the state of the MTK barostat and
thermostat and the sizes of the log and trajectory when it was written. It is
written to a temporary file, flushed, synced and renamed over the old one, so a crash leaves the
previous checkpoint whole; ``--restart DIR`` truncates the log and trajectory to the sizes it
records (dropping rows a crash left after it) and continues exactly: the same steps run with the
same numbers as in an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._common import (
    CLIError,
    add_calculator_options,
    add_model_option,
    build_calculator,
    calculator_kwargs,
    check_writable_dir,
    is_root,
    load_model,
    parse_supercell,
    read_structure,
    repeat_structure,
)

__all__ = ["CHECKPOINT", "LOG_COLUMNS", "MDSettings", "add_parser", "load_checkpoint", "plot_run",
           "run_md"]

CHECKPOINT = "checkpoint.npz"
LOG = "log.csv"
TRAJECTORY = "trajectory.extxyz"
LOG_COLUMNS = ("step", "time_ps", "epot", "ekin", "etot", "temperature_K", "pressure_GPa", "volume_A3",
               "seconds_per_step", "atom_steps_per_s")
ENSEMBLES = ("nve", "nvt", "npt")
#: npt barostats: berendsen (weak coupling, isotropic: relaxes the volume, does not sample NPT);
#: mtk (Martyna-Tobias-Klein with Nosé-Hoover chains, all 9 cell degrees of freedom) and mtk-iso
#: (MTK, isotropic volume only) sample the isothermal-isobaric ensemble
BAROSTATS = ("berendsen", "mtk", "mtk-iso")


@dataclass(frozen=True)
class MDSettings:
    """The physics of a run (kept in its checkpoint; a restart cannot change them).

    Units: timestep fs, temperature K, friction 1/ps (Langevin), pressure GPa, taut/taup fs (the
    thermostat and barostat times: Berendsen's, or MTK's tdamp/pdamp), compressibility 1/GPa
    (Berendsen NPT only). ``barostat``: one of ``BAROSTATS`` (npt only)."""

    model: str
    ensemble: str = "nve"
    timestep_fs: float = 1.0
    temperature_K: float = 300.0
    seed: int = 0
    friction_per_ps: float = 1.0
    pressure_GPa: float = 0.0
    taut_fs: float = 100.0
    taup_fs: float = 1000.0
    compressibility_per_GPa: float = 0.01
    barostat: str = "berendsen"

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise CLIError(f"--ensemble: expected one of {list(ENSEMBLES)}, got {self.ensemble!r}")
        if self.barostat not in BAROSTATS:
            raise CLIError(f"--barostat: expected one of {list(BAROSTATS)}, got {self.barostat!r}")
        for flag, value in (("--timestep", self.timestep_fs), ("--friction", self.friction_per_ps),
                            ("--taut", self.taut_fs), ("--taup", self.taup_fs),
                            ("--compressibility", self.compressibility_per_GPa)):
            if not (math.isfinite(value) and value > 0):
                raise CLIError(f"{flag}: expected a positive number, got {value!r}")
        if not (math.isfinite(self.temperature_K) and self.temperature_K >= 0):
            raise CLIError(f"--temperature: expected a number of K >= 0, got {self.temperature_K!r}")
        if not math.isfinite(self.pressure_GPa):
            raise CLIError(f"--pressure: expected a finite number of GPa, got {self.pressure_GPa!r}")
        if self.mtk and self.temperature_K <= 0:
            raise CLIError(f"--temperature: the {self.barostat} barostat needs a temperature > 0 K (its "
                           f"thermostat and barostat masses scale with kT), got {self.temperature_K!r}")

    @property
    def mtk(self) -> bool:
        """Whether the run is NPT with an MTK barostat (Nosé-Hoover chains, checkpointed state)."""
        return self.ensemble == "npt" and self.barostat.startswith("mtk")


def make_dynamics(atoms, s: MDSettings):
    """The ASE integrator for ``s`` and its random generator (``None`` when it draws nothing).

    nve: velocity Verlet; nvt: Langevin (friction ``s.friction_per_ps``); npt with barostat
    berendsen: Berendsen thermostat and barostat, which rescales the cell from the stress
    (isotropic); npt with mtk / mtk-iso: ASE's ``MTKNPT`` / ``IsotropicMTKNPT`` (Nosé-Hoover chain
    thermostat, time ``taut``; MTK barostat, time ``taup``), which sample the NPT ensemble."""
    from ase import units
    from ase.parallel import DummyMPI

    dt = s.timestep_fs * units.fs
    if s.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt), None
    if s.ensemble == "nvt":
        from ase.md.langevin import Langevin

        rng = np.random.default_rng([s.seed, 1])
        # every rank draws the same numbers from the same seed: no broadcast (DummyMPI)
        return Langevin(atoms, timestep=dt, temperature_K=s.temperature_K, fixcm=False, rng=rng,
                        friction=s.friction_per_ps / (1000 * units.fs), comm=DummyMPI()), rng
    if atoms.cell.rank < 3 or not atoms.pbc.all():
        raise CLIError("--ensemble: npt needs a periodic cell with three lattice vectors, got "
                       f"pbc={atoms.pbc.tolist()}; use nve or nvt for molecules and slabs")
    if s.mtk:
        from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

        if atoms.constraints:
            names = sorted({type(c).__name__ for c in atoms.constraints})
            raise CLIError(f"--barostat: {s.barostat} (ASE's MTK integrator) does not support "
                           f"constraints, got {', '.join(names)} from the structure; use "
                           f"--barostat berendsen, or remove the constraints")
        cls = MTKNPT if s.barostat == "mtk" else IsotropicMTKNPT
        return cls(atoms, timestep=dt, temperature_K=s.temperature_K,
                   pressure_au=s.pressure_GPa * units.GPa, tdamp=s.taut_fs * units.fs,
                   pdamp=s.taup_fs * units.fs), None
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(atoms, timestep=dt, temperature_K=s.temperature_K,
                        pressure_au=s.pressure_GPa * units.GPa, taut=s.taut_fs * units.fs,
                        taup=s.taup_fs * units.fs, fixcm=False,
                        compressibility_au=s.compressibility_per_GPa / units.GPa), None


#: the state of ASE's MTK integrators beyond positions, momenta and cell: attribute paths
_MTK_STATE = {"mtk": ("_p_g", "_thermostat._eta", "_thermostat._p_eta", "_barostat._xi",
                      "_barostat._p_xi"),
              "mtk-iso": ("_eps", "_p_eps", "_cell0", "_volume0", "_thermostat._eta",
                          "_thermostat._p_eta", "_barostat._xi", "_barostat._p_xi")}


def dynamics_state(dyn, settings: MDSettings) -> dict | None:
    """What ``dyn`` holds beyond the atoms (MTK: cell momenta, thermostat and barostat chains), as
    ``{path: array}``; ``{}`` for integrators that hold nothing; ``None`` if this ASE's MTK
    integrator keeps its state elsewhere (a restart is then refused, not done wrong)."""
    if not settings.mtk:
        return {}
    out = {}
    for path in _MTK_STATE[settings.barostat]:
        obj = dyn
        for name in path.split("."):
            if not hasattr(obj, name):
                return None
            obj = getattr(obj, name)
        out[path] = np.array(obj, dtype=float)
    return out


def restore_dynamics_state(dyn, settings: MDSettings, state: dict | None) -> None:
    """Put a checkpoint's ``dynamics_state`` back into a new integrator."""
    if not settings.mtk:
        return
    paths = _MTK_STATE[settings.barostat]
    if state is None or sorted(state) != sorted(paths):
        raise CLIError(f"--restart: this run's {settings.barostat} barostat state is not in its "
                       f"checkpoint (this ASE's MTK integrator keeps it elsewhere), so it cannot "
                       f"continue exactly; start a new run from its last frame instead")
    for path in paths:
        *parents, name = path.split(".")
        obj = dyn
        for parent in parents:
            obj = getattr(obj, parent)
        old = getattr(obj, name)
        value = state[path]
        setattr(obj, name, float(value) if np.ndim(old) == 0 else value.reshape(np.shape(old)).copy())


def _structure_meta(atoms) -> dict:
    """Constraints and ``info`` of ``atoms`` as JSON text (ASE's encoding); ``info`` entries JSON
    cannot hold are left out (named in ``dropped_info``)."""
    from ase.io.jsonio import encode

    info, dropped = {}, []
    for key, value in atoms.info.items():
        try:
            encode(value)
        except (TypeError, ValueError):
            dropped.append(str(key))
            continue
        info[str(key)] = value
    return {"constraints": encode([c.todict() for c in atoms.constraints]), "info": encode(info),
            "dropped_info": dropped}


def _restore_structure(atoms, meta: dict) -> None:
    from ase.constraints import dict2constraint
    from ase.io.jsonio import decode

    if meta.get("constraints"):
        atoms.set_constraint([dict2constraint(d) for d in decode(meta["constraints"])])
    if meta.get("info"):
        atoms.info.update(decode(meta["info"]))


#: per-atom arrays the checkpoint stores as such; every other numeric array goes in as ``array:NAME``
_STANDARD_ARRAYS = ("numbers", "positions", "momenta", "masses")


# ----------------------------------------------------------------------------- checkpoints
def write_checkpoint(path: Path, atoms, step: int, settings: MDSettings, rng, sizes: dict,
                     calculator: dict, output: dict, dynamics: dict | None = None) -> None:
    """Write the checkpoint atomically: a temporary file, flushed and synced, then renamed.
    ``calculator``: the calculator options; ``output``: ``write_every`` and ``log_every``;
    ``dynamics``: the integrator's own state (``dynamics_state``)."""
    meta = {"format": 2, "step": int(step), "settings": dataclasses.asdict(settings),
            "rng": None if rng is None else rng.bit_generator.state, "sizes": sizes,
            "calculator": calculator, "output": output, **_structure_meta(atoms),
            "dynamics": None if dynamics is None else sorted(dynamics)}
    extra = {f"array:{k}": v for k, v in atoms.arrays.items()
             if k not in _STANDARD_ARRAYS and np.issubdtype(v.dtype, np.number)}
    state = {f"dynamics:{k}": v for k, v in (dynamics or {}).items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _savez(f, positions=atoms.positions, momenta=atoms.get_momenta(), cell=atoms.cell.array,
               pbc=atoms.pbc, numbers=atoms.numbers, masses=atoms.get_masses(),
               meta=np.array(json.dumps(meta)), **extra, **state)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def _savez(f, **arrays) -> None:  # one seam, so tests can crash a write half-way
    np.savez(f, **arrays)


def load_checkpoint(directory: Path) -> dict:
    """The checkpoint in ``directory``: ``atoms`` (with momenta, constraints, ``info`` and the
    other per-atom arrays), ``step``, ``settings``, ``rng`` (a bit-generator state or None),
    ``sizes``, ``calculator``, ``output``, ``dynamics`` (the integrator's state, see
    ``dynamics_state``)."""
    from ase import Atoms

    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise CLIError(f"--restart: expected a run directory holding {CHECKPOINT}, got "
                       f"{str(directory)!r}, which has none; start a run with --output DIR first")
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            atoms = Atoms(numbers=z["numbers"], positions=z["positions"], cell=z["cell"],
                          pbc=z["pbc"], masses=z["masses"])
            for key in z.files:
                if key.startswith("array:"):
                    atoms.set_array(key[len("array:"):], z[key])
            _restore_structure(atoms, meta)
            atoms.set_momenta(z["momenta"], apply_constraint=False)
            dynamics = None
            if meta.get("dynamics") is not None:
                dynamics = {k: z[f"dynamics:{k}"] for k in meta["dynamics"]}
            elif meta.get("format", 1) < 2:  # written before the MTK barostat existed
                dynamics = {}
    except Exception as exc:  # noqa: BLE001 - any damage
        raise CLIError(f"--restart: expected a readable {CHECKPOINT} in {str(directory)!r}, got "
                       f"{type(exc).__name__}: {exc}") from None
    return {"atoms": atoms, "step": meta["step"], "settings": MDSettings(**meta["settings"]),
            "rng": meta["rng"], "sizes": meta["sizes"], "calculator": meta["calculator"],
            "output": meta["output"], "dynamics": dynamics}


# ----------------------------------------------------------------------------- outputs
class _Outputs:
    """The log and trajectory of rank 0 (other ranks hold no files)."""

    def __init__(self, directory: Path, sizes: dict | None):
        self.log_path, self.traj_path = directory / LOG, directory / TRAJECTORY
        if sizes is None:  # a new run
            for p in (self.log_path, self.traj_path):
                p.unlink(missing_ok=True)
        else:  # a restart: drop what was written after the checkpoint
            for p, size in ((self.log_path, sizes["log"]), (self.traj_path, sizes["trajectory"])):
                if not p.exists() or p.stat().st_size < size:
                    raise CLIError(f"--restart: {p} is shorter than its checkpoint records "
                                   f"({size} bytes); the run directory was modified")
                os.truncate(p, size)
        self.columns = LOG_COLUMNS
        if sizes is not None and sizes["log"] > 0:  # a run from an older version: its own columns
            with open(self.log_path, newline="") as f:
                self.columns = tuple(next(csv.reader(f)))
        self.log = open(self.log_path, "a", newline="")
        self.traj = open(self.traj_path, "a")
        self.writer = csv.writer(self.log)
        if self.log.tell() == 0:
            self.writer.writerow(LOG_COLUMNS)

    def row(self, values: dict) -> None:
        self.writer.writerow([_fmt(values.get(c, float("nan"))) for c in self.columns])

    def frame(self, atoms, step: int, time_ps: float) -> None:
        import ase.io
        from ase.calculators.singlepoint import SinglePointCalculator

        frame = atoms.copy()  # constraints and info too (extxyz: move_mask and comment line)
        # the model's forces, as ase.io.Trajectory stores them (reading applies the constraints)
        results = {"energy": atoms.get_potential_energy(),
                   "forces": atoms.get_forces(apply_constraint=False)}
        if atoms.cell.rank == 3:
            results["stress"] = atoms.get_stress()
        frame.calc = SinglePointCalculator(frame, **results)
        frame.info.update(step=int(step), time_ps=float(time_ps))
        ase.io.write(self.traj, frame, format="extxyz", parallel=False)

    def sync(self) -> dict:
        """Flush and sync both files; their sizes (what a checkpoint records)."""
        for f in (self.log, self.traj):
            f.flush()
            os.fsync(f.fileno())
        return {"log": self.log.tell(), "trajectory": self.traj.tell()}

    def close(self) -> None:
        self.log.close()
        self.traj.close()


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return "nan" if not math.isfinite(v) else repr(float(v))


def _observables(atoms) -> tuple[float, float, float, float, float]:
    """Epot, Ekin (eV), T (K), P (GPa, with the kinetic term), V (Å^3); P and V nan without a
    full cell."""
    from ase import units

    epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
    pressure = volume = float("nan")
    if atoms.cell.rank == 3:
        pressure = -float(np.mean(atoms.get_stress(include_ideal_gas=True)[:3])) / units.GPa
        volume = float(atoms.get_volume())
    return epot, ekin, atoms.get_temperature(), pressure, volume


# ----------------------------------------------------------------------------- the loop
def run_md(atoms, calc, settings: MDSettings, directory, steps: int, *, write_every: int = 100,
           log_every: int = 1, checkpoint: dict | None = None, progress: bool = True,
           calculator_options: dict | None = None) -> dict:
    """Run (or continue, from ``checkpoint``) MD until ``steps`` steps in total.

    ``atoms`` must hold the initial momenta; only rank 0 (``calc.rank``) writes and prints, every
    rank steps identically. Returns a summary (``steps_run``, ``seconds``, ``ns_per_day``,
    ``atom_steps_per_s``, ``graph_builds``, the final ``epot``/``etot``/``temperature_K``)."""
    directory = Path(directory)
    for flag, value in (("--write-every", write_every), ("--log-every", log_every)):
        if value < 1:
            raise CLIError(f"{flag}: expected an integer >= 1, got {value}")
    if steps < 0:
        raise CLIError(f"--steps: expected an integer >= 0, got {steps}")
    atoms.calc = calc
    dyn, rng = make_dynamics(atoms, settings)
    start = 0 if checkpoint is None else checkpoint["step"]
    if checkpoint is not None:
        if rng is not None and checkpoint["rng"] is not None:
            rng.bit_generator.state = checkpoint["rng"]
        restore_dynamics_state(dyn, settings, checkpoint.get("dynamics", {}))
    root = calc.rank == 0
    natoms = len(atoms)
    dt_ps = settings.timestep_fs / 1000.0
    t0 = time.perf_counter()
    obs = _observables(atoms)  # the first evaluation: model errors surface before any file
    out = _Outputs(directory, None if checkpoint is None else checkpoint["sizes"]) if root else None
    options = calculator_options or {}

    def save(step):
        if root:
            write_checkpoint(directory / CHECKPOINT, atoms, step, settings, rng, out.sync(), options,
                             {"write_every": write_every, "log_every": log_every},
                             dynamics_state(dyn, settings))

    def row(step, values, seconds_per_step):
        epot, ekin, temp, pressure, volume = values
        rate = natoms / seconds_per_step if seconds_per_step > 0 else float("nan")
        out.row({"step": step, "time_ps": step * dt_ps, "epot": epot, "ekin": ekin, "etot": epot + ekin,
                 "temperature_K": temp, "pressure_GPa": pressure, "volume_A3": volume,
                 "seconds_per_step": seconds_per_step, "atom_steps_per_s": rate})

    def record(step, seconds_per_step):
        values = _observables(atoms)
        if root:
            row(step, values, seconds_per_step)
        return values[:3]

    if checkpoint is None:
        if root:
            row(0, obs, float("nan"))
            out.frame(atoms, 0, 0.0)
        save(0)
    bar = None
    if root and progress and steps > start:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
    t_run = last_time = time.perf_counter()
    last_step = start
    try:
        for step in range(start + 1, steps + 1):
            dyn.step()
            final = step == steps
            if step % log_every == 0 or step % write_every == 0 or final:
                now = time.perf_counter()
                epot, ekin, temp = record(step, (now - last_time) / (step - last_step))
                last_time, last_step = now, step
                if bar is not None:
                    rate = (step - start) / (now - t_run)
                    bar.set_postfix_str(f"T={temp:.0f} K, Etot={epot + ekin:.4f} eV, "
                                        f"{rate * settings.timestep_fs * 86400e-6:.3g} ns/day, "
                                        f"{rate * natoms:.3g} atom-steps/s", refresh=False)
            if step % write_every == 0 or final:
                if root:
                    out.frame(atoms, step, step * dt_ps)
                save(step)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if out is not None:
            out.close()
    seconds = time.perf_counter() - t_run
    ran = steps - start if steps > start else 0
    rate = ran / seconds if ran and seconds > 0 else float("nan")
    epot, ekin, temp, _, _ = _observables(atoms)
    return {"steps_run": ran, "step": max(steps, start), "seconds": seconds,
            "setup_seconds": t_run - t0, "ns_per_day": rate * settings.timestep_fs * 86400e-6,
            "atom_steps_per_s": rate * natoms, "graph_builds": getattr(calc, "graph_builds", None),
            "epot": epot, "etot": epot + ekin, "temperature_K": temp}


# ----------------------------------------------------------------------------- plots
def plot_run(directory) -> list[Path]:
    """``energy.png``, ``temperature.png``, ``pressure.png`` and, when the volume changed (npt),
    ``volume.png`` from ``directory/log.csv``."""
    from matplotlib.figure import Figure

    directory = Path(directory)
    path = directory / LOG
    if not path.is_file():
        raise CLIError(f"--plot: expected a run directory holding {LOG}, got {str(directory)!r}")
    data = np.genfromtxt(path, delimiter=",", names=True)
    data = np.atleast_1d(data)
    t = data["time_ps"]
    written = []
    panels = [("energy.png", "energy (eV)", [("epot", "potential"), ("ekin", "kinetic"), ("etot", "total")]),
              ("temperature.png", "temperature (K)", [("temperature_K", None)]),
              ("pressure.png", "pressure (GPa)", [("pressure_GPa", None)]),
              ("volume.png", "volume (Å³)", [("volume_A3", None)])]
    for name, label, series in panels:
        if any(col not in data.dtype.names for col, _ in series):
            continue  # a log from an older version
        if all(np.isnan(data[col]).all() for col, _ in series):
            continue  # e.g. no pressure without a periodic cell
        if name == "volume.png" and np.ptp(data["volume_A3"]) == 0:
            continue  # constant volume: nothing to see
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (col, title) in zip(axes, series, strict=True):
            ax.plot(t, data[col], lw=1)
            ax.set_ylabel(label if title is None else f"{title} (eV)")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("time (ps)")
        fig.suptitle(f"{directory.name or directory}: {label.split(' (')[0]}")
        fig.savefig(directory / name, dpi=110)
        written.append(directory / name)
    return written


# ----------------------------------------------------------------------------- the command
PHYSICS = {"structure": None, "model": None, "ensemble": "ensemble", "timestep": "timestep_fs",
           "temperature": "temperature_K", "seed": "seed", "friction": "friction_per_ps",
           "pressure": "pressure_GPa", "taut": "taut_fs", "taup": "taup_fs",
           "compressibility": "compressibility_per_GPa", "barostat": "barostat", "supercell": None}


def add_parser(sub) -> None:
    p = sub.add_parser("md", help="molecular dynamics (restartable), with progress, log, trajectory, plots",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("structure", nargs="?", metavar="STRUCTURE",
                   help="structure file (CIF, POSCAR, extxyz, ...; the last frame of a trajectory)")
    add_model_option(p, required=False)
    p.add_argument("--steps", type=int, default=None, help="steps in total (with --restart too)")
    p.add_argument("--timestep", type=float, default=None, help="fs (default 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="K (default 300): initial Maxwell-Boltzmann velocities and thermostat target")
    p.add_argument("--ensemble", choices=ENSEMBLES, default=None,
                   help="nve: velocity Verlet (default); nvt: Langevin; npt: constant pressure (uses the "
                        "stress; --barostat)")
    p.add_argument("--barostat", choices=BAROSTATS, default=None,
                   help="npt: berendsen (default; isotropic weak coupling, relaxes the volume but does "
                        "not sample NPT), mtk (Martyna-Tobias-Klein + Nosé-Hoover chains, full cell: "
                        "samples NPT) or mtk-iso (MTK, isotropic volume)")
    p.add_argument("--friction", type=float, default=None, help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--pressure", type=float, default=None, help="npt target pressure, GPa (default 0)")
    p.add_argument("--taut", type=float, default=None,
                   help="npt thermostat time, fs (default 100; MTK: the Nosé-Hoover tdamp)")
    p.add_argument("--taup", type=float, default=None,
                   help="npt barostat time, fs (default 1000; MTK: pdamp)")
    p.add_argument("--compressibility", type=float, default=None,
                   help="npt berendsen compressibility, 1/GPa (default 0.01, ~1/bulk modulus of a solid)")
    p.add_argument("--supercell", default=None, metavar="AxBxC", help="repeat the structure, e.g. 4x4x4")
    p.add_argument("--seed", type=int, default=None, help="random seed (velocities, Langevin); default 0")
    p.add_argument("--write-every", type=int, default=None, metavar="K",
                   help="trajectory frame and checkpoint every K steps and at the last (default 100)")
    p.add_argument("--log-every", type=int, default=None, metavar="L",
                   help="log.csv row every L steps (default 1)")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="run directory (default md-run)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a DIR holding a run")
    p.add_argument("--restart", default=None, metavar="DIR",
                   help="continue the run in DIR to --steps in total, from its checkpoint")
    p.add_argument("--plot", action="store_true", help="energy/temperature/pressure PNGs at the end")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_calculator_options(p)
    p.set_defaults(func=command)


def command(args) -> int:
    if args.restart is not None:
        given = [k for k in PHYSICS if getattr(args, k) is not None]
        if given:
            flag = "STRUCTURE" if given[0] == "structure" else f"--{given[0]}"
            raise CLIError(f"{flag}: cannot change when restarting (the run's settings are in its "
                           f"checkpoint); start a new run with --output to change them")
        if args.output is not None and Path(args.output).resolve() != Path(args.restart).resolve():
            raise CLIError(f"--output: a restart continues in its own directory ({args.restart!r}), "
                           f"got {args.output!r}; omit --output")
        if args.steps is None:
            raise CLIError("--steps: expected the total number of steps to continue to, got none")
        directory = Path(args.restart)
        state = load_checkpoint(directory)
        settings, atoms = state["settings"], state["atoms"]
        options = {**state["calculator"], **calculator_kwargs(args)}
        output = state["output"]
    else:
        if args.structure is None:
            raise CLIError("STRUCTURE: expected a structure file (or --restart DIR), got none")
        if args.model is None:
            raise CLIError("--model: expected a model name or file (see `distmlip models`), got none")
        values = {field: getattr(args, k) for k, field in PHYSICS.items()
                  if field is not None and getattr(args, k) is not None}
        settings = MDSettings(model=_model_spec(args.model), **values)
        _check_npt_options(args, settings)
        if args.steps is None:
            raise CLIError("--steps: expected the number of steps to run, got none")
        supercell = parse_supercell(args.supercell)
        directory = Path(args.output or "md-run")
        if (directory / CHECKPOINT).exists() and not args.overwrite:
            raise CLIError(f"--output: {str(directory)!r} already holds a run ({CHECKPOINT}); "
                           f"continue it with --restart {directory}, or pass --overwrite")
        atoms = repeat_structure(read_structure(args.structure), supercell)
        dropped = _structure_meta(atoms)["dropped_info"]
        if dropped and is_root():
            print(f"distmlip md: note: info entries {dropped} are not JSON: the frames and checkpoints "
                  f"leave them out", file=sys.stderr)
        initial_velocities(atoms, settings.temperature_K, settings.seed)
        state = None
        options = calculator_kwargs(args)
        output = {"write_every": 100, "log_every": 1}
    output = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in output.items()}
    model = load_model(settings.model)
    calc = build_calculator(model, options)
    check_writable_dir(str(directory), "--restart" if state is not None else "--output")
    say = print if calc.rank == 0 else (lambda *a, **k: None)
    ensemble = settings.ensemble + (f" ({settings.barostat})" if settings.ensemble == "npt" else "")
    fixed = _constraint_summary(atoms)
    say(f"distmlip md: {len(atoms)} atoms ({atoms.get_chemical_formula()}{fixed}), {settings.model}, "
        f"{ensemble} {settings.timestep_fs} fs at {settings.temperature_K} K; "
        f"{calc.num_partitions} part(s) ({calc.partitioner}, {calc.mode}), backend {calc.backend}, "
        f"{calc.world_size} process(es)")
    if state is not None:
        say(f"restarting from step {state['step']} in {directory}")
    summary = run_md(atoms, calc, settings, directory, args.steps, **output, checkpoint=state,
                     progress=not args.quiet, calculator_options=options)
    if summary["steps_run"]:
        say(f"{summary['steps_run']} steps in {summary['seconds']:.2f} s: "
            f"{summary['seconds'] / summary['steps_run']:.3g} s/step, {summary['ns_per_day']:.3g} ns/day, "
            f"{summary['atom_steps_per_s']:.3g} atom-steps/s; graph built "
            f"{summary['graph_builds']} time{'' if summary['graph_builds'] == 1 else 's'}")
    else:
        say(f"the run in {directory} is already at step {summary['step']} >= --steps {args.steps}; "
            f"nothing to do")
    say(f"step {summary['step']}: Epot {summary['epot']:.6f} eV, Etot {summary['etot']:.6f} eV, "
        f"T {summary['temperature_K']:.1f} K; wrote {directory / LOG}, {directory / TRAJECTORY}, "
        f"{directory / CHECKPOINT}")
    if args.plot and calc.rank == 0:
        for path in plot_run(directory):
            say(f"wrote {path}")
    return 0


def _check_npt_options(args, settings: MDSettings) -> None:
    """Options that would be silently ignored are refused."""
    if args.barostat is not None and settings.ensemble != "npt":
        raise CLIError(f"--barostat: only npt has a barostat, got --ensemble {settings.ensemble}; "
                       f"pass --ensemble npt or drop --barostat")
    if args.compressibility is not None and settings.barostat != "berendsen":
        raise CLIError(f"--compressibility: only the berendsen barostat uses it, got --barostat "
                       f"{settings.barostat} (whose barostat time is --taup)")


def _constraint_summary(atoms) -> str:
    """``", 3 fixed"``: what the structure's constraints hold (FixAtoms: the atoms; others by name)."""
    from ase.constraints import FixAtoms

    if not atoms.constraints:
        return ""
    fixed = sum(len(c.index) for c in atoms.constraints if isinstance(c, FixAtoms))
    others = sorted({type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)})
    parts = ([f"{fixed} fixed"] if fixed else []) + others
    return ", " + ", ".join(parts)


def _model_spec(spec: str) -> str:
    """A model file as an absolute path (a restart may run from elsewhere)."""
    return str(Path(spec).resolve()) if Path(spec).is_file() else spec


def initial_velocities(atoms, temperature_K: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` from ``seed``, zero total momentum (the
    same on every rank); at 0 K the structure's momenta, if any, are kept."""
    if temperature_K <= 0:
        return
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
