"""Multi-process runtime: the same calculator under mpirun and torchrun (gloo on CPU).

Each launch is wrapped in a timeout: a broken launch must fail, never hang the suite.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).parent / "mpi_scripts"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "TORCHELASTIC", "MASTER_", "LOCAL_RANK"))
           and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def launch(kind, n, script, *args, timeout=240, **env):
    if kind == "mpirun":
        cmd = [str(BIN / "mpirun"), "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(n), str(SCRIPTS / script), *args]
    assert Path(cmd[0]).exists(), f"{cmd[0]} is missing: install the project with `make install`"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("kind,n", [("mpirun", 2), ("mpirun", 3), ("torchrun", 2)])
def test_equivalence_under_launcher(kind, n):
    proc, _ = launch(kind, n, "equivalence.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(n):
        assert f"rank {rank}: 132 checks passed" in out, out[-4000:]


@pytest.mark.parametrize("parts_per_rank", [2, 3])
def test_several_parts_per_rank(parts_per_rank):
    """mpirun -n 2 with 4 and 6 parts: each rank evaluates its block of parts as one shard."""
    proc, _ = launch("mpirun", 2, "equivalence.py", str(parts_per_rank))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert f"rank {rank}: 132 checks passed with {2 * parts_per_rank} parts" in out, out[-4000:]


def test_bounded_memory_under_launcher():
    """mpirun -n 2, 3 parts per rank evaluated one at a time (max_memory): the level exchanges
    run point to point between ranks; every combination equals the single-process result."""
    proc, _ = launch("mpirun", 2, "equivalence.py", "3", "--bounded")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert f"rank {rank}: 132 checks passed with 6 parts, one at a time" in out, out[-4000:]


def test_md_matches_single_process():
    """50 MD steps with graph reuse (several rebuilds, then a cell change), 2 parts per rank,
    against fresh single-process builds at every step; every rank rebuilds at the same steps."""
    proc, _ = launch("mpirun", 2, "md.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "steps 51" in proc.stdout
    # the ranks' lines may be interleaved in the launcher's output: find them anywhere
    builds = re.findall(r"rank (\d): builds (\d+) then (\d+)", proc.stdout)
    assert len(builds) == 2 and builds[0][1:] == builds[1][1:], out[-4000:]


@pytest.mark.parametrize("where", ["model", "script", "kill", "hang"])
def test_failing_rank_stops_everyone(where):
    """Rank 1 fails; every rank exits non-zero within a bounded time, naming the failure."""
    proc, seconds = launch("mpirun", 2, "fault.py", where, timeout=120, FAULT_TIMEOUT="5")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s to stop"
    if where in ("model", "script"):
        # the failing rank reports and aborts the job; a peer that noticed first names it too
        assert "injected failure" in out, out[-3000:]
        assert "rank 1 failed" in out or "[rank1]" in out, out[-3000:]
    elif where == "hang":
        # a hung rank: its peer's halo exchange times out, naming it, and aborts the job
        assert "CommunicationError" in out and "rank(s) [1]" in out, out[-3000:]
    else:
        # a killed rank: either the peer's exchange fails first, naming it, or MPI's launcher
        # notices the death first and tears the job down itself
        assert ("CommunicationError" in out and "rank(s) [1]" in out) or \
            "BAD TERMINATION" in out, out[-3000:]


def test_torchrun_failing_rank_stops_everyone():
    proc, seconds = launch("torchrun", 2, "fault.py", "model", timeout=120, FAULT_TIMEOUT="5")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < 60
    assert "rank 1 failed: MemoryError: injected failure" in out, out[-3000:]


def test_world_size_mismatch_is_an_error():
    proc, _ = launch("mpirun", 2, "mismatch.py", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "num_partitions: expected a multiple of the number of processes (2)" in out, out[-3000:]


def test_independent_exchanges_stay_ordered_across_ranks():
    """Two feature tensors exchanged per layer, unordered by the data: the token chain keeps every
    rank's backward exchanges in the same order (no deadlock, no mixed-up gradients)."""
    proc, _ = launch("mpirun", 3, "two_exchanges.py", timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("4 exchanges") == 3, out[-4000:]
