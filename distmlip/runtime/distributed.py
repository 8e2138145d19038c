"""Multi-process execution on torch.distributed: one part per rank.

Launched by ``mpirun``/``mpiexec`` (MPICH or Open MPI; mpi4py does the rendezvous) or ``torchrun``.
Every rank runs the same user script. Each call: rank 0's positions are broadcast, every rank
agrees on the owner of each atom, builds the neighbour graph of only its own region plus halo,
runs the model with a point-to-point halo exchange between layers (gradients go home in the
backward pass), and one all-reduce gives every rank the full, identical results.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..graph import NeighborGraph, atoms_near, validate_system
from ..models.base import DistributableModel, no_exchange
from ..partition import PartPlan, assign_owners, build_part, owned_rows
from ..partition.assign import grid_owners, slab_owners
from .local import Evaluation, add_edge_terms, build_local_graph, run_model

__all__ = ["DistributedRunner", "Launch", "detect_launch", "init_distributed", "CommunicationError"]


class CommunicationError(RuntimeError):
    """A peer rank failed, died or did not answer in time."""


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


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class _P2PExchange(torch.autograd.Function):
    """Forward: send owned rows to the ranks that hold them in their halo, receive the halo.
    Backward: send the halo rows' gradients home, add the gradients received to the owned rows.
    A token chains the calls so that every rank runs their backward passes in the same order."""

    @staticmethod
    def forward(ctx, x, token, exchange):
        ctx.exchange = exchange
        out = x.clone()
        exchange._swap(x, out, backward=False)
        return out, token.clone()

    @staticmethod
    def backward(ctx, grad_out, grad_token):
        exchange = ctx.exchange
        grad_x = grad_out.clone()
        exchange._swap(grad_out, grad_x, backward=True)
        return grad_x, grad_token, None


class P2PHaloExchange:
    """The halo exchange of one rank (``x -> x``), point-to-point with the peers it shares halo
    atoms with. ``send[q]``: rows of owned atoms rank ``q`` holds; ``recv[q]``: halo rows owned
    by ``q``."""

    def __init__(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor], device):
        self.send = send
        self.recv = recv
        self.device = device
        # the first token is a leaf: asking autograd for its gradient makes every rank run every
        # exchange's backward pass, in the same order, even where features carry no gradient
        self.first_token = torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
        self.token = self.first_token
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out, self.token = _P2PExchange.apply(x, self.token, self)
        return out

    def _swap(self, source: torch.Tensor, target: torch.Tensor, backward: bool) -> None:
        """Forward: target[recv] = peers' source[send]. Backward: target[recv] = 0 and
        target[send] += peers' source[recv]."""
        t0 = time.perf_counter()
        outgoing, incoming = (self.recv, self.send) if backward else (self.send, self.recv)
        ops, buffers = [], []
        tail = tuple(source.shape[1:])
        for peer, rows in incoming.items():
            buf = torch.empty((len(rows), *tail), dtype=source.dtype, device=source.device)
            buffers.append((rows, buf, peer))
            ops.append(dist.P2POp(dist.irecv, buf, peer))
        for peer, rows in outgoing.items():
            ops.append(dist.P2POp(dist.isend, source.index_select(0, rows).contiguous(), peer))
        if ops:
            try:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            except RuntimeError as exc:
                peers = sorted(set(self.send) | set(self.recv))
                raise CommunicationError(
                    f"halo exchange with rank(s) {peers} failed ({'backward' if backward else 'forward'} "
                    f"pass): a peer has failed, died or timed out. {exc}"
                ) from exc
        if backward:
            for rows in self.recv.values():
                target.index_fill_(0, rows, 0)
            for rows, buf, _ in buffers:
                target.index_add_(0, rows, buf)
        else:
            for rows, buf, _ in buffers:
                target.index_copy_(0, rows, buf)
        self.seconds += time.perf_counter() - t0


_FAIL_KEY = "distmlip/failed/{rank}"


def _report_failure(rank: int, exc: BaseException) -> None:
    """Leave this rank's error in the process group's store, where waiting peers look."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_FAIL_KEY.format(rank=rank), f"{type(exc).__name__}: {exc}"[:2000])
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def _reported_failures(world_size: int, me: int) -> str:
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
            _report_failure(rank, value)
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


def _is_comm_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection", "peer"))


class DistributedRunner:
    """Evaluates one part per rank of the default process group.

    Args:
        model: the model (copied to this rank's device and dtype).
        device: this rank's device.
        dtype: floating dtype (``None``: the model's).
        partitioner, mode: as for ``DistributedCalculator``.
    """

    def __init__(self, model: DistributableModel, device: torch.device, dtype, partitioner: str,
                 mode: str):
        import copy

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.dtype = dtype or model.dtype
        self.partitioner = partitioner
        if mode not in ("halo", "extended"):
            raise ValueError(f"mode: expected one of ['halo', 'extended'], got {mode!r}")
        self.mode = mode
        self.model = copy.deepcopy(model).to(device=device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.hops = model.num_layers if mode == "extended" else 1
        self.cutoff = model.cutoff
        self.timings: dict[str, float] = {}
        self.last_part: PartPlan | None = None
        self.last_graph: NeighborGraph | None = None
        self.last_exchange_calls = 0

    # ------------------------------------------------------------------ helpers
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _broadcast_system(self, positions, cell, pbc, numbers):
        """Everyone gets rank 0's system (rank 0's positions are the truth)."""
        dev = self._comm_device()
        n = torch.tensor([len(positions) if self.rank == 0 else 0], dtype=torch.int64, device=dev)
        dist.broadcast(n, 0)
        n = int(n.item())
        packed = torch.zeros(3 * n + 9 + 3, dtype=torch.float64, device=dev)
        ints = torch.zeros(n, dtype=torch.int64, device=dev)
        if self.rank == 0:
            packed[: 3 * n] = torch.as_tensor(np.ravel(positions), dtype=torch.float64)
            packed[3 * n : 3 * n + 9] = torch.as_tensor(np.ravel(cell), dtype=torch.float64)
            packed[3 * n + 9 :] = torch.as_tensor(np.asarray(pbc, dtype=np.float64))
            ints[:] = torch.as_tensor(np.asarray(numbers, dtype=np.int64))
        dist.broadcast(packed, 0)
        dist.broadcast(ints, 0)
        packed = packed.cpu().numpy()
        return (packed[: 3 * n].reshape(n, 3), packed[3 * n : 3 * n + 9].reshape(3, 3),
                packed[3 * n + 9 :] > 0.5, ints.cpu().numpy())

    def _owners(self, positions, cell, pbc, numbers) -> np.ndarray:
        if self.partitioner == "slab":
            return slab_owners(positions, cell, pbc, self.world_size)
        if self.partitioner == "grid":
            return grid_owners(positions, cell, pbc, self.world_size)
        # METIS needs the whole graph: rank 0 builds it and partitions, everyone receives owners
        dev = self._comm_device()
        owner = torch.zeros(len(positions), dtype=torch.int64, device=dev)
        if self.rank == 0:
            graph = NeighborGraph.from_arrays(positions, cell, pbc, numbers, self.cutoff)
            owner[:] = torch.as_tensor(assign_owners(graph, self.world_size, "metis"))
            del graph
        dist.broadcast(owner, 0)
        return owner.cpu().numpy()

    def _exchange_maps(self, part: PartPlan, ids: np.ndarray, owner: np.ndarray):
        """Agree with the peers on who sends which rows: each rank tells each owner which of its
        atoms it holds in its halo (in halo-row order)."""
        dev = self._comm_device()
        halo_global = ids[part.atoms[part.num_owned :]]
        want = {int(q): halo_global[part.halo_owner == q] for q in np.unique(part.halo_owner)}
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=dev)
        for q, g in want.items():
            counts[q] = len(g)
        table = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(table, counts)
        asked = {q: int(table[q][self.rank]) for q in range(self.world_size)
                 if q != self.rank and int(table[q][self.rank]) > 0}
        ops, bufs = [], {}
        for q, n in asked.items():
            bufs[q] = torch.empty(n, dtype=torch.int64, device=dev)
            ops.append(dist.P2POp(dist.irecv, bufs[q], q))
        for q, g in want.items():
            ops.append(dist.P2POp(dist.isend, torch.as_tensor(g, device=dev), q))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        rows = owned_rows(owner, self.world_size)
        send = {q: torch.as_tensor(rows[b.cpu().numpy()], device=self.device) for q, b in bufs.items()}
        recv = {q: torch.as_tensor(part.num_owned + np.flatnonzero(part.halo_owner == q),
                                   device=self.device) for q in want}
        return send, recv

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        """Evaluate rank 0's system; every rank returns the same full results."""
        try:
            return self._evaluate(positions, cell, pbc, numbers)
        except CommunicationError as exc:
            failed = _reported_failures(self.world_size, self.rank)
            if failed:
                raise CommunicationError(f"rank {self.rank} stopped because {failed}") from exc
            raise
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                _report_failure(self.rank, exc)
                raise
            failed = _reported_failures(self.world_size, self.rank)
            raise CommunicationError(
                f"rank {self.rank} stopped: a collective with the other ranks failed or timed out"
                + (f" because {failed}" if failed else " (a peer has failed, died or hung)")
                + f". {exc}"
            ) from exc
        except BaseException as exc:
            _report_failure(self.rank, exc)
            raise

    def _evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        t0 = time.perf_counter()
        if self.rank == 0:
            positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        positions, cell, pbc, numbers = self._broadcast_system(positions, cell, pbc, numbers)
        positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        n = len(positions)
        t1 = time.perf_counter()
        owner = self._owners(positions, cell, pbc, numbers)
        mine = owner == self.rank
        ids = atoms_near(positions, cell, pbc, mine, self.hops * self.cutoff) if mine.any() \
            else np.zeros(0, dtype=np.int64)
        t2 = time.perf_counter()
        if len(ids):
            graph = NeighborGraph.from_arrays(positions[ids], cell, pbc, numbers[ids], self.cutoff)
            part = build_part(graph, self.rank, owner[ids], owned_rows(owner, self.world_size)[ids],
                              self.hops)
        else:
            graph, part = None, None
        t3 = time.perf_counter()
        exchange = None
        if self.mode == "halo":
            empty = PartPlan(self.rank, np.zeros(0, np.int64), 0, np.zeros(0, np.int64),
                             np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((2, 0), np.int64))
            send, recv = self._exchange_maps(part or empty, ids, owner)
            exchange = P2PHaloExchange(send, recv, self.device)
        t4 = time.perf_counter()
        buffer = np.zeros(4 * n + 9)  # energies (N), forces (N, 3), virial (3, 3)
        if part is not None or exchange is not None:
            self._compute(graph, part, ids, exchange, buffer, n)
        t5 = time.perf_counter()
        total = torch.as_tensor(buffer, device=self._comm_device())
        dist.all_reduce(total)
        total = total.cpu().numpy()
        t6 = time.perf_counter()
        energies = total[:n]
        virial = total[4 * n :].reshape(3, 3)
        self.last_graph, self.last_part = graph, part
        self.last_exchange_calls = exchange.calls if exchange else 0
        comm = (exchange.seconds if exchange else 0.0)
        self.timings = {
            "broadcast": t1 - t0, "partition": t2 - t1, "graph": t3 - t2, "handshake": t4 - t3,
            "evaluate": t5 - t4, "exchange": comm, "reduce": t6 - t5, "total": t6 - t0,
            "communication": (t1 - t0) + (t4 - t3) + comm + (t6 - t5),
        }
        return Evaluation(float(energies.sum()), energies.copy(),
                          total[n : 4 * n].reshape(n, 3).copy(), 0.5 * (virial + virial.T))

    def _compute(self, graph: NeighborGraph | None, part: PartPlan | None, ids, exchange,
                 buffer, n) -> None:
        """Run the model on this rank's part and add its terms to ``buffer`` (energies, forces,
        virial). A rank without atoms still runs the model on an empty graph: its peers expect it
        in every halo exchange, forward and backward."""
        if part is None:
            local = build_local_graph(None, [], np.zeros((0, 3)), np.zeros((2, 0), np.int64), np.zeros(0, bool),
                                      np.zeros(0, np.int64), self.device, self.dtype, exchange)
        else:
            owned = np.arange(part.num_local) < part.num_owned
            vec = graph.edge_vectors(part.edges)
            local = build_local_graph(graph, part.atoms, vec, part.edge_index, owned,
                                      ids[part.atoms], self.device, self.dtype,
                                      exchange if exchange is not None else no_exchange)
        energies = run_model(self.model, local)
        loss = energies.sum()
        wrt = [local.edge_vec]
        if exchange is not None:
            loss = loss + 0.0 * exchange.token.to(loss.device, loss.dtype)
            wrt.append(exchange.first_token)
        grad = torch.autograd.grad(loss, wrt, allow_unused=True)[0] if loss.requires_grad else None
        if part is None:
            return
        g = np.zeros((len(part.edges), 3)) if grad is None else grad.detach().to("cpu", torch.float64).numpy()
        buffer[ids[part.owned]] = energies.detach().to("cpu", torch.float64).numpy()
        if len(part.edges):
            buffer[4 * n :] += add_edge_terms(
                buffer[n : 4 * n].reshape(n, 3), ids[graph.receivers[part.edges]],
                ids[graph.senders[part.edges]], vec, g,
            ).ravel()
