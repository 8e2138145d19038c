"""Communication backends behind one small interface: ``LocalComm`` (one process: its workers are
the devices, threads meeting at a hub) and ``TorchComm`` (one worker per rank on
torch.distributed's default group). The runner, the build and the evaluations call the same
methods on either: the system every rank agrees on, flags and maxima agreed over ranks, the part
blocks of the workers and their devices, the exchange handshake (the results of a step over ranks:
``results.py``)."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.distributed as dist

from ..graph.neighbors import validate_system
from ..models.base import HaloExchange, no_exchange
from .exchange import Hub, LocalExchange, P2PExchange, PeerFailed
from .shards import Shard, part_groups

__all__ = ["THREAD_WAIT", "LocalComm", "TorchComm", "make_comm", "run_threads"]

#: Seconds (at least) a worker thread waits for the others at an in-process exchange: threads of
#: one process do not die silently, and one part may take minutes; the calculator's ``timeout``
#: (for peer ranks) raises it, never lowers it.
THREAD_WAIT = 600.0


class LocalComm:
    """The communication of a single process: nothing to communicate. Its workers are the
    devices (a thread each when there are several)."""

    rank, world_size = 0, 1

    def __init__(self, devices: list[torch.device], timeout: float = THREAD_WAIT):
        self.devices = list(devices)
        self.timeout = max(float(timeout), THREAD_WAIT)

    def groups(self, num_parts: int) -> list[range]:
        """The blocks of parts of this process's workers (one per device, at most one per part)."""
        return part_groups(num_parts, min(len(self.devices), num_parts))

    def device(self, shard: Shard) -> torch.device:
        """Where ``shard`` runs."""
        return self.devices[shard.index % len(self.devices)]

    @property
    def num_workers(self) -> int:
        """Workers in all (over every process)."""
        return len(self.devices)

    def exchanges(self, b, halo: bool) -> list[HaloExchange]:
        """One exchange per shard of build ``b`` (all parts at once), made once per build (their
        block rows on the devices) and reused at every step with a fresh hub. In extended mode
        (``halo`` false) they refresh nothing but still carry ``global_sum`` between the shards."""
        if not halo and len(b.shards) == 1:
            return [no_exchange]
        hub = Hub(len(b.shards), self.timeout) if len(b.shards) > 1 else None
        made = b.on_device.get(("exchanges", halo))
        if made is None:
            made = [LocalExchange(s, self.device(s), hub, halo=halo) for s in b.shards]
            with b.lock:
                b.on_device[("exchanges", halo)] = made
        for e in made:
            e.start_step(hub)
        return made

    def level_transport(self, b, mode: str) -> None:
        """What carries a sequential evaluation's level exchanges to other ranks: nothing."""
        return None

    def system(self, positions, cell, pbc, numbers):
        return validate_system(positions, cell, pbc, numbers)

    def agree(self, flag: bool) -> bool:
        return flag

    def maximum(self, value: float) -> float:
        return value

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return value


class TorchComm:
    """The collectives the runner needs, on torch.distributed's default group: one worker per
    rank, on this rank's device."""

    def __init__(self, device: torch.device):
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.devices = [device]
        self.wire = device if dist.get_backend() == "nccl" else torch.device("cpu")  # collectives' tensors

    def groups(self, num_parts: int) -> list[range]:
        """The blocks of parts of every rank (one each)."""
        return part_groups(num_parts, self.world_size)

    def device(self, shard: Shard) -> torch.device:
        return self.devices[0]

    @property
    def num_workers(self) -> int:
        return self.world_size

    def exchanges(self, b, halo: bool) -> list[HaloExchange]:
        """This rank's exchange (its one shard's), point to point with its peers: made once per
        build and reused at every step, its send and receive buffers too."""
        made = b.on_device.get(("exchanges", halo))
        if made is None:
            made = [P2PExchange(b.shards[0], b.send[0], self.devices[0], self.rank, halo=halo)]
            with b.lock:
                b.on_device[("exchanges", halo)] = made
        made[0].start_step()
        return made

    def level_transport(self, b, mode: str) -> P2PExchange | None:
        """The point-to-point transport of a sequential evaluation's level exchanges (halo mode).
        Its buffers are not kept (``reuse`` off): that evaluation bounds its memory, and a level's
        blocks live only until they are gathered."""
        if mode != "halo":
            return None
        p2p = P2PExchange(b.shards[0], b.send[0], self.devices[0], self.rank)
        p2p.reuse = False
        return p2p

    def system(self, positions, cell, pbc, numbers):
        """Everyone gets rank 0's system (rank 0's positions are the truth)."""
        if self.rank == 0:
            positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        dist, dev = self.dist, self.wire
        n = torch.tensor([len(positions) if self.rank == 0 else 0], dtype=torch.int64, device=dev)
        dist.broadcast(n, 0)
        n = int(n.item())
        packed = torch.zeros(3 * n + 12, dtype=torch.float64, device=dev)
        ints = torch.zeros(n, dtype=torch.int64, device=dev)
        if self.rank == 0:
            packed[: 3 * n] = torch.as_tensor(np.ravel(positions), dtype=torch.float64)
            packed[3 * n : 3 * n + 9] = torch.as_tensor(np.ravel(cell), dtype=torch.float64)
            packed[3 * n + 9 :] = torch.as_tensor(np.asarray(pbc, dtype=np.float64))
            ints[:] = torch.as_tensor(np.asarray(numbers, dtype=np.int64))
        dist.broadcast(packed, 0)
        dist.broadcast(ints, 0)
        packed = packed.cpu().numpy()
        return validate_system(packed[: 3 * n].reshape(n, 3), packed[3 * n : 3 * n + 9].reshape(3, 3),
                               packed[3 * n + 9 :] > 0.5, ints.cpu().numpy())

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=self.wire)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def maximum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.wire)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_owner(self, owner: np.ndarray | None, n: int) -> np.ndarray:
        t = torch.zeros(n, dtype=torch.int64, device=self.wire)
        if self.rank == 0:
            t[:] = torch.as_tensor(owner)
        self.dist.broadcast(t, 0)
        return t.cpu().numpy()

    def handshake(self, shard: Shard, device: torch.device) -> dict[int, torch.Tensor]:
        """Tell each source rank which of its owned rows this rank holds (in halo-row order);
        returns ``{peer: owned rows of this rank that peer holds}``."""
        told = self.tell({q: rows for q, rows in shard.blocks if q != self.rank})
        return {q: b.to(device) for q, b in told.items()}

    def tell(self, want: dict[int, np.ndarray]) -> dict[int, torch.Tensor]:
        """Send each peer ``q`` the int64 ids ``want[q]`` and return what each peer sent this rank
        (``{peer: (k,) int64 on the wire device}``, non-empty ones only): counts by ``all_gather``,
        then the ids point to point."""
        dist, dev = self.dist, self.wire
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=dev)
        for q, rows in want.items():
            counts[q] = len(rows)
        table = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(table, counts)
        asked = {q: int(table[q][self.rank]) for q in range(self.world_size)
                 if q != self.rank and int(table[q][self.rank]) > 0}
        ops, bufs = [], {}
        for q, count in asked.items():
            bufs[q] = torch.empty(count, dtype=torch.int64, device=dev)
            ops.append(dist.P2POp(dist.irecv, bufs[q], q))
        for q, rows in want.items():
            ops.append(dist.P2POp(dist.isend, torch.as_tensor(rows, dtype=torch.int64, device=dev), q))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return bufs

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value`` (a tensor; a new one, on ``value``'s device)."""
        t = value.detach().to(self.wire).clone().contiguous()
        self.dist.all_reduce(t)
        return t.to(value.device)


def make_comm(kind: str | None, devices: list[torch.device], timeout: float = THREAD_WAIT):
    """``None``: this process (``LocalComm``); ``"torch"``: torch.distributed (``TorchComm``, on
    ``devices[0]``; the group's ``timeout`` was set when it was initialised)."""
    return TorchComm(devices[0]) if kind == "torch" else LocalComm(devices, timeout)


def run_threads(work, count: int, hub: Hub | None) -> None:
    """``work(i)`` for i < ``count``, a thread each; the first real error is re-raised (naming its
    worker), and aborts the ``hub``'s barrier so that the others stop waiting."""
    errors: list[BaseException | None] = [None] * count

    def target(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[i] = exc
            if hub is not None:
                hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), name=f"distmlip-worker-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [(i, e) for i, e in enumerate(errors) if e is not None and not isinstance(e, PeerFailed)]
    if real:
        i, exc = real[0]
        exc.add_note(f"(raised in distmlip worker {i} of {count})")
        raise exc
    if any(errors):
        raise RuntimeError("a worker timed out waiting for the others at a halo exchange")
