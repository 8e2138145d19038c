"""``distmlip md``: restartable molecular dynamics with a progress bar, a log, a trajectory and plots.

A run directory holds ``trajectory.extxyz`` (every ``--write-every`` steps and the last),
``log.csv`` (every ``--log-every`` steps and the last), ``checkpoint.npz`` (with every frame written
and at the end) and, with ``--plot``, ``energy.png``, ``temperature.png``, ``pressure.png``.
``--restart DIR`` continues a run exactly from its checkpoint. The engine is the library module
``distmlip.md`` (``MDSettings``, ``run_md``, ``load_checkpoint``, ``plot_run``); this module parses
the flags, calls it, names the flags in its errors and prints.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..md import (
    BAROSTATS,
    CHECKPOINT,
    ENSEMBLES,
    LOG,
    TRAJECTORY,
    MDSettings,
    UnstableRun,
    initial_velocities,
    load_checkpoint,
    plot_run,
    run_md,
    unsaved_info,
)
from ..md.plot import PLOTS
from ..runtime.launch import detect_launch
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

__all__ = ["add_parser", "command", "library_errors"]

#: a field or argument of ``distmlip.md`` -> the flag that sets it (its errors name the flag)
FIELDS = {"ensemble": "--ensemble", "barostat": "--barostat", "timestep_fs": "--timestep",
          "temperature_K": "--temperature", "seed": "--seed", "friction_per_ps": "--friction",
          "pressure_GPa": "--pressure", "taut_fs": "--taut", "taup_fs": "--taup",
          "compressibility_per_GPa": "--compressibility", "write_every": "--write-every",
          "log_every": "--log-every", "steps": "--steps", "checkpoint": "--restart"}


@contextmanager
def library_errors(**fields: str):
    """Re-raise a ``ValueError`` of ``distmlip.md`` that names one of its fields as a ``CLIError``
    naming the flag (``temperature_K: ...`` -> ``--temperature: ...``); ``fields``: more names for
    this call (``directory="--restart"``). Other errors (the calculator's, the model's) pass."""
    table = {**FIELDS, **fields}
    try:
        yield
    except ValueError as exc:
        key, sep, rest = str(exc).partition(":")
        if not sep or key not in table:
            raise
        raise CLIError(f"{table[key]}:{rest}") from exc


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
    p.add_argument("--no-rescale", action="store_true",
                   help="keep the raw Maxwell-Boltzmann draw (default: scaled so the starting "
                        "temperature is --temperature exactly)")
    p.add_argument("--max-time", default=None, metavar="HH:MM:SS",
                   help="wall-time limit (HH:MM:SS, MM:SS or seconds): stop before it with a checkpoint, "
                        "exit 0 (SIGTERM, SIGINT and SIGUSR1 stop the same way, exit 128+signal)")
    p.add_argument("--max-temperature", type=float, default=None, metavar="K",
                   help="stop with an error (exit 3) above this temperature, as on non-finite "
                        "energy, forces or positions (default 10 x --temperature; 10000 K at 0 K)")
    p.add_argument("--plot", action="store_true", help="energy/temperature/pressure PNGs at the end")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_calculator_options(p)
    p.set_defaults(func=command)


def command(args) -> int:
    started = time.monotonic()
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
        if args.no_rescale:
            raise CLIError("--no-rescale: has no effect when restarting (the velocities are the "
                           "checkpoint's); drop it")
        directory = Path(args.restart)
        if not (directory / CHECKPOINT).is_file():
            raise CLIError(f"--restart: expected a run directory holding {CHECKPOINT}, got "
                           f"{str(directory)!r}, which has none; start a run with --output DIR first")
        with library_errors(directory="--restart"):
            state = load_checkpoint(directory)
        settings, atoms = state["settings"], state["atoms"]
        options = {**state["calculator"], **calculator_kwargs(args)}
        _check_restart_parts(options, args, directory)
        output = state["output"]
    else:
        if args.structure is None:
            raise CLIError("STRUCTURE: expected a structure file (or --restart DIR), got none")
        if args.model is None:
            raise CLIError("--model: expected a model name or file (see `distmlip models`), got none")
        values = {field: getattr(args, k) for k, field in PHYSICS.items()
                  if field is not None and getattr(args, k) is not None}
        with library_errors():
            settings = MDSettings(model=_model_spec(args.model), **values)
        _check_npt_options(args, settings)
        if args.steps is None:
            raise CLIError("--steps: expected the number of steps to run, got none")
        supercell = parse_supercell(args.supercell)
        directory = Path(args.output or "md-run")
        if (directory / CHECKPOINT).exists() and not args.overwrite:
            raise CLIError(f"--output: {str(directory)!r} already holds a run ({CHECKPOINT}); "
                           f"continue it with --restart {directory}, or pass --overwrite")
        atoms = repeat_structure(read_structure(args.structure, getattr(args, "verbose", False)), supercell)
        dropped = unsaved_info(atoms)
        if dropped and is_root():
            print(f"distmlip md: note: info entries {dropped} are not JSON: the frames and checkpoints "
                  f"leave them out", file=sys.stderr)
        initial_velocities(atoms, settings.temperature_K, settings.seed, rescale=not args.no_rescale)
        state = None
        options = calculator_kwargs(args)
        output = {"write_every": 100, "log_every": 1}
    output = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in output.items()}
    max_seconds = parse_duration(args.max_time)
    max_temperature = args.max_temperature
    if max_temperature is None:
        max_temperature = 10.0 * settings.temperature_K if settings.temperature_K > 0 else 10000.0
    elif not (max_temperature > 0 and max_temperature < float("inf")):
        raise CLIError(f"--max-temperature: expected a number of K > 0, got {args.max_temperature!r}; "
                       f"pass e.g. --max-temperature 5000")
    model = load_model(settings.model)
    calc = build_calculator(model, options)
    check_writable_dir(str(directory), "--restart" if state is not None else "--output")
    say = print if calc.rank == 0 else (lambda *a, **k: None)
    ensemble = _physics(settings, atoms, state is not None)
    fixed = _constraint_summary(atoms)
    say(f"distmlip md: {len(atoms)} atoms ({atoms.get_chemical_formula()}{fixed}), {settings.model}, "
        f"{ensemble}; "
        f"{calc.num_parts}{'+' if calc.budget_bytes is not None else ''} part(s) ({calc.partitioner}, "
        f"{calc.mode}{', as --max-memory needs' if calc.budget_bytes is not None else ''}), "
        f"backend {calc.backend}, "
        f"{calc.world_size} process(es)")
    if state is not None:
        say(f"restarting from step {state['step']} in {directory}")
    with library_errors(directory="--restart" if state is not None else "--output"):
        try:
            summary = run_md(atoms, calc, settings, directory, args.steps, **output, checkpoint=state,
                             progress=not args.quiet, calculator_options=options,
                             stop_on_signals=True,
                             deadline=None if max_seconds is None else started + max_seconds,
                             max_temperature_K=max_temperature)
        except UnstableRun as exc:
            what = str(exc).replace("max_temperature_K", "--max-temperature")
            _say_error(f"distmlip md: error: the run blew up: {what}; {directory / CHECKPOINT} and "
                       f"{directory / TRAJECTORY} hold step "
                       f"{exc.checkpoint_step}; try a smaller --timestep or a relaxed structure",
                       calc.rank == 0)
            return 3
    stopped = summary["stopped"]
    if stopped is not None:
        cause = (f"by {stopped['signal']}" if stopped["reason"] == "signal"
                 else f"before --max-time {args.max_time}")
        verb = "interrupted" if stopped["reason"] == "signal" else "stopped"
        say(f"{verb} at step {summary['step']} {cause}; checkpoint at step {summary['step']}; "
            f"continue with: distmlip md --restart {directory} --steps {args.steps}", flush=True)
        return 128 + stopped["signum"] if stopped["reason"] == "signal" else 0
    if not summary["steps_run"]:
        say(f"the run in {directory} is already at step {summary['step']} >= --steps {args.steps}; "
            f"nothing to do, nothing written")
        return 0
    if summary["steps_run"]:
        say(f"{summary['steps_run']} steps in {summary['seconds']:.2f} s: "
            f"{summary['seconds'] / summary['steps_run']:.3g} s/step, {summary['ns_per_day']:.3g} ns/day, "
            f"{summary['atom_steps_per_s']:.3g} atom-steps/s; graph built "
            f"{summary['graph_builds']} time{'' if summary['graph_builds'] == 1 else 's'}")
    else:
        say(f"the run in {directory} is already at step {summary['step']} >= --steps {args.steps}; "
            f"nothing to do")
    if calc.last_run is not None and calc.budget_bytes is not None:  # the parts the budget chose
        say(f"parts: {calc.last_run.describe()}")
    say(f"step {summary['step']}: Epot {summary['epot']:.6f} eV, Etot {summary['etot']:.6f} eV, "
        f"T {summary['temperature_K']:.1f} K; wrote {directory / LOG}, {directory / TRAJECTORY}, "
        f"{directory / CHECKPOINT}")
    # a restart without --plot redraws the pictures an earlier --plot left (else they are stale)
    stale = [name for name in PLOTS if (directory / name).exists()]
    if (args.plot or stale) and calc.rank == 0:
        with library_errors(directory="--plot"):
            written = plot_run(directory)
        for path in written:
            say(f"wrote {path}" + ("" if args.plot else " (redrawn: it was drawn before this restart)"))
    return 0


def _physics(settings: MDSettings, atoms, restart: bool) -> str:
    """The opening line's physics: ensemble, timestep, starting temperature and the targets."""
    s = settings
    start = f"T {atoms.get_temperature():.1f} K" if restart else f"start {atoms.get_temperature():.1f} K"
    if s.ensemble == "nve":
        targets = "no thermostat"
    elif s.ensemble == "nvt":
        targets = f"target {s.temperature_K:g} K (Langevin, friction {s.friction_per_ps:g}/ps)"
    else:
        targets = (f"target {s.temperature_K:g} K and {s.pressure_GPa:g} GPa (taut {s.taut_fs:g} fs, "
                   f"taup {s.taup_fs:g} fs)")
    ensemble = s.ensemble + (f" ({s.barostat})" if s.ensemble == "npt" else "")
    return f"{ensemble} {s.timestep_fs} fs, {start}, {targets}"


def _check_restart_parts(options: dict, args, directory: Path) -> None:
    """A restart under a launcher whose process count does not divide the run's saved number of
    parts: say which --partitions continues it (the user did not pass one)."""
    launch = detect_launch()
    parts = options.get("num_parts")
    if launch is None or launch.world_size <= 1 or args.partitions is not None:
        return
    if isinstance(parts, int) and parts % launch.world_size:
        w = launch.world_size
        raise CLIError(f"--partitions: the run in {str(directory)!r} was made with {parts} parts, which "
                       f"{w} processes cannot share evenly; continue it with --partitions {w} (or "
                       f"another multiple of {w})")


def parse_duration(text: str | None) -> float | None:
    """``--max-time``: ``HH:MM:SS``, ``MM:SS`` or seconds -> seconds (> 0)."""
    if text is None:
        return None
    try:
        parts = [float(p) for p in text.split(":")]
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
            raise ValueError
        seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds < float("inf")):
        raise CLIError(f"--max-time: expected a wall time HH:MM:SS, MM:SS or seconds > 0, got {text!r}; "
                       f"pass e.g. --max-time 23:50:00")
    return seconds


def _say_error(line: str, root: bool) -> None:
    if root:
        print(line, file=sys.stderr, flush=True)


#: flag -> the ensembles (or npt barostats) it acts in; under any other it is refused
_ACTS_IN = {"friction": ("nvt",), "pressure": ("npt",), "taut": ("npt",), "taup": ("npt",),
            "compressibility": ("npt",)}
_WHAT = {"friction": "only nvt (Langevin) has a friction",
         "pressure": "only npt has a target pressure", "taut": "only npt's thermostat has a time "
         "(nvt's Langevin uses --friction)", "taup": "only npt has a barostat time",
         "compressibility": "only npt's berendsen barostat has a compressibility"}


def _check_npt_options(args, settings: MDSettings) -> None:
    """Options that would be silently ignored are refused, naming the flag and the ensemble."""
    for key, ensembles in _ACTS_IN.items():
        if getattr(args, key) is not None and settings.ensemble not in ensembles:
            raise CLIError(f"--{key}: has no effect under --ensemble {settings.ensemble} ({_WHAT[key]}); "
                           f"pass --ensemble {ensembles[0]} or drop --{key}")
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
