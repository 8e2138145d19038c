"""Launchers: which one started this process, the torch.distributed rendezvous, and how a failing
rank makes itself known to its peers.

``mpirun``/``mpiexec`` (MPICH or Open MPI; mpi4py does the rendezvous) or ``torchrun``. Every rank
runs the same user script.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch.distributed as dist

from .exchange import CommunicationError

__all__ = ["CommunicationError", "Launch", "detect_launch", "init_distributed",
           "install_failure_hook", "report_failure", "reported_failures", "is_comm_failure"]


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process."""

    launcher: str  # "torchrun", "mpich", "openmpi", "initialized"
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
    return None


def init_distributed(launch: Launch, backend: str, timeout: float) -> None:
    """Initialise the default process group once (a no-op if it already is)."""
    if dist.is_initialized():
        return
    delta = datetime.timedelta(seconds=timeout)
    if launch.launcher == "torchrun":
        dist.init_process_group(backend, init_method="env://", timeout=delta)
        install_failure_hook(launch.rank)
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
    hosts = comm.allgather(socket.gethostname())
    address = comm.bcast(address, root=0)
    host = "127.0.0.1" if len(set(hosts)) == 1 else address[0]
    dist.init_process_group(
        backend, init_method=f"tcp://{host}:{address[1]}", rank=comm.Get_rank(),
        world_size=comm.Get_size(), timeout=delta,
    )
    install_failure_hook(comm.Get_rank(), mpi_abort=True)
    _close_at_exit()


def _close_at_exit() -> None:
    """Shut the process group down before the interpreter does: gloo's threads destroyed during
    interpreter teardown abort the process ("terminate called without an active exception")."""
    import atexit

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


def report_failure(rank: int, exc: BaseException) -> None:
    """Leave this rank's error in the process group's store, where waiting peers look."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_FAIL_KEY.format(rank=rank), f"{type(exc).__name__}: {exc}"[:2000])
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def reported_failures(world_size: int, me: int) -> str:
    """'rank r failed: ...' for every peer that reported an error, or ''."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return ""
    found = []
    for r in range(world_size):
        if r == me:
            continue
        key = _FAIL_KEY.format(rank=r)
        try:
            if store.check([key]):
                found.append(f"rank {r} failed: {store.get(key).decode()}")
        except Exception:  # noqa: BLE001 - the store may be gone with its host
            continue
    return "; ".join(found)


def install_failure_hook(rank: int, mpi_abort: bool = False) -> None:
    """Make an uncaught exception anywhere in this rank's script visible to its peers (they name
    it when their next collective fails), let Python report it as usual, and under MPI abort the
    job (MPI_Finalize would otherwise wait forever for a hung peer)."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "_distmlip", False):
        return

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
