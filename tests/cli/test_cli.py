"""The ``distmlip`` command line: restartable MD, single points, relaxations, partitions, errors.

Most tests call ``distmlip.cli.main([...])`` in this process with a Lennard-Jones model (cheap);
one runs ``python -m distmlip`` as a subprocess and one runs ``distmlip md`` under mpirun.
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

import distmlip.md as md_module
from distmlip import DistributedCalculator
from distmlip.cli import main
from distmlip.md import checkpoint as md_checkpoint
from distmlip.md import loop as md_loop
from distmlip.models import LennardJones

from support import LJ_SPEC as LJ  # roughly Cu (LJ_PARAMS)
from support import ROOT


def md(structure, out, steps, *extra) -> int:
    return main(["md", str(structure), "--model", LJ, "--steps", str(steps), "--output", str(out),
                 "--quiet", *extra])


def read_log(path: Path) -> list[dict]:
    with open(path / "log.csv") as f:
        return list(csv.DictReader(f))


def last_frame(path: Path):
    return ase.io.read(path / "trajectory.extxyz", index=-1)


def final(path: Path):
    """The atoms of the run's last checkpoint (full precision; extxyz keeps 8 decimals)."""
    state = md_module.load_checkpoint(path)
    return state["atoms"]


# ----------------------------------------------------------------------------- md and restarts
@pytest.mark.parametrize("ensemble", ["nve", "nvt", "npt"])
def test_restart_equals_uninterrupted_run(cu, tmp_path, ensemble):
    """20 steps at once vs 7 steps then --restart to 20: the same positions (<= 1e-8 Å), cell and
    log, no step logged twice or lost (Langevin included: its random state is checkpointed)."""
    opts = ["--ensemble", ensemble, "--write-every", "5", "--temperature", "500", "--seed", "3"]
    assert md(cu, tmp_path / "full", 20, *opts) == 0
    assert md(cu, tmp_path / "split", 7, *opts) == 0
    assert main(["md", "--restart", str(tmp_path / "split"), "--steps", "20", "--quiet"]) == 0
    assert last_frame(tmp_path / "full").info["step"] == last_frame(tmp_path / "split").info["step"] == 20
    a, b = final(tmp_path / "full"), final(tmp_path / "split")  # float64, as the run holds them
    assert np.abs(a.positions - b.positions).max() <= 1e-8
    assert np.abs(a.cell.array - b.cell.array).max() <= 1e-8
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [str(i) for i in range(21)]
    assert [r["step"] for r in full] == [str(i) for i in range(21)]
    for col in ("epot", "etot", "temperature_K"):
        np.testing.assert_allclose([float(r[col]) for r in split], [float(r[col]) for r in full],
                                   rtol=1e-10)
    frames = ase.io.read(tmp_path / "split" / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 5, 7, 10, 15, 20]
    if ensemble == "nve":  # the thermostats do not conserve it; velocity Verlet at 1 fs does
        etot = [float(r["etot"]) for r in full]
        assert max(etot) - min(etot) < 1e-3 * len(a)
    if ensemble == "npt":  # the barostat moved the cell
        assert np.abs(a.cell.array - bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2).cell.array).max() > 1e-4


def test_killed_run_restarts_losing_nothing(cu, tmp_path):
    """A running `python -m distmlip md` killed with SIGKILL (issue 10, section 3): `--restart`
    continues from its last checkpoint, every step is logged exactly once and the run ends where an
    uninterrupted run ends (Langevin: its random state is in the checkpoint)."""
    import signal
    import time

    opts = ["--ensemble", "nvt", "--write-every", "10", "--temperature", "500", "--seed", "3"]
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "distmlip", "md", str(cu), "--model", LJ,
                             "--steps", "1000000", "--output", str(out), "--quiet", *opts], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, step = time.monotonic() + 180, 0
    try:
        while step < 30 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if (out / "checkpoint.npz").exists():
                step = md_module.load_checkpoint(out)["step"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert step >= 30, "the run did not reach its third checkpoint"
    saved = md_module.load_checkpoint(out)["step"]
    total = saved + 25
    assert main(["md", "--restart", str(out), "--steps", str(total), "--quiet"]) == 0
    assert md(cu, tmp_path / "full", total, *opts) == 0
    assert np.abs(final(out).positions - final(tmp_path / "full").positions).max() <= 1e-8
    killed, full = read_log(out), read_log(tmp_path / "full")
    assert [r["step"] for r in killed] == [r["step"] for r in full] == [str(i) for i in range(total + 1)]
    np.testing.assert_allclose([float(r["etot"]) for r in killed], [float(r["etot"]) for r in full],
                               rtol=1e-10)


def test_crash_while_writing_a_checkpoint(cu, tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint whole (and a stray temporary
    file); the restart drops the log rows and frames written after that checkpoint and ends
    where an uninterrupted run ends."""
    opts = ["--ensemble", "nvt", "--write-every", "4"]
    assert md(cu, tmp_path / "full", 14, *opts) == 0
    calls = []
    real = md_checkpoint._savez

    def dying(f, **arrays):
        calls.append(1)
        if len(calls) == 3:  # step 0, step 4, then die writing step 8
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        real(f, **arrays)

    monkeypatch.setattr(md_checkpoint, "_savez", dying)
    out = tmp_path / "crash"
    assert md(cu, out, 14, *opts) == 2
    monkeypatch.setattr(md_checkpoint, "_savez", real)
    assert (out / "checkpoint.npz.tmp").exists()
    assert md_module.load_checkpoint(out)["step"] == 4
    assert read_log(out)[-1]["step"] == "8"  # rows past the checkpoint, to be dropped
    assert main(["md", "--restart", str(out), "--steps", "14", "--quiet"]) == 0
    assert [r["step"] for r in read_log(out)] == [str(i) for i in range(15)]
    frames = ase.io.read(out / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 4, 8, 12, 14]
    assert np.abs(final(out).positions - final(tmp_path / "full").positions).max() <= 1e-8


def test_md_outputs_and_plots(cu, tmp_path):
    out = tmp_path / "run"
    assert md(cu, out, 6, "--write-every", "3", "--log-every", "2", "--plot", "--supercell", "1x1x2") == 0
    rows = read_log(out)
    assert list(rows[0]) == list(md_module.LOG_COLUMNS)
    assert [r["step"] for r in rows] == ["0", "2", "3", "4", "6"]
    frame = last_frame(out)
    assert len(frame) == 64 and frame.info["step"] == 6 and frame.get_forces().shape == (64, 3)
    r = rows[-1]
    assert float(r["time_ps"]) == pytest.approx(0.006)
    assert float(r["etot"]) == pytest.approx(float(r["epot"]) + float(r["ekin"]))
    # the logged pressure is what ASE computes for the last state (virial plus kinetic term)
    atoms = final(out)
    atoms.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    from ase import units

    p = -atoms.get_stress(include_ideal_gas=True)[:3].mean() / units.GPa
    assert float(r["pressure_GPa"]) == pytest.approx(p, rel=1e-9)
    for name in ("energy.png", "temperature.png", "pressure.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "temperature.png").exists()


def test_initial_velocities_are_seeded_and_stationary(cu, tmp_path):
    assert md(cu, tmp_path / "a", 0, "--temperature", "400", "--seed", "5") == 0
    assert md(cu, tmp_path / "b", 0, "--temperature", "400", "--seed", "5") == 0
    assert md(cu, tmp_path / "c", 0, "--temperature", "400", "--seed", "6") == 0
    p = [final(tmp_path / d).get_momenta() for d in "abc"]
    assert np.array_equal(p[0], p[1]) and not np.allclose(p[0], p[2])
    assert np.abs(p[0].sum(axis=0)).max() < 1e-12


# ----------------------------------------------------------------------------- constraints
@pytest.fixture
def cu_fixed(tmp_path) -> Path:
    """The rattled 32-atom Cu cell with its first four atoms fixed and two ``info`` entries, as
    extxyz (FixAtoms -> a ``move_mask`` column)."""
    from ase.constraints import FixAtoms

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    atoms.info.update(config_type="fixed-bottom", charge=0)
    path = tmp_path / "cu_fixed.xyz"
    ase.io.write(path, atoms)
    assert "move_mask" in path.read_text().splitlines()[1]
    return path


def test_constraints_and_info_hold_in_md_and_restart(cu_fixed, tmp_path, capsys):
    """FixAtoms read from extxyz's move_mask, repeated with --supercell (atoms 0-3 and 32-35): the
    fixed atoms do not move over a Langevin run and its restart; every frame carries the
    constraint and the structure's info; the restart (constraints from the checkpoint) ends
    where an uninterrupted run ends."""
    fixed = [0, 1, 2, 3, 32, 33, 34, 35]
    opts = ["--ensemble", "nvt", "--temperature", "600", "--write-every", "3", "--supercell", "1x1x2"]
    assert md(cu_fixed, tmp_path / "split", 5, *opts) == 0
    assert "64 atoms (Cu64, 8 fixed)" in capsys.readouterr().out
    assert main(["md", "--restart", str(tmp_path / "split"), "--steps", "10", "--quiet"]) == 0
    assert md(cu_fixed, tmp_path / "full", 10, *opts) == 0
    start = ase.io.read(cu_fixed).repeat((1, 1, 2))
    frames = ase.io.read(tmp_path / "split" / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 3, 5, 6, 9, 10]
    for frame in frames:
        assert [type(c).__name__ for c in frame.constraints] == ["FixAtoms"]
        assert frame.constraints[0].index.tolist() == fixed
        assert frame.info["config_type"] == "fixed-bottom" and frame.info["charge"] == 0
        assert np.abs(frame.positions[fixed] - start.positions[fixed]).max() < 1e-7  # 8 decimals
        # the model's forces are stored (reading applies the constraint, as ASE does)
        assert np.abs(frame.get_forces(apply_constraint=False)[fixed]).max() > 1e-3
        assert np.abs(frame.get_forces()[fixed]).max() == 0
    end = final(tmp_path / "split")
    assert end.constraints[0].index.tolist() == fixed and end.info["config_type"] == "fixed-bottom"
    assert np.array_equal(end.positions[fixed], start.positions[fixed])
    assert np.abs(end.get_momenta()[fixed]).max() == 0
    moving = np.setdiff1d(np.arange(64), fixed)
    assert np.abs(end.positions[moving] - start.positions[moving]).max() > 1e-3
    assert np.abs(end.positions - final(tmp_path / "full").positions).max() <= 1e-8
    # the temperature counts the degrees of freedom the constraint leaves (3 x 56)
    r = read_log(tmp_path / "split")[-1]
    assert float(r["temperature_K"]) == pytest.approx(end.get_temperature(), rel=1e-9)
    from ase import units

    assert end.get_temperature() == pytest.approx(2 * end.get_kinetic_energy() / (3 * 56 * units.kB),
                                                   rel=1e-12)


def test_checkpoint_round_trips_the_structure(tmp_path):
    """Constraints of several kinds, info, initial charges, magnetic moments and tags survive a
    checkpoint bit for bit; an info entry JSON cannot hold is named, not silently lost."""
    from ase.constraints import FixAtoms, FixCartesian, FixScaled

    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat((2, 1, 1))
    atoms.set_initial_charges(np.linspace(-1, 1, len(atoms)))
    atoms.set_initial_magnetic_moments(np.arange(len(atoms)) * 0.5)
    atoms.set_tags(np.arange(len(atoms)) % 3)
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)), apply_constraint=False)
    atoms.set_constraint([FixAtoms([0]), FixCartesian([1], mask=(True, False, True)),
                          FixScaled(2, mask=(False, True, False))])
    atoms.info.update(charge=1, spin=2, label="x", opaque=object())
    settings = md_module.MDSettings(model="lj")
    md_module.write_checkpoint(tmp_path / md_module.CHECKPOINT, atoms, 3, settings, None,
                               {"log": 0, "trajectory": 0}, {}, {})
    state = md_module.load_checkpoint(tmp_path)
    back = state["atoms"]
    assert [c.todict() for c in back.constraints] == [c.todict() for c in atoms.constraints]
    assert back.info == {"charge": 1, "spin": 2, "label": "x"}
    for name in ("initial_charges", "initial_magmoms", "tags"):
        assert np.array_equal(back.arrays[name], atoms.arrays[name])
    assert np.array_equal(back.get_momenta(), atoms.get_momenta())
    assert md_checkpoint._structure_meta(atoms)["dropped_info"] == ["opaque"]


def test_md_library_names_fields_and_the_cli_names_flags(tmp_path, cu, capsys):
    """distmlip.md raises ValueError naming the field or argument; `distmlip md` names the flag."""
    with pytest.raises(ValueError, match=r"^temperature_K: expected a number of K >= 0, got -1.0"):
        md_module.MDSettings(model="lj", temperature_K=-1.0)
    atoms = ase.io.read(cu)
    calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    with pytest.raises(ValueError, match=r"^write_every: expected an integer >= 1, got 0"):
        md_module.run_md(atoms, calc, md_module.MDSettings(model="lj"), tmp_path / "r", 2, write_every=0)
    with pytest.raises(ValueError, match=r"^directory: expected a run directory holding checkpoint.npz"):
        md_module.load_checkpoint(tmp_path)
    assert md(cu, tmp_path / "o", 2, "--write-every", "0") == 2
    assert "distmlip md: error: --write-every: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_relax_keeps_selective_dynamics(tmp_path, capsys):
    """A POSCAR with selective dynamics (F F F on two atoms): FIRE leaves them where they are and
    the relaxed extxyz holds the constraint; `run` reports the model's forces on them."""
    from ase.constraints import FixAtoms

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.1, seed=4)
    atoms.set_constraint(FixAtoms(indices=[0, 5]))
    ase.io.write(tmp_path / "POSCAR", atoms, format="vasp")
    assert "Selective dynamics" in (tmp_path / "POSCAR").read_text()
    out = tmp_path / "relaxed.extxyz"
    assert main(["relax", str(tmp_path / "POSCAR"), "--model", LJ, "--fmax", "0.01", "-o", str(out)]) == 0
    assert "converged" in capsys.readouterr().out
    relaxed = ase.io.read(out)
    assert [c.index.tolist() for c in relaxed.constraints] == [[0, 5]]
    atoms = ase.io.read(tmp_path / "POSCAR")
    assert np.abs(relaxed.positions[[0, 5]] - atoms.positions[[0, 5]]).max() < 1e-7  # extxyz: 8 decimals
    assert np.abs(relaxed.positions - atoms.positions).max() > 0.02
    relaxed.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    assert np.abs(relaxed.get_forces()).max() < 0.01  # on the free atoms
    assert main(["run", str(tmp_path / "POSCAR"), "--model", LJ, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    atoms.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    np.testing.assert_allclose(result["forces_eV_per_A"], atoms.get_forces(apply_constraint=False),
                               atol=1e-12)
    assert np.abs(np.array(result["forces_eV_per_A"])[[0, 5]]).max() > 1e-2


def test_supercell_refuses_constraints_ase_cannot_repeat(tmp_path):
    from ase.constraints import FixBondLength

    from distmlip.cli._common import CLIError, repeat_structure

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_constraint(FixBondLength(0, 1))
    with pytest.raises(CLIError, match=r"--supercell: the structure's constraints \(FixBondLengths\)"):
        repeat_structure(atoms, (2, 1, 1))
    assert repeat_structure(atoms, (1, 1, 1)) is atoms


# ----------------------------------------------------------------------------- npt (MTK)
@pytest.mark.parametrize("barostat", ["mtk", "mtk-iso"])
def test_npt_mtk_runs_compresses_and_restarts_exactly(cu, tmp_path, barostat, monkeypatch, capsys):
    """--barostat mtk / mtk-iso (ASE's MTKNPT / IsotropicMTKNPT): at 5 GPa the cell shrinks more than
    at 0 GPa; the log holds pressure and volume; a restart carries the barostat's and thermostat's
    chains in the checkpoint and ends exactly where an uninterrupted run ends (and would not
    without them); a checkpoint without them is refused, not continued wrong."""
    opts = ["--ensemble", "npt", "--barostat", barostat, "--temperature", "300", "--taut", "50",
            "--taup", "100", "--write-every", "5"]
    assert md(cu, tmp_path / "full", 30, *opts, "--pressure", "5") == 0
    assert f"npt ({barostat}) 1.0 fs" in capsys.readouterr().out
    assert md(cu, tmp_path / "p0", 30, *opts, "--pressure", "0") == 0
    rows = read_log(tmp_path / "full")
    volume = np.array([float(r["volume_A3"]) for r in rows])
    volume0 = np.array([float(r["volume_A3"]) for r in read_log(tmp_path / "p0")])
    assert [r["step"] for r in rows] == [str(i) for i in range(31)]
    assert np.isfinite([float(r["pressure_GPa"]) for r in rows]).all()
    end = final(tmp_path / "full")
    assert volume[-1] == pytest.approx(end.get_volume(), rel=1e-12)
    assert volume[10:].mean() < volume0[10:].mean() - 2.0 < volume[0] - 2.0  # Å^3
    cell0 = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2).cell.array
    if barostat == "mtk-iso":  # the shape is kept
        np.testing.assert_allclose(end.cell.array, cell0 * (end.get_volume() / volume[0]) ** (1 / 3),
                                   atol=1e-12)
    else:  # all nine degrees of freedom move
        assert np.abs(end.cell.array - np.diag(np.diag(end.cell.array))).max() > 1e-6

    split = tmp_path / "split"
    assert md(cu, split, 12, *opts, "--pressure", "5") == 0
    assert main(["md", "--restart", str(split), "--steps", "30", "--quiet"]) == 0
    assert np.abs(final(split).positions - end.positions).max() <= 1e-8
    assert np.abs(final(split).cell.array - end.cell.array).max() <= 1e-8
    np.testing.assert_allclose([float(r["volume_A3"]) for r in read_log(split)], volume, rtol=1e-10)

    # without the chains' state the continued run is a different one
    assert md(cu, tmp_path / "lossy", 12, *opts, "--pressure", "5") == 0
    monkeypatch.setattr(md_loop, "restore_dynamics_state", lambda dyn, settings, state: None)
    assert main(["md", "--restart", str(tmp_path / "lossy"), "--steps", "30", "--quiet"]) == 0
    assert np.abs(final(tmp_path / "lossy").positions - end.positions).max() > 1e-6
    monkeypatch.undo()

    # an integrator whose state the checkpoint could not take: the restart is refused
    monkeypatch.setattr(md_loop, "dynamics_state", lambda dyn, settings: None)
    assert md(cu, tmp_path / "stateless", 4, *opts) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["md", "--restart", str(tmp_path / "stateless"), "--steps", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--restart: this run's {barostat} barostat state is not in its checkpoint" in err


def test_restart_of_a_log_without_the_volume_column(cu, tmp_path, monkeypatch):
    """A run directory written before ``volume_A3`` was logged continues with its own columns."""
    old = tuple(c for c in md_module.LOG_COLUMNS if c != "volume_A3")
    monkeypatch.setattr(md_loop, "LOG_COLUMNS", old)
    assert md(cu, tmp_path / "r", 3) == 0
    monkeypatch.undo()
    assert main(["md", "--restart", str(tmp_path / "r"), "--steps", "6", "--quiet"]) == 0
    with open(tmp_path / "r" / "log.csv") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == old and {len(line) for line in lines} == {len(old)}
    assert [line[0] for line in lines[1:]] == [str(i) for i in range(7)]


def test_existing_run_is_not_overwritten(cu, tmp_path, capsys):
    assert md(cu, tmp_path / "r", 2) == 0
    capsys.readouterr()
    assert md(cu, tmp_path / "r", 2) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert md(cu, tmp_path / "r", 3, "--overwrite") == 0
    assert read_log(tmp_path / "r")[-1]["step"] == "3" and len(read_log(tmp_path / "r")) == 4


# ----------------------------------------------------------------------------- errors
def _error_cases(tmp_path: Path, cu: Path):
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a crystal\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    from ase.constraints import FixAtoms

    atoms = ase.io.read(cu)
    atoms.set_constraint(FixAtoms([0]))
    fixed = tmp_path / "fixed.xyz"
    ase.io.write(fixed, atoms)
    base = ["md", str(cu), "--model", LJ, "--steps", "2", "--quiet", "-o", str(tmp_path / "o")]
    return {
        "missing file": (["md", str(tmp_path / "nope.cif"), "--model", "lj", "--steps", "2"],
                         "STRUCTURE: expected a structure file, got"),
        "unreadable file": (["md", str(garbage), "--model", "lj", "--steps", "2"],
                            "neither could read"),
        "unknown model": ([*base[:3], "sevennet-9", *base[4:]], "--model: expected one of"),
        "element the model lacks": ([*base[:3], "schnet:max_z=10", *base[4:]],
                                    "no parameters for atomic number(s) [29] (Cu)"),
        "bad supercell": ([*base, "--supercell", "2x2"], "--supercell: expected AxBxC"),
        "partitions < 1": ([*base, "--partitions", "0"],
                           "--partitions (num_parts): expected an integer >= 1"),
        "bad partitions": ([*base, "--partitions", "many"],
                           "--partitions (num_parts): expected an integer"),
        "output not writable": ([*base, "-o", str(blocker / "run")],
                                "--output: expected a directory distmlip can write"),
        "restart without checkpoint": (["md", "--restart", str(empty), "--steps", "3"],
                                       "has none; start a run with --output DIR first"),
        "restart changing physics": (["md", "--restart", str(empty), "--steps", "3", "--temperature", "10"],
                                     "--temperature: cannot change when restarting"),
        "bad number": ([*base, "--timestep", "fast"], "argument --timestep: invalid float value: 'fast'"),
        "negative timestep": ([*base, "--timestep", "-1"], "--timestep: expected a positive number"),
        "negative steps": ([*base[:5], "-5", *base[6:]], "--steps: expected an integer >= 0"),
        "bad max memory": ([*base, "--max-memory", "lots"], "--max-memory: expected a size with a unit"),
        "unknown option": ([*base, "--temprature", "3"], "unrecognized arguments: --temprature"),
        "no model": (["md", str(cu), "--steps", "2"], "--model: expected a model name"),
        "run: missing file": (["run", str(tmp_path / "x.xyz"), "--model", "lj"], "does not exist"),
        "partition: no cutoff": (["partition", str(cu)], "--cutoff/--model: expected exactly one"),
        "barostat without npt": ([*base, "--barostat", "mtk"], "--barostat: only npt has a barostat"),
        "compressibility with mtk": ([*base, "--ensemble", "npt", "--barostat", "mtk", "--compressibility",
                                      "0.01"], "--compressibility: only the berendsen barostat uses it"),
        "mtk at 0 K": ([*base, "--ensemble", "npt", "--barostat", "mtk-iso", "--temperature", "0"],
                       "--temperature: the mtk-iso barostat needs a temperature > 0 K"),
        "mtk with constraints": ([*base[:1], str(fixed), *base[2:], "--ensemble", "npt", "--barostat", "mtk"],
                                 "--barostat: mtk (ASE's MTK integrator) does not support constraints, "
                                 "got FixAtoms"),
        "restart changing barostat": (["md", "--restart", str(empty), "--steps", "3", "--barostat", "mtk"],
                                      "--barostat: cannot change when restarting"),
    }


CASES = ["missing file", "unreadable file", "unknown model", "element the model lacks", "bad supercell",
         "partitions < 1", "bad partitions", "output not writable", "restart without checkpoint",
         "restart changing physics", "bad number", "negative timestep", "negative steps", "bad max memory",
         "unknown option", "no model", "run: missing file", "partition: no cutoff", "barostat without npt",
         "compressibility with mtk", "mtk at 0 K", "mtk with constraints", "restart changing barostat"]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line(case, tmp_path, cu, capsys):
    argv, expected = _error_cases(tmp_path, cu)[case]
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"distmlip {argv[0]}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out


def test_verbose_shows_the_traceback(tmp_path, cu, capsys):
    assert main(["md", str(cu), "--model", "schnet:max_z=10", "--steps", "1", "-o", str(tmp_path / "o"),
                 "--quiet", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("distmlip md: error: numbers: SchNet has no parameters")


def test_python_m_distmlip(cu, tmp_path):
    """The entry point in a fresh process: an error is one line with a non-zero status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "distmlip", "md", str(tmp_path / "missing.cif"),
                           "--model", "lj", "--steps", "1"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distmlip md: error: STRUCTURE: expected a structure file, got '{tmp_path / 'missing.cif'}', "
        f"which does not exist"]


def test_run_json(cu, capsys):
    assert main(["run", str(cu), "--model", LJ, "--json", "--partitions", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    atoms = ase.io.read(cu)
    atoms.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    assert result["num_parts"] == 3
    assert result["energy_eV"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(result["forces_eV_per_A"], atoms.get_forces(), atol=1e-12)
    np.testing.assert_allclose(result["stress_eV_per_A3_voigt"], atoms.get_stress(), atol=1e-12)


# ----------------------------------------------------------------------------- other commands
def test_run_table(cu, capsys):
    assert main(["run", str(cu), "--model", LJ, "--show", "2", "-p", "2", "--partitioner", "slab"]) == 0
    out = capsys.readouterr().out
    atoms = ase.io.read(cu)
    atoms.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    assert f"{atoms.get_potential_energy():18.8f} eV" in out
    assert "(slab, halo): 2 parts, all at once" in out and "... 30 more atoms" in out
    assert f"{atoms.get_forces()[1][2]:14.8f}" in out


def test_relax_positions_and_cell(tmp_path, capsys):
    """An expanded LJ crystal relaxes, with --cell, to its stress-free lattice (written out)."""
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
    atoms.rattle(0.05, seed=1)
    ase.io.write(tmp_path / "in.cif", atoms)
    out = tmp_path / "relaxed.cif"
    assert main(["relax", str(tmp_path / "in.cif"), "--model", LJ, "--cell", "--fmax", "1e-3",
                 "-o", str(out), "--supercell", "2x2x2"]) == 0
    assert "converged" in capsys.readouterr().out
    relaxed = ase.io.read(out)
    relaxed.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    assert np.abs(relaxed.get_forces()).max() < 2e-3
    assert np.abs(relaxed.get_stress()).max() < 1e-4
    assert len(relaxed) == 32 and relaxed.get_volume() < atoms.get_volume() * 8


def test_partition_statistics_and_picture(cu, tmp_path, capsys):
    from distmlip.graph import NeighborGraph
    from distmlip.partition import PartitionPlan

    png = tmp_path / "parts.png"
    assert main(["partition", str(cu), "--cutoff", "5", "-p", "4", "--mode", "extended", "--layers", "2",
                 "--plot", str(png), "--supercell", "2x1x1"]) == 0
    out = capsys.readouterr().out
    atoms = ase.io.read(cu).repeat((2, 1, 1))
    plan = PartitionPlan.build(NeighborGraph.from_atoms(atoms, 5.0), 4, "grid", "extended", num_hops=2)
    halo = sum(p.num_halo for p in plan.parts)
    assert f"{'total':>5} {64:>8} {halo:>8}" in out
    assert f"redundancy (edges evaluated / graph edges {plan.num_edges}) {plan.redundancy():.3f}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


#: packages (and what they pull) that `distmlip models` must not import
HEAVY = ("sevenn", "chgnet", "mace", "nequip", "allegro", "matgl", "dgl", "fairchem", "orb_models",
         "mattersim", "e3nn", "pymatgen")


def test_models_lists_without_importing_model_packages(tmp_path):
    """`distmlip models` in a fresh process: every shipped name with its package and installed
    version (from the metadata), the reference models, the adapters; no model package imported."""
    from importlib.metadata import PackageNotFoundError, version

    from distmlip.cli.commands import _DISTRIBUTIONS
    from distmlip.models import registry

    code = ("import json, sys, time\nfrom distmlip.cli import main\nt = time.perf_counter()\n"
            "status = main(['models'])\nseconds = time.perf_counter() - t\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(json.dumps([status, seconds, heavy]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *table, last = proc.stdout.strip().splitlines()
    status, seconds, imported = json.loads(last)
    assert status == 0 and imported == [], imported
    rows = {line.split()[0]: line.split() for line in table if line.strip()}
    for adapter in registry.ADAPTERS:
        module = __import__(f"distmlip.models.{adapter}", fromlist=["PRETRAINED"])
        dist = _DISTRIBUTIONS[adapter]
        try:
            expected = version(dist)
        except PackageNotFoundError:
            expected = "no"
        assert rows[adapter][1:3] == [dist, expected]
        for name in getattr(module, "PRETRAINED", {}):
            assert rows[name][1:3] == [dist, expected]
    assert rows["lj"][1:3] == rows["schnet"][1:3] == ["distmlip", "yes"]
    assert "distmlip models --check" in proc.stdout
    print(f"distmlip models: {seconds:.2f} s in the process")


def test_models_check_loads_and_names_missing_packages(monkeypatch, capsys):
    from distmlip.cli import commands
    from distmlip.models import registry

    monkeypatch.setattr(registry, "ADAPTERS", {"mace": registry.ADAPTERS["mace"],
                                               "chgnet": registry.ADAPTERS["chgnet"]})
    monkeypatch.setattr(commands, "REFERENCE_MODELS", {"lj": commands.REFERENCE_MODELS["lj"]})  # fast
    real = commands._installed
    monkeypatch.setattr(commands, "_installed",
                        lambda adapter: (real(adapter)[0], None) if adapter == "chgnet" else real(adapter))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "not installed: pip install 'distmlip[chgnet]'" in out
    assert next(line for line in out.splitlines() if line.startswith("chgnet-0.3.0")).split()[1:3] == [
        "chgnet", "no"]
    assert main(["models", "--check"]) == 0  # loads lj; chgnet is "not installed"
    lines = capsys.readouterr().out.splitlines()
    lj = next(line for line in lines if line.startswith("lj "))
    assert lj.split() == ["lj", "3", "1", "any", "distmlip", "ok"]
    assert next(line for line in lines if line.startswith("chgnet-0.3.0")).endswith("package not installed")


def test_model_from_a_saved_file(cu, tmp_path, capsys):
    import torch

    torch.save(LennardJones(0.4, 2.3, 5.0), tmp_path / "lj.pt")
    assert main(["run", str(cu), "--model", str(tmp_path / "lj.pt"), "--json"]) == 0
    atoms = ase.io.read(cu)
    atoms.calc = DistributedCalculator(LennardJones(0.4, 2.3, 5.0))
    assert json.loads(capsys.readouterr().out)["energy_eV"] == pytest.approx(atoms.get_potential_energy(),
                                                                             rel=1e-12)


def test_serve_hands_calculator_and_address_to_serve_ipi(cu, monkeypatch, capsys):
    seen = {}

    def serve_ipi(calculator, atoms, address, *, timeout=None, on_step=None):
        seen.update(calc=calculator, atoms=atoms, address=address, timeout=timeout)
        return 7

    from distmlip.cli import commands

    monkeypatch.setattr(commands, "serve_ipi", serve_ipi)
    assert main(["serve", str(cu), "--model", LJ, "-p", "2", "--ipi", "unix:dm",
                 "--socket-timeout", "5"]) == 0
    assert seen["address"] == "unix:dm" and seen["timeout"] == 5.0 and len(seen["atoms"]) == 32
    assert isinstance(seen["calc"], DistributedCalculator) and seen["calc"].num_parts == 2
    assert "served 7 force evaluations" in capsys.readouterr().out
    # i-PI applies its own constraints: the forces served are the model's, on fixed atoms too
    from ase.constraints import FixAtoms

    atoms = ase.io.read(cu)
    atoms.set_constraint(FixAtoms([0, 1]))
    ase.io.write(cu, atoms)
    assert main(["serve", str(cu), "--model", LJ, "--ipi", "unix:dm"]) == 0
    assert seen["atoms"].constraints == [] and len(seen["atoms"]) == 32
    assert "constraints (FixAtoms) are not applied to the forces sent" in capsys.readouterr().err


def test_bench_forwards_or_explains(monkeypatch, tmp_path, capsys):
    from distmlip.cli import commands

    assert main(["bench", "--help"]) == 0  # bench/run.py's own help, in a subprocess
    monkeypatch.setattr(commands, "__file__", str(tmp_path / "a" / "b" / "commands.py"))
    assert main(["bench"]) == 2
    assert "expected the benchmark suite at" in capsys.readouterr().err


def test_examples_at_reduced_size(monkeypatch, capsys, tmp_path):
    for script, argv in (("relax_slab.py", ["--model", "lj", "--size", "2", "--layers", "3"]),
                         ("inspect_partition.py", ["--reps", "3", "--plot", str(tmp_path / "p.png")])):
        monkeypatch.setattr(sys, "argv", [script, *argv])
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "relaxed" in out and "imbalance" in out
    assert (tmp_path / "p.png").exists()


def test_demo_at_reduced_size(tmp_path, capsys):
    """`distmlip demo` end to end: SevenNet-0 MD through `distmlip md`, the comparison table, SchNet."""
    assert main(["demo", "-o", str(tmp_path), "--supercell", "1x1x2", "--steps", "3",
                 "--schnet-atoms", "256", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SevenNetCalculator (sevenn)" in out and "max_memory" in out
    assert (tmp_path / "md" / "energy.png").exists() and (tmp_path / "partition.png").exists()


# ----------------------------------------------------------------------------- mpirun
@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_md_under_a_launcher_matches_one_process(cu, tmp_path, launcher):
    """`mpirun -n 2 python -m distmlip md` and `torchrun --nproc-per-node 2 -m distmlip md` (one part
    per rank, Langevin): rank 0 alone writes, and the log equals the single-process run's."""
    exe = Path(sys.executable).parent / launcher
    assert exe.exists(), f"{exe} is missing: install the project with `make install`"
    launch = ([str(exe), "-n", "2", sys.executable, "-m", "distmlip"] if launcher == "mpirun"
              else [str(exe), "--nproc-per-node", "2", "-m", "distmlip"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "TORCHELASTIC", "MASTER_", "LOCAL_RANK"))
           and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    args = ["md", str(cu), "--model", LJ, "--steps", "8", "--ensemble", "nvt", "--write-every", "4",
            "--quiet"]
    proc = subprocess.run([*launch, *args, "-o", str(tmp_path / "mpi")], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("distmlip md: 32 atoms") == 1  # rank 0 only
    assert "2 part(s) (grid, halo), backend torch, 2 process(es)" in proc.stdout
    assert main([*args, "-o", str(tmp_path / "one"), "--partitions", "1"]) == 0
    mpi, one = read_log(tmp_path / "mpi"), read_log(tmp_path / "one")
    assert [r["step"] for r in mpi] == [r["step"] for r in one] == [str(i) for i in range(9)]
    for col in ("epot", "ekin", "pressure_GPa"):
        np.testing.assert_allclose([float(r[col]) for r in mpi], [float(r[col]) for r in one], rtol=1e-10)
    np.testing.assert_allclose(final(tmp_path / "mpi").positions, final(tmp_path / "one").positions,
                               atol=1e-10)


RANK1_MODEL = '''
import os

from distmlip.models import LennardJones


class FailsOnRankOne(LennardJones):
    """Lennard-Jones that refuses to evaluate in the process of rank 1 of a launch."""

    def forward(self, graph):
        if os.environ.get("PMI_RANK", os.environ.get("RANK")) == "1":
            raise ValueError("numbers: FailsOnRankOne refuses rank 1's part (on purpose)")
        return super().forward(graph)
'''


@pytest.mark.mpi
def test_an_error_on_one_rank_is_reported_by_that_rank(cu, tmp_path):
    """mpirun -n 2 with a model that fails on rank 1 only: rank 1's own error reaches stderr once,
    prefixed with its rank, and the job fails; a bad command line is reported once, by rank 0."""
    import torch

    exe = Path(sys.executable).parent / "mpirun"
    assert exe.exists(), f"{exe} is missing: install the project with `make install`"
    (tmp_path / "rank1_model.py").write_text(RANK1_MODEL)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "TORCHELASTIC", "MASTER_", "LOCAL_RANK"))
           and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", PYTHONWARNINGS="ignore")
    sys.path.insert(0, str(tmp_path))
    try:
        import rank1_model

        torch.save(rank1_model.FailsOnRankOne(0.4, 2.3, 5.0), tmp_path / "model.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rank1_model", None)
    launch = [str(exe), "-n", "2", sys.executable, "-m", "distmlip", "md", str(cu), "--model",
              str(tmp_path / "model.pt"), "--steps", "2", "--quiet", "-o", str(tmp_path / "o")]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    line = "[rank 1/2] distmlip md: error: numbers: FailsOnRankOne refuses rank 1's part (on purpose)"
    assert proc.stderr.splitlines().count(line) == 1, proc.stderr
    # rank 0 learns of it from the failed collective: said once (by the runner), not repeated
    stopped = [x for x in proc.stderr.splitlines() if "rank 0 stopped" in x]
    assert len(stopped) == 1 and "rank 1" in stopped[0], proc.stderr
    proc = subprocess.run([*launch, "--temprature", "3"], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distmlip md: error: unrecognized arguments: --temprature 3 (see `distmlip md --help`)"]


@pytest.mark.slow
def test_model_from_a_sevennet_checkpoint(tmp_path, capsys):
    """--model PATH to a SevenNet checkpoint gives what `distmlip.load("sevennet-0")` gives."""
    pytest.importorskip("sevenn")
    import sevenn.util

    from distmlip import load

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=2)
    ase.io.write(tmp_path / "si.cif", atoms)
    path = sevenn.util.pretrained_name_to_path("7net-0")
    assert main(["run", str(tmp_path / "si.cif"), "--model", path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    atoms = ase.io.read(tmp_path / "si.cif")
    atoms.calc = DistributedCalculator(load("sevennet-0"))
    assert result["energy_eV"] == pytest.approx(atoms.get_potential_energy(), rel=1e-6)
    np.testing.assert_allclose(result["forces_eV_per_A"], atoms.get_forces(), atol=1e-5)


def test_md_names_the_parts_a_budget_used(tmp_path, capsys):
    """`distmlip md --max-memory`: the opening line says the parts may grow, a closing line names
    the parts used and the predicted peak."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    atoms.rattle(0.05, seed=0)
    ase.io.write(tmp_path / "cu256.xyz", atoms)
    assert main(["md", str(tmp_path / "cu256.xyz"), "--model", "schnet", "--max-memory", "30MB",
                 "--steps", "1", "-q", "-o", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "1+ part(s) (grid, halo, as --max-memory needs)" in out
    line = next(x for x in out.splitlines() if x.startswith("parts: "))
    assert "parts, one at a time, predicted peak" in line and line.endswith("of a 30 MB budget")
