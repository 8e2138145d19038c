"""``distmlip md`` you can leave running: signals and --max-time stop with a checkpoint and one
line, a blow-up stops the run, a restart with nothing to do writes nothing.

The CLI runs as a subprocess (``python -m distmlip``) where the exit status or a signal matters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

import distmlip.md as md_module

from support import BIN, ROOT, launcher_env
from support import LJ_SPEC as LJ  # roughly Cu (LJ_PARAMS)


def _env() -> dict:
    env = launcher_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def distmlip(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmlip", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _wait_for(path: Path, proc, seconds=120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.1)
    time.sleep(1.0)  # well into the loop


def _last_log_step(run: Path) -> int:
    lines = (run / "log.csv").read_text().strip().splitlines()
    return int(lines[-1].split(",")[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_and_says_how_to_continue(cu, tmp_path, sig):
    """A signal finishes the step, writes the checkpoint (log, frame) at it, prints one line naming
    the step, the signal and the command to continue, and exits 128+signal; the restart goes on."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "distmlip", "md", str(cu), "--model", LJ,
                             "--steps", "1000000", "--write-every", "100000", "-o", str(run), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(run / "checkpoint.npz", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    state = md_module.load_checkpoint(run)
    step = state["step"]
    assert step > 0 and _last_log_step(run) == step
    assert ase.io.read(run / "trajectory.extxyz", index=-1).info["step"] == step
    line = (f"interrupted at step {step} by {signal.Signals(sig).name}; checkpoint at step {step}; "
            f"continue with: distmlip md --restart {run} --steps 1000000")
    assert line in out.splitlines(), (out, err)
    assert "Traceback" not in err
    proc = distmlip("md", "--restart", run, "--steps", step + 5, "-q")
    assert proc.returncode == 0, proc.stderr
    assert _last_log_step(run) == step + 5


def test_max_time_stops_before_the_limit(cu, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = distmlip("md", cu, "--model", LJ, "--steps", 10**7, "--write-every", 10**6, "-o", run, "-q",
                    "--max-time", "0:08")
    assert time.monotonic() - t0 < 8 + 4  # the interpreter's start and exit on top
    assert proc.returncode == 0, proc.stderr
    step = md_module.load_checkpoint(run)["step"]
    assert 0 < step < 10**7 and _last_log_step(run) == step
    assert (f"stopped at step {step} before --max-time 0:08; checkpoint at step {step}; continue "
            f"with: distmlip md --restart {run} --steps 10000000") in proc.stdout.splitlines()


def test_bad_max_time_is_refused(cu, tmp_path):
    proc = distmlip("md", cu, "--model", LJ, "--steps", 5, "-o", tmp_path / "r", "--max-time", "1:xx")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("distmlip md: error: --max-time: expected a wall time HH:MM:SS, "
                                   "MM:SS or seconds > 0, got '1:xx'; pass e.g. --max-time 23:50:00")


def test_blow_up_stops_the_run(cu, tmp_path):
    """--timestep 30 at 3000 K explodes: one line naming the step and the quantity, exit 3, the
    checkpoint and trajectory of the last good step kept."""
    run = tmp_path / "run"
    proc = distmlip("md", cu, "--model", LJ, "--steps", 300, "--timestep", 30, "--temperature", 3000,
                    "-o", run, "-q")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmlip md: error: the run blew up: temperature ")
    assert "above --max-temperature 30000 K at step 1;" in lines[0]
    state = md_module.load_checkpoint(run)
    assert state["step"] == 0 and np.isfinite(state["atoms"].positions).all()
    assert "hold step 0" in lines[0]
    assert len(ase.io.read(run / "trajectory.extxyz", index=":")) == 1


def test_max_temperature_flag(cu, tmp_path):
    proc = distmlip("md", cu, "--model", LJ, "--steps", 50, "--temperature", 300, "-o", tmp_path / "r",
                    "-q", "--max-temperature", "200")
    assert proc.returncode == 3
    assert "above --max-temperature 200 K at step " in proc.stderr


def test_nothing_to_do_writes_nothing(cu, tmp_path):
    run = tmp_path / "run"
    assert distmlip("md", cu, "--model", LJ, "--steps", 5, "-o", run, "-q").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    proc = distmlip("md", "--restart", run, "--steps", 5, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do, nothing written" in proc.stdout
    assert "wrote" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def _rank_pids(marker: str) -> list[int]:
    """The python processes whose command line holds ``marker`` (the launched ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in c for c in cmd) and Path(cmd[0].decode()).name.startswith("python"):
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.mark.mpi
def test_sigterm_under_mpirun_stops_every_rank_at_one_step(cu, tmp_path):
    """SIGTERM to one rank of `mpirun -n 2 distmlip md`: both ranks stop at the same step (agreed by
    an all-reduce each step), rank 0 writes the checkpoint there and says so."""
    run = tmp_path / "mpirun-run"
    proc = subprocess.Popen([str(BIN / "mpirun"), "-n", "2", sys.executable, "-m", "distmlip", "md",
                             str(cu), "--model", LJ, "--steps", "1000000", "--write-every", "100000",
                             "-o", str(run), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(run / "checkpoint.npz", proc, seconds=180)
        pids = _rank_pids(str(run))
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGTERM)  # one rank only: the other learns it at the next step
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    step = md_module.load_checkpoint(run)["step"]
    assert step > 0 and _last_log_step(run) == step
    assert (f"interrupted at step {step} by SIGTERM; checkpoint at step {step}; continue with: "
            f"distmlip md --restart {run} --steps 1000000") in out.splitlines(), (out, err)
    assert proc.returncode != 0
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- outputs checked first
def test_relax_output_format_checked_before_work(cu, tmp_path):
    """An output name ASE cannot tell a format from is refused before the model runs."""
    proc = distmlip("relax", cu, "--model", LJ, "-o", tmp_path / "relaxed.vasp_out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distmlip relax: error: --output: expected a file whose name tells ASE a format it writes "
        f"(.extxyz, .cif, .vasp, POSCAR, .traj, ...), got '{tmp_path / 'relaxed.vasp_out'}'; pass e.g. "
        f"--output relaxed.extxyz"]
    assert proc.stdout == ""  # no optimiser step ran


def test_relax_write_failure_saves_the_result(cu, tmp_path, monkeypatch):
    """A write that fails anyway at the end: the result is saved as extxyz next to it."""
    from distmlip.cli import commands, main

    real = ase.io.write

    def failing(path, images, **kw):
        if str(path).endswith(".cif"):
            raise RuntimeError("disk on fire")
        return real(path, images, **kw)

    monkeypatch.setattr(ase.io, "write", failing)
    assert main(["relax", str(cu), "--model", LJ, "-o", str(tmp_path / "r.cif"), "--fmax", "0.5"]) == 0
    saved = tmp_path / "r.saved.extxyz"
    assert saved.is_file() and len(ase.io.read(saved)) == 32
    assert commands is not None


@pytest.mark.parametrize("plot, expected", [
    ("nowhere/parts.png", "--plot: expected a file in an existing directory, got 'nowhere/parts.png'"),
    ("parts.xyz", "--plot: expected a picture file named .png, .pdf, .svg, ..., got 'parts.xyz'; "
                  "pass e.g. --plot parts.png"),
])
def test_partition_plot_path_checked_first(cu, plot, expected):
    proc = distmlip("partition", cu, "--cutoff", 5, "--plot", plot)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"distmlip partition: error: {expected}"] or \
        proc.stderr.strip().startswith(f"distmlip partition: error: {expected}"), proc.stderr


# ----------------------------------------------------------------------------- flags that mean one thing
@pytest.mark.parametrize("args, expected", [
    (["md", "CU", "--model", LJ, "--steps", "2", "--pressure", "1"],
     "distmlip md: error: --pressure: has no effect under --ensemble nve (only npt has a target "
     "pressure); pass --ensemble npt or drop --pressure"),
    (["md", "CU", "--model", LJ, "--steps", "2", "--friction", "2"],
     "distmlip md: error: --friction: has no effect under --ensemble nve (only nvt (Langevin) has a "
     "friction); pass --ensemble nvt or drop --friction"),
    (["md", "CU", "--model", LJ, "--steps", "2", "--ensemble", "nvt", "--taup", "5"],
     "distmlip md: error: --taup: has no effect under --ensemble nvt (only npt has a barostat time); "
     "pass --ensemble npt or drop --taup"),
    (["md", "CU", "--model", LJ, "--steps", "2", "--seed", "-1"],
     "distmlip md: error: --seed: expected an integer >= 0, got -1; pass e.g. 0"),
    (["run", "CU", "--model", LJ, "--max-memory", "2.0"],
     "distmlip run: error: --max-memory: expected a size with a unit (6GB, 500MB, 2GiB) or a fraction "
     "of the device's memory in (0, 1], got '2.0'; pass e.g. --max-memory 2GB or --max-memory 0.5"),
    (["run", "CU", "--model", LJ, "--max-memory", "-1GB"],
     "distmlip run: error: --max-memory: expected a size with a unit (6GB, 500MB, 2GiB) or a fraction "
     "of the device's memory in (0, 1], got '-1GB'; pass e.g. --max-memory 2GB or --max-memory 0.5"),
    (["run", "CU", "--model", LJ, "--supercell", "-1x1x1"],
     "distmlip run: error: --supercell: expected AxBxC with integers >= 1, got '-1x1x1'; pass e.g. "
     "--supercell 4x4x2"),
    (["run", "CU", "--model", "./missing.pth"],
     "distmlip run: error: --model: expected a model name or a saved model file, got './missing.pth', "
     "which does not exist; check the path, or see `distmlip models` for the names"),
    (["run", "CU", "--model", "lj:foo=1"],
     "distmlip run: error: --model: lj has no option 'foo', got 'lj:foo=1'; expected lj:key=number,... "
     "with keys from ['epsilon', 'sigma', 'cutoff', 'dtype']"),
    (["serve", "CU", "--model", LJ, "--ipi", "localhost:1"],
     "distmlip serve: error: --ipi: no i-PI server listens at localhost:1 (ConnectionRefusedError); "
     "start the server first, or pass --socket-timeout SECONDS to wait for it"),
])
def test_refusals_name_the_flag_and_the_fix(cu, tmp_path, args, expected):
    args = [str(cu) if a == "CU" else a for a in args]
    if args[0] == "md":
        args += ["-o", str(tmp_path / "run")]
    proc = distmlip(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [expected], proc.stderr


def test_max_memory_fraction_and_unit_accepted(cu):
    for value in ("0.5", "2GB"):
        proc = distmlip("run", cu, "--model", LJ, "--max-memory", value, "--show", 0)
        assert proc.returncode == 0, proc.stderr


def test_reader_warnings_folded_into_the_error_line(tmp_path):
    bad = tmp_path / "t.cif"
    bad.write_text("data_x\n_cell_length_a 3.6\n_cell_length_b 3.6\n_cell_length_c 3.6\n"
                   "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\nloop_\n"
                   "_atom_site_label\n_atom_site_fract_x\n_atom_site_fract_y\nCu 0 0\n")
    proc = distmlip("run", bad, "--model", LJ)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmlip run: error: STRUCTURE: expected a file"), \
        proc.stderr
    assert "warning(s), the first:" in lines[0]


def test_restart_under_other_ranks_names_the_fix(cu, tmp_path):
    """A 3-part run continued under a launcher of 2 processes: the message names --partitions 2."""
    from distmlip.cli import main

    run = tmp_path / "run"
    assert main(["md", str(cu), "--model", LJ, "--steps", "2", "-o", str(run), "-q",
                 "--partitions", "3"]) == 0
    env = {"PMI_RANK": "0", "PMI_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-m", "distmlip", "md", "--restart", str(run), "--steps", "4"],
                          capture_output=True, text=True, timeout=120, env={**_env(), **env})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"distmlip md: error: --partitions: the run in '{run}' was made with 3 parts, which 2 processes "
        f"cannot share evenly; continue it with --partitions 2 (or another multiple of 2)")


# ----------------------------------------------------------------------------- starting temperature
def test_starting_temperature_is_exact(cu, tmp_path):
    """The default rescales the Maxwell-Boltzmann draw (after removing the centre-of-mass momentum)
    to --temperature exactly, and the opening line says so with the targets; --no-rescale keeps
    the raw draw."""
    proc = distmlip("md", cu, "--model", LJ, "--steps", 0, "--temperature", 400, "--ensemble", "nvt",
                    "-o", tmp_path / "a", "-q")
    assert proc.returncode == 0, proc.stderr
    atoms = md_module.load_checkpoint(tmp_path / "a")["atoms"]
    assert abs(atoms.get_temperature() - 400) < 1e-9
    assert np.abs(atoms.get_momenta().sum(axis=0)).max() < 1e-12
    assert ("nvt 1.0 fs, start 400.0 K, target 400 K (Langevin, friction 1/ps); "
            in proc.stdout.splitlines()[0]), proc.stdout
    proc = distmlip("md", cu, "--model", LJ, "--steps", 0, "--temperature", 400, "--no-rescale",
                    "-o", tmp_path / "b", "-q")
    assert proc.returncode == 0, proc.stderr
    raw = md_module.load_checkpoint(tmp_path / "b")["atoms"]
    assert abs(raw.get_temperature() - 400) > 1e-3
    assert np.allclose(raw.get_momenta() * np.sqrt(400 / raw.get_temperature()), atoms.get_momenta())


# ----------------------------------------------------------------------------- exact restarts
def test_float32_restart_is_bit_identical(tmp_path):
    """A float32 SchNet, 200 steps at once vs stopped at 70 and 140 and restarted twice: the same
    positions and momenta bit for bit (the checkpoint records the graph's build reference, so the
    restart sums in the same order)."""
    from distmlip.cli import main

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=1)
    structure = tmp_path / "cu16.xyz"
    ase.io.write(structure, atoms)
    model = "schnet:hidden_channels=8,num_interactions=2,num_gaussians=10,cutoff=4.5"
    common = ["--model", model, "--dtype", "float32", "--timestep", "0.5", "--write-every", "50",
              "--quiet"]
    assert main(["md", str(structure), *common, "--steps", "200", "-o", str(tmp_path / "full")]) == 0
    assert main(["md", str(structure), *common, "--steps", "70", "-o", str(tmp_path / "split")]) == 0
    for steps in ("140", "200"):
        assert main(["md", "--restart", str(tmp_path / "split"), "--steps", steps, "--quiet"]) == 0
    a, b = (md_module.load_checkpoint(tmp_path / d)["atoms"] for d in ("full", "split"))
    assert np.array_equal(a.positions, b.positions)
    assert np.array_equal(a.get_momenta(), b.get_momenta())


# ----------------------------------------------------------------------------- run, relax, serve
def test_run_every_frame_writes_extxyz(cu, tmp_path):
    """`run` evaluates every frame (--index :, the default) and -o writes them with energy,
    forces, stress and per-atom energies; --index -1 is the last frame alone."""
    frames = [bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2)) for a in (3.55, 3.61, 3.67)]
    traj = tmp_path / "three.extxyz"
    ase.io.write(traj, frames)
    out = tmp_path / "evaluated.extxyz"
    proc = distmlip("run", traj, "--model", LJ, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 3 frames (energy, forces, stress, per-atom energies) to {out}" in proc.stdout
    assert "3 frames of" in proc.stdout
    got = ase.io.read(out, index=":")
    assert len(got) == 3
    from distmlip import DistributedCalculator
    from distmlip.models import LennardJones

    for frame, ref in zip(got, frames, strict=True):
        ref.calc = DistributedCalculator(LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0))
        assert abs(frame.get_potential_energy() - ref.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(frame.get_forces(), ref.get_forces(), atol=1e-8)
        np.testing.assert_allclose(frame.get_stress(), ref.get_stress(), atol=1e-8)
        np.testing.assert_allclose(frame.calc.results["energies"], ref.get_potential_energies(), atol=1e-8)
    proc = distmlip("run", traj, "--model", LJ, "--index", "-1", "--show", 0)
    assert proc.returncode == 0 and proc.stdout.startswith("32 atoms"), proc.stdout


def test_relax_optimizer_pressure_trajectory(cu, tmp_path):
    """--optimizer bfgs with --pressure relaxes the cell under pressure (smaller volume than at
    0 GPa) and --trajectory writes every step."""
    vols = {}
    for p in ("0", "5"):
        out, traj = tmp_path / f"r{p}.extxyz", tmp_path / f"t{p}.extxyz"
        proc = distmlip("relax", cu, "--model", LJ, "--optimizer", "bfgs", "--pressure", p,
                        "--trajectory", traj, "-o", out, "--fmax", "0.01")
        assert proc.returncode == 0, proc.stderr
        frames = ase.io.read(traj, index=":")
        assert len(frames) >= 2 and "BFGS" in proc.stdout
        vols[p] = ase.io.read(out).get_volume()
    assert vols["5"] < vols["0"] - 1.0


def test_serve_says_where_it_connects_at_once(cu):
    proc = distmlip("serve", cu, "--model", LJ, "--ipi", "unix:distmlip-nobody-here", "--socket-timeout", 1)
    assert proc.returncode == 2
    assert proc.stdout.startswith("distmlip serve: 32 atoms (Cu32), model " + LJ), proc.stdout
    assert "connecting to the i-PI server at unix:distmlip-nobody-here" in proc.stdout


def test_serve_progress_is_a_sign_of_life(cu):
    from ase.calculators.socketio import SocketIOCalculator

    name = f"distmlip-progress-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "distmlip", "serve", str(cu), "--model", LJ,
                             "--ipi", f"unix:{name}", "--socket-timeout", "60", "--progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        atoms = ase.io.read(cu)
        with SocketIOCalculator(unixsocket=name, timeout=60) as server:
            atoms.calc = server
            for _ in range(3):
                atoms.get_potential_energy()
                atoms.positions[0, 0] += 0.01
            server.server.protocol.end()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "connected to unix:" in out and "served 3 force evaluations" in out
    assert "3eval" in err.replace(" ", ""), err


def test_restart_without_plot_redraws_stale_plots(cu, tmp_path):
    run = tmp_path / "run"
    assert distmlip("md", cu, "--model", LJ, "--steps", 5, "-o", run, "-q", "--plot").returncode == 0
    before = (run / "energy.png").stat().st_mtime_ns
    proc = distmlip("md", "--restart", run, "--steps", 10, "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {run / 'energy.png'} (redrawn: it was drawn before this restart)" in proc.stdout
    assert (run / "energy.png").stat().st_mtime_ns > before


# ----------------------------------------------------------------------------- SchNet pickles
def test_schnet_saves_and_loads_as_model_file(cu, tmp_path):
    """The shipped SchNet has no local classes: torch.save works, and `--model FILE` (a fresh
    process) gives the energy of the model it was saved from."""
    import torch

    from distmlip import DistributedCalculator
    from distmlip.models import SchNet

    model = SchNet(hidden_channels=8, num_interactions=2, num_gaussians=10, seed=3)
    path = tmp_path / "schnet.pt"
    torch.save(model, path)
    proc = distmlip("run", cu, "--model", path, "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    got = json.loads(proc.stdout)
    atoms = ase.io.read(cu)
    atoms.calc = DistributedCalculator(model)
    assert abs(got["energy_eV"] - atoms.get_potential_energy()) < 1e-10


def test_plot_nowhere_names_dir(tmp_path):
    proc = distmlip("plot", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distmlip plot: error: DIR: expected a run directory of distmlip md (holding log.csv), got "
        f"'{tmp_path / 'nowhere'}', which does not exist; pass the --output directory of an md run"]


def test_warnings_print_as_one_line():
    """The command line prints warnings (the backend's under mpirun, ...) without a source line."""
    import warnings

    from distmlip.cli import main

    saved = warnings.formatwarning
    try:
        main(["plot", "/nonexistent-distmlip-dir"])
        text = warnings.formatwarning("the torch backend needs ...", UserWarning, __file__, 1)
    finally:
        warnings.formatwarning = saved
    assert text == "UserWarning: the torch backend needs ...\n"
