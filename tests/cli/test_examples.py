"""The examples run, at reduced size (the CLI, serve and wrapping examples are run by their own tests:
test_cli.py, test_serve.py, test_wrap.py)."""

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import ROOT

EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


def test_quickstart(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "energy" in out and "stress" in out


def test_ase_md_equals_one_part(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from ase_md import main
    finally:
        sys.path.remove(str(EXAMPLES))
    split = main(["--reps", "3", "--steps", "6", "--parts", "4"])
    whole = main(["--reps", "3", "--steps", "6", "--parts", "1"])
    assert "108 atoms, 4 parts, 6 steps" in capsys.readouterr().out
    start = main(["--reps", "3", "--steps", "0", "--parts", "1"])
    assert np.abs(split.positions - start.positions).max() > 1e-3  # the dynamics moved the atoms
    np.testing.assert_allclose(split.positions, whole.positions, rtol=0, atol=1e-9)


@pytest.mark.mpi
def test_mpirun_md_example(tmp_path):
    traj = tmp_path / "md.traj"
    cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, str(EXAMPLES / "mpirun_md.py"),
           "--reps", "3", "--steps", "3", "--trajectory", str(traj)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": str(BIN) + ":/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step ") >= 3, proc.stdout  # rank 0 prints, once per step
    from ase.io import read

    frames = read(traj, ":")
    assert len(frames) >= 2 and len(frames[0]) == 108
