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
import types
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.cli import main
from distmlip.cli import md as md_module
from distmlip.models import LennardJones

ROOT = Path(__file__).resolve().parents[1]
LJ = "lj:epsilon=0.4,sigma=2.3,cutoff=5.0"  # roughly Cu (tests/conftest.py LJ_PARAMS)


@pytest.fixture
def cu(tmp_path) -> Path:
    """A rattled 32-atom Cu cell as extxyz."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    path = tmp_path / "cu.xyz"
    ase.io.write(path, atoms)
    return path


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
    real = md_module._savez

    def dying(f, **arrays):
        calls.append(1)
        if len(calls) == 3:  # step 0, step 4, then die writing step 8
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        real(f, **arrays)

    monkeypatch.setattr(md_module, "_savez", dying)
    out = tmp_path / "crash"
    assert md(cu, out, 14, *opts) == 2
    monkeypatch.setattr(md_module, "_savez", real)
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
                           "--partitions (num_partitions): expected an integer >= 1"),
        "bad partitions": ([*base, "--partitions", "many"],
                           "--partitions (num_partitions): expected an integer"),
        "output not writable": ([*base, "-o", str(blocker / "run")],
                                "--output: expected a directory distmlip can write"),
        "restart without checkpoint": (["md", "--restart", str(empty), "--steps", "3"],
                                       "has none; start a run with --output DIR first"),
        "restart changing physics": (["md", "--restart", str(empty), "--steps", "3", "--temperature", "10"],
                                     "--temperature: cannot change when restarting"),
        "bad number": ([*base, "--timestep", "fast"], "argument --timestep: invalid float value: 'fast'"),
        "negative timestep": ([*base, "--timestep", "-1"], "--timestep: expected a positive number"),
        "negative steps": ([*base[:5], "-5", *base[6:]], "--steps: expected an integer >= 0"),
        "bad max memory": ([*base, "--max-memory", "lots"], "--max-memory (max_memory): expected"),
        "unknown option": ([*base, "--temprature", "3"], "unrecognized arguments: --temprature"),
        "no model": (["md", str(cu), "--steps", "2"], "--model: expected a model name"),
        "run: missing file": (["run", str(tmp_path / "x.xyz"), "--model", "lj"], "does not exist"),
        "partition: no cutoff": (["partition", str(cu)], "--cutoff/--model: expected exactly one"),
    }


CASES = ["missing file", "unreadable file", "unknown model", "element the model lacks", "bad supercell",
         "partitions < 1", "bad partitions", "output not writable", "restart without checkpoint",
         "restart changing physics", "bad number", "negative timestep", "negative steps", "bad max memory",
         "unknown option", "no model", "run: missing file", "partition: no cutoff"]


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
    assert result["num_partitions"] == 3
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
    assert "2 part(s) (slab, halo)" in out and "... 30 more atoms" in out
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


def test_models_lists_reference_models_and_notes(monkeypatch, capsys):
    from distmlip.models import registry

    monkeypatch.setattr(registry, "ADAPTERS", {"mace": registry.ADAPTERS["mace"]})
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["lj", "3", "1"] for line in out.splitlines())
    assert any(line.split()[:3] == ["schnet", "5", "3"] for line in out.splitlines())
    assert "note: mace: no weights shipped offline" in out


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

    def serve_ipi(calculator, atoms, address, *, timeout=None):
        seen.update(calc=calculator, atoms=atoms, address=address, timeout=timeout)
        return 7

    monkeypatch.setitem(sys.modules, "distmlip.serve", types.SimpleNamespace(serve_ipi=serve_ipi))
    assert main(["serve", str(cu), "--model", LJ, "-p", "2", "--ipi", "unix:dm",
                 "--socket-timeout", "5"]) == 0
    assert seen["address"] == "unix:dm" and seen["timeout"] == 5.0 and len(seen["atoms"]) == 32
    assert isinstance(seen["calc"], DistributedCalculator) and seen["calc"].num_partitions == 2
    assert "served 7 force evaluations" in capsys.readouterr().out


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


@pytest.mark.slow
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
