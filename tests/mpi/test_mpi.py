"""Multi-process runtime: the same calculator under mpirun and torchrun (gloo on CPU).

Each launch is wrapped in a timeout: a broken launch must fail, never hang the suite.
"""

import re
import subprocess
import sys
import time

import pytest

from support import SCRIPTS, launch
from support import launcher_env as _env

pytestmark = pytest.mark.mpi


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
    """50 MD steps with graph reuse (several rebuilds), then two strained cells (one kept, one
    rebuilt), 2 parts per rank, against fresh single-process builds at every step; every rank
    rebuilds at the same steps."""
    proc, _ = launch("mpirun", 2, "md.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "steps 52" in proc.stdout  # 50 MD steps after the first frame, then two cells
    # the ranks' lines may be interleaved in the launcher's output: find them anywhere
    builds = re.findall(r"rank (\d): builds (\d+) then (\d+)", proc.stdout)
    assert len(builds) == 2 and builds[0][1:] == builds[1][1:], out[-4000:]


FAULT_TIMEOUT = 5.0


@pytest.mark.parametrize("kind,where", [("mpirun", "model"), ("mpirun", "script"), ("mpirun", "kill"),
                                        ("mpirun", "hang"), ("torchrun", "model"),
                                        pytest.param("torchrun", "script", marks=pytest.mark.slow),
                                        ("torchrun", "kill"),
                                        pytest.param("torchrun", "hang", marks=pytest.mark.slow)])
def test_failing_rank_stops_everyone(kind, where):
    """Rank 1 raises, is SIGKILLed mid-exchange or hangs: the launcher exits non-zero within the
    timeout of the failure, and the output names rank 1 and what happened to it."""
    proc, seconds = launch(kind, 2, "fault.py", where, timeout=120, FAULT_TIMEOUT=str(FAULT_TIMEOUT))
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    injected = re.search(rf"injected {where} at ([0-9.]+)", out)
    assert injected, out[-3000:]
    # survivors stop within the timeout of the failure (plus the launcher's clean-up)
    assert ended - float(injected.group(1)) < FAULT_TIMEOUT + 10, out[-3000:]
    if where in ("model", "script"):
        # the failing rank reports (and under MPI aborts the job); a peer that notices names it
        assert "injected failure" in out, out[-3000:]
        assert "rank 1 failed" in out, out[-3000:]
        if where == "model":  # the injected MemoryError is named as a device out of memory
            assert "out of memory while evaluating the model (injected failure" in out, out[-3000:]
    elif where == "hang":
        # the peer's halo exchange times out; rank 1's process is still there: hung
        assert re.search(r"rank 0 stopped: .* because rank 1 \(pid \d+\) is alive but did not answer",
                         out), out[-3000:]
    else:
        died = re.search(r"rank 0 stopped: .* because rank 1 \(pid \d+\) died", out)
        if kind == "mpirun" and not died:
            # MPICH's mpiexec kills the survivors at once, naming the dead process by pid only:
            # distmlip's start-up line maps that pid to rank 1
            pid = re.search(r"BAD TERMINATION.*?PID (\d+)", out, re.S)
            assert pid and re.search(rf"distmlip: 2 ranks \(.*1: pid {pid.group(1)}\b", out), out[-3000:]
        else:
            assert died, out[-3000:]


def test_srun_environment():
    """Two processes given the variables srun sets in a 2-task step (SLURM is not installed
    here): they detect the launch, meet at task 0's node and agree with one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                   SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost",
                   MASTER_PORT=str(port))
        env = {k: v for k, v in env.items() if not (k.startswith("SLURM_") and k not in (
            "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
            "SLURM_LOCALID", "SLURM_STEP_NODELIST"))}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / "srun.py")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out[-3000:]
        assert f"rank {rank}: srun launch equal to one process" in out, out[-3000:]


def test_world_size_mismatch_is_an_error():
    proc, _ = launch("mpirun", 2, "mismatch.py", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "num_parts: expected a multiple of the number of processes (2)" in out, out[-3000:]


def test_exchange_buffers_are_reused_between_steps():
    """The point-to-point exchange of a build and its send and receive buffers are made once: a
    second step without a rebuild uses the same buffers (data_ptr), every call refilling them,
    and both steps equal the single-process results."""
    proc, _ = launch("torchrun", 2, "buffers.py", timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert re.search(rf"rank {rank}: \d+ buffers \['grad', 'recv', 'send'\], same buffers True, "
                         r"4 exchanges", out), out[-4000:]


def test_independent_exchanges_stay_ordered_across_ranks():
    """Two feature tensors exchanged per layer, unordered by the data: the token chain keeps every
    rank's backward exchanges in the same order (no deadlock, no mixed-up gradients)."""
    proc, _ = launch("mpirun", 3, "two_exchanges.py", timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("4 exchanges") == 3, out[-4000:]
