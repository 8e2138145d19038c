"""Launchers: which one started this process, the torch.distributed rendezvous, and how a failing
rank makes itself known to its peers.

``mpirun``/``mpiexec`` (MPICH or Open MPI; mpi4py does the rendezvous), ``torchrun`` or SLURM's
``srun`` (the rendezvous from SLURM's variables: rank 0's node, ``MASTER_PORT``). Every rank runs
the same user script.

Failures: at start-up every rank learns every other's host and process id (``roster``). A rank
whose collective fails or times out names the peers that reported an error (``report_failure``,
kept in the process group's store), that have died (their process is gone: same host only) or
that are alive but did not answer (hung), prints that at once (a launcher may kill it moments
later) and raises ``CommunicationError``.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import CommunicationError

__all__ = ["CommunicationError", "Launch", "detect_launch", "init_distributed",
           "install_failure_hook", "report_failure", "reported_failures", "is_comm_failure",
           "peer_status", "slurm_rendezvous"]

#: ``MASTER_PORT`` under ``srun`` when the environment does not set it (torchrun's default).
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process."""

    launcher: str  # "torchrun", "mpich", "openmpi", "slurm", "initialized"
    rank: int
    world_size: int
    local_rank: int


def detect_launch() -> Launch | None:
    """The launcher this process runs under (with more than one process), or None."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        return Launch("initialized", dist.get_rank(), dist.get_world_size(),
                      int(env.get("LOCAL_RANK", dist.get_rank())))
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("openmpi", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launch("mpich", int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                      int(env.get("MPI_LOCALRANKID", env.get("PMI_RANK"))))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _srun_step(env):
        size = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if size > 1:
            return Launch("slurm", int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)))
    return None


def _srun_step(env) -> bool:
    """Whether this process is a task of an ``srun`` job step (srun sets the step's variables; a
    batch script run by ``sbatch`` alone is one process even when the job has several tasks)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None and "SLURM_STEP_NUM_TASKS" not in env:
        return False
    return step not in ("batch", "extern", "interactive", "4294967294", "4294967295", "4294967293")


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"node[01-04,07],gpu3"`` -> ``"node01"``."""
    nodelist = nodelist.strip()
    head, bracket, rest = nodelist.partition("[")
    if "," in head or not bracket:  # "a,b[1-2]" or "a": the first entry has no range
        return head.split(",")[0]
    inside, _, tail = rest.partition("]")
    return head + inside.split(",")[0].split("-")[0] + tail.split(",")[0]


def slurm_rendezvous(env=None) -> tuple[str, int]:
    """``(address, port)`` of the rendezvous of an ``srun`` step: ``MASTER_ADDR`` if set, else the
    node of task 0 (the first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``; tasks are
    placed in node-list order, so task 0 runs there; ``SLURM_LAUNCH_NODE_IPADDR``, the node srun
    was called from, when there is no node list), and ``MASTER_PORT`` if set, else
    ``DEFAULT_MASTER_PORT + SLURM_JOB_ID % 1000``."""
    env = os.environ if env is None else env
    address = env.get("MASTER_ADDR")
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        address = _first_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not address:
        raise RuntimeError("srun: expected SLURM_STEP_NODELIST, SLURM_LAUNCH_NODE_IPADDR or MASTER_ADDR "
                           "in the environment to find task 0's node, got none; set MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if port is None:  # jobs sharing a node get different ports; every task computes the same one
        job = env.get("SLURM_JOB_ID", "0")
        port = DEFAULT_MASTER_PORT + (int(job) % 1000 if job.isdigit() else 0)
    try:
        port = int(port)
    except ValueError:
        raise ValueError(f"MASTER_PORT: expected a port number, got {port!r}") from None
    return address, port


def init_distributed(launch: Launch, backend: str, timeout: float) -> None:
    """Initialise the default process group once (a no-op if it already is)."""
    if dist.is_initialized():
        return
    delta = datetime.timedelta(seconds=timeout)
    if launch.launcher in ("torchrun", "slurm"):
        if launch.launcher == "torchrun":
            dist.init_process_group(backend, init_method="env://", timeout=delta)
        else:
            host, port = slurm_rendezvous()
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=launch.rank,
                                    world_size=launch.world_size, timeout=delta)
        _ROSTER[:] = [None] * launch.world_size
        dist.all_gather_object(_ROSTER, (socket.gethostname(), os.getpid()))
        install_failure_hook(launch.rank, on_terminate=launch.launcher == "torchrun")
        _close_at_exit()
        return
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "running under mpirun needs mpi4py for the rendezvous: pip install mpi4py mpich"
        ) from exc
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launch.world_size:
        raise RuntimeError(
            f"mpi4py sees {comm.Get_size()} processes but the launcher says {launch.world_size}; "
            f"use the mpirun that belongs to the MPI library mpi4py was built with"
        )
    address = None
    if comm.Get_rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = (os.environ.get("MASTER_ADDR") or _host_address(), port)
    _ROSTER[:] = comm.allgather((socket.gethostname(), os.getpid()))
    hosts = [h for h, _ in _ROSTER]
    address = comm.bcast(address, root=0)
    host = "127.0.0.1" if len(set(hosts)) == 1 else address[0]
    dist.init_process_group(
        backend, init_method=f"tcp://{host}:{address[1]}", rank=comm.Get_rank(),
        world_size=comm.Get_size(), timeout=delta,
    )
    install_failure_hook(comm.Get_rank(), mpi_abort=True)
    _close_at_exit()
    if launch.launcher == "mpich" and comm.Get_rank() == 0:
        # MPICH's mpiexec reports a process that died by its pid only, and kills the others at
        # once (they cannot say which rank it was): say here which pid is which rank
        ranks = ", ".join(f"{r}: pid {pid}" + (f" on {h}" if len(set(hosts)) > 1 else "")
                          for r, (h, pid) in enumerate(_ROSTER))
        print(f"distmlip: {launch.world_size} ranks ({ranks})", file=sys.stderr, flush=True)


def _close_at_exit() -> None:
    """Shut the process group down before the interpreter does: gloo's threads destroyed during
    interpreter teardown abort the process ("terminate called without an active exception")."""
    def close():
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

    atexit.register(close)


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


_FAIL_KEY = "distmlip/failed/{rank}"

#: (host, pid) of every rank, learnt at start-up.
_ROSTER: list = []


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def peer_status(me: int, peers=None, grace: float = 0.5) -> str:
    """What is known of the other ranks (or of ``peers``) when a collective has failed: the errors
    they reported, then which have died (same host: their process is gone, or goes within
    ``grace`` seconds) and which are alive but did not answer. '' if nothing is known."""
    world = len(_ROSTER)
    peers = [r for r in (range(world) if peers is None else peers) if r != me and r < world]
    reported = reported_failures(world, me, peers)
    out = [reported] if reported else []
    here = socket.gethostname()
    dead, silent, remote = [], [], []
    local = []
    for r in peers:
        if reported and f"rank {r} failed" in reported:
            continue
        host, pid = _ROSTER[r]
        if host != here:
            remote.append(f"{r} (pid {pid} on {host})")
        else:
            local.append((r, pid))
    # a killed process closes its sockets before it is gone: give a dying peer a moment
    deadline = time.monotonic() + grace
    while True:
        gone = {r for r, pid in local if not _alive(pid)}
        if gone or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for r, pid in local:
        (dead if r in gone else silent).append(f"{r} (pid {pid})")
    if dead:
        out.append(f"rank {', '.join(dead)} died (its process is gone: killed, out of memory or "
                   f"exited)" if len(dead) == 1 else
                   f"ranks {', '.join(dead)} died (their processes are gone: killed, out of memory or "
                   f"exited)")
    if silent and not reported and not dead:
        out.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(silent)} "
                   f"{'are' if len(silent) > 1 else 'is'} alive but did not answer (hung, or "
                   f"itself waiting for another rank)")
    if remote and not out:
        out.append(f"rank{'s' if len(remote) > 1 else ''} {', '.join(remote)} did not answer "
                   f"(failed, died or hung on another node)")
    return "; ".join(out)


def report_failure(rank: int, exc: BaseException) -> None:
    """Leave this rank's error in the process group's store, where waiting peers look."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_FAIL_KEY.format(rank=rank), f"{type(exc).__name__}: {exc}"[:2000])
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def reported_failures(world_size: int, me: int, peers=None) -> str:
    """'rank r failed: ...' for every peer (of ``peers``, default all) that reported an error, or ''."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return ""
    found = []
    for r in (range(world_size) if peers is None else peers):
        if r == me:
            continue
        key = _FAIL_KEY.format(rank=r)
        try:
            if store.check([key]):
                found.append(f"rank {r} failed: {store.get(key).decode()}")
        except Exception:  # noqa: BLE001 - the store may be gone with its host
            continue
    return "; ".join(found)


def install_failure_hook(rank: int, mpi_abort: bool = False, on_terminate: bool = False) -> None:
    """Make an uncaught exception anywhere in this rank's script visible to its peers (they name
    it when their next collective fails), let Python report it as usual, and under MPI abort the
    job (MPI_Finalize would otherwise wait forever for a hung peer). ``on_terminate``: when the
    launcher stops this rank with SIGTERM (torchrun does, once another rank has failed), say
    which rank failed or died before exiting."""
    previous = sys.excepthook
    if getattr(previous, "_distmlip", False):
        return
    if on_terminate and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def terminated(signum, frame):
            status = peer_status(rank)
            print(f"distmlip: rank {rank} stopped by the launcher (SIGTERM)"
                  + (f" because {status}" if status else ""), file=sys.stderr, flush=True)
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)

    def hook(kind, value, tb):
        if dist.is_initialized():
            report_failure(rank, value)
        previous(kind, value, tb)
        if mpi_abort:
            print(f"distmlip: rank {rank} failed ({kind.__name__}: {value}); aborting the MPI job",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # give the launcher a moment to forward this rank's output, and the peers to notice
            # and name the failure, before the abort takes every process down
            time.sleep(1.0)
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(1)

    hook._distmlip = True
    sys.excepthook = hook


def is_comm_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection", "peer"))
