"""The run loop: ``run_md`` steps, logs, writes frames and checkpoints, and continues a run
exactly from its checkpoint.

A run directory holds ``trajectory.extxyz`` (every ``write_every`` steps and the last),
``log.csv`` (every ``log_every`` steps and the last) and ``checkpoint.npz`` (with every frame
written and at the end). A restart truncates the log and trajectory to the sizes the checkpoint
records (dropping rows a crash left after it) and continues exactly: the same steps run with the
same numbers as in an uninterrupted run.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .checkpoint import CHECKPOINT, write_checkpoint
from .dynamics import MDSettings, dynamics_state, make_dynamics, restore_dynamics_state

__all__ = ["LOG", "LOG_COLUMNS", "STOP_SIGNALS", "TRAJECTORY", "UnstableRun", "run_md"]

#: the signals that stop a run cleanly (with ``stop_on_signals``): the step under way finishes,
#: a checkpoint is written and ``run_md`` returns with ``stopped`` set
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class UnstableRun(RuntimeError):
    """The run blew up at ``step``: ``quantity`` (``temperature``, ``energy``, ``forces``,
    ``positions``) is non-finite or out of bounds. Nothing of that step was written: the last
    checkpoint and the trajectory hold the last good state."""

    def __init__(self, message: str, step: int, quantity: str, checkpoint_step: int):
        super().__init__(message)
        self.step, self.quantity, self.checkpoint_step = step, quantity, checkpoint_step


class _Signals:
    """Catch ``STOP_SIGNALS`` while the loop runs (main thread only): remember the first, restore
    the previous handlers on exit. A second SIGINT while stopping raises ``KeyboardInterrupt``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received = 0
        self.previous = {}

    def __enter__(self):
        if self.enabled:
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

LOG = "log.csv"
TRAJECTORY = "trajectory.extxyz"
LOG_COLUMNS = ("step", "time_ps", "epot", "ekin", "etot", "temperature_K", "pressure_GPa", "volume_A3",
               "seconds_per_step", "atom_steps_per_s")


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
                    raise ValueError(f"directory: {p} is shorter than its checkpoint records "
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


def _check_stable(atoms, step: int, max_temperature_K: float | None, checkpointed: int) -> None:
    """Raise ``UnstableRun`` if the state after ``step`` is non-finite or too hot."""
    results = getattr(atoms.calc, "results", {}) or {}

    def fail(quantity: str, detail: str):
        raise UnstableRun(f"{detail} at step {step}", step, quantity, checkpointed)

    if not np.isfinite(atoms.positions).all():
        fail("positions", "non-finite positions")
    if "energy" in results and not math.isfinite(results["energy"]):
        fail("energy", f"non-finite energy ({results['energy']})")
    if "forces" in results and not np.isfinite(results["forces"]).all():
        fail("forces", "non-finite forces")
    temperature = atoms.get_temperature()
    if not math.isfinite(temperature):
        fail("temperature", f"non-finite temperature ({temperature})")
    if max_temperature_K is not None and temperature > max_temperature_K:
        fail("temperature", f"temperature {temperature:.4g} K above max_temperature_K "
                            f"{max_temperature_K:g} K")


def run_md(atoms, calc, settings: MDSettings, directory, steps: int, *, write_every: int = 100,
           log_every: int = 1, checkpoint: dict | None = None, progress: bool = False,
           calculator_options: dict | None = None, stop_on_signals: bool = False,
           deadline: float | None = None, max_temperature_K: float | None = None) -> dict:
    """Run (or continue, from ``checkpoint``, what ``load_checkpoint`` returns) MD until ``steps``
    steps in total, writing the run directory ``directory`` (created if needed).

    ``atoms`` must hold the initial momenta; only rank 0 (``calc.rank``) writes, every rank steps
    identically. ``progress``: a tqdm bar on stderr (rank 0). ``calculator_options``: what the
    checkpoint records of the calculator (for a restart to rebuild it). Returns a summary
    (``steps_run``, ``step``, ``seconds``, ``setup_seconds``, ``ns_per_day``,
    ``atom_steps_per_s``, ``graph_builds``, the final ``epot``/``etot``/``temperature_K``,
    ``stopped``: ``None``, or ``{"reason": "signal", "signal": "SIGTERM", "signum": 15}`` /
    ``{"reason": "deadline"}`` for a run stopped early, checkpointed at ``step``).

    ``stop_on_signals``: SIGTERM, SIGINT and SIGUSR1 finish the step under way, write the log row,
    the frame and the checkpoint, and return (under a launcher every rank agrees on the step, by an
    all-reduce each step). ``deadline``: a ``time.monotonic()`` value; stop the same way when the
    next step and a checkpoint might not finish before it. ``max_temperature_K``: a temperature above it, or
    non-finite positions, forces or energy, raise ``UnstableRun`` naming the step and the quantity,
    writing nothing of that step.

    Raises ``ValueError`` naming the argument (``write_every``, ``log_every``, ``steps``;
    ``directory`` for a run directory changed since its checkpoint; ``checkpoint`` for a
    checkpoint without its integrator's state; ``ensemble``/``barostat`` for a structure the
    integrator cannot take)."""
    directory = Path(directory)
    for name, value in (("write_every", write_every), ("log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    if steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps}")
    atoms.calc = calc
    dyn, rng = make_dynamics(atoms, settings)
    start = 0 if checkpoint is None else checkpoint["step"]
    if checkpoint is not None:
        if rng is not None and checkpoint["rng"] is not None:
            rng.bit_generator.state = checkpoint["rng"]
        restore_dynamics_state(dyn, settings, checkpoint.get("dynamics", {}))
    build = None if checkpoint is None else checkpoint.get("build")
    if build is not None and hasattr(calc, "restore_build"):  # the same graph as before the stop
        calc.restore_build(build["positions"], build["cell"], atoms.pbc, atoms.numbers)
    root = getattr(calc, "rank", 0) == 0
    natoms = len(atoms)
    dt_ps = settings.timestep_fs / 1000.0
    t0 = time.perf_counter()
    obs = _observables(atoms)  # the first evaluation: model errors surface before any file
    if root:
        directory.mkdir(parents=True, exist_ok=True)
    # a restart with nothing to do touches no file
    writes = root and (checkpoint is None or steps > start)
    out = _Outputs(directory, None if checkpoint is None else checkpoint["sizes"]) if writes else None
    options = calculator_options or {}

    def save(step):
        if root:
            write_checkpoint(directory / CHECKPOINT, atoms, step, settings, rng, out.sync(), options,
                             {"write_every": write_every, "log_every": log_every},
                             dynamics_state(dyn, settings),
                             calc.build_reference() if hasattr(calc, "build_reference") else None)

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
    comm = getattr(getattr(calc, "runner", None), "comm", None)
    many = getattr(calc, "world_size", 1) > 1 and comm is not None
    stopped = None
    checkpointed = start
    step_time = 0.0
    signals = _Signals(stop_on_signals)
    try:
        signals.__enter__()
        for step in range(start + 1, steps + 1):
            t_step = time.perf_counter()
            try:
                dyn.step()
            except ValueError as exc:  # the runner refuses NaN/inf energies and forces
                if not (str(exc).startswith("model:") and "NaN or inf" in str(exc)):
                    raise
                raise UnstableRun(f"non-finite energy or forces at step {step} ({exc})", step,
                                  "forces", checkpointed) from exc
            _check_stable(atoms, step, max_temperature_K, checkpointed)
            step_time = max(step_time * 0.9, time.perf_counter() - t_step)
            code = signals.received
            # stop while one more step (at its slowest yet, twice over) and a write still fit
            late = (deadline is not None and step < steps
                    and time.monotonic() + 2.0 * step_time + 1.0 >= deadline)
            if many:  # every rank stops at the same step: the first signal any rank got
                code = int(comm.maximum(float(code)))
                if deadline is not None:
                    late = comm.agree(late)
            if code:
                stopped = {"reason": "signal", "signal": signal.Signals(code).name, "signum": code}
            elif late:
                stopped = {"reason": "deadline"}
            final = step == steps or stopped is not None
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
                checkpointed = step
            if bar is not None:
                bar.update(1)
            if stopped is not None:
                break
    finally:
        signals.__exit__()
        if bar is not None:
            bar.close()
        if out is not None:
            out.close()
    seconds = time.perf_counter() - t_run
    end = max(steps, start) if stopped is None else checkpointed
    ran = end - start if end > start else 0
    rate = ran / seconds if ran and seconds > 0 else float("nan")
    epot, ekin, temp, _, _ = _observables(atoms)
    return {"steps_run": ran, "step": end, "seconds": seconds, "stopped": stopped,
            "setup_seconds": t_run - t0, "ns_per_day": rate * settings.timestep_fs * 86400e-6,
            "atom_steps_per_s": rate * natoms, "graph_builds": getattr(calc, "graph_builds", None),
            "epot": epot, "etot": epot + ekin, "temperature_K": temp}
