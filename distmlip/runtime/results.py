"""The results of one step across ranks without an O(N) all-reduce.

Each rank's step leaves, on its device, float64 energies on its owned atoms and forces on its owned
and halo atoms (``resident.StepState``). Summing full (4N + 9) buffers over ranks would make every
rank send O(N) numbers a step whatever its share. Instead (``gather_results``):

1. **home**: each rank sends its halo atoms' force contributions (3 numbers a row) to the rank
   that owns them, point to point, and adds what it receives to its owned rows, peers in ascending
   rank order (the same order every step: bit-identical from run to run);
2. **gather**: each rank's owned rows (energy and force, 4 numbers) and its virial (9) go to every
   rank (``all_gather``, padded to the largest owned count); the virials are summed in rank order.

A rank sends O(owned + halo) numbers a step (``ResultsPlan.bytes_sent``; the all-reduce sent
about 2 (P - 1) / P (4N + 9)); it receives the full results, which the ASE calculator returns on
every rank (an ASE loop runs on every rank and must see the same forces to take the same steps).

The plan (who owns which rows, which halo rows go home to whom) is made once per build: every rank
computes the owned blocks from the global owner array; the halo rows each peer sends back are told
in one handshake (``TorchComm.tell``: counts by ``all_gather``, ids point to point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .shards import owned_row_offsets

__all__ = ["ResultsPlan", "gather_results", "results_plan"]

#: float64 numbers a rank's owned row carries: its energy and its force.
ROW = 4


@dataclass(frozen=True, eq=False)
class ResultsPlan:
    """Who holds what, for one build on one rank (made once per build).

    Attributes:
        owned: per rank q, (m_q,) int64 global ids of q's owned atoms in its row order (numpy).
        mine: (m,) int64 global ids of this rank's owned atoms, on the device.
        away: ``(peer, (k,) int64 global ids on the device)``: this rank's halo atoms owned by
            ``peer``, each once, ascending peers.
        home: ``(peer, (k,) int64 global ids on the device)``: this rank's owned atoms whose force
            contributions ``peer`` sends back, ascending peers.
        width: the padded row count of the gather (the largest ``m_q``).
    """

    owned: tuple[np.ndarray, ...]
    mine: torch.Tensor
    away: tuple[tuple[int, torch.Tensor], ...]
    home: tuple[tuple[int, torch.Tensor], ...]
    width: int

    def bytes_sent(self) -> int:
        """float64 bytes this rank sends a step: its halo forces and its owned rows with virial."""
        return 8 * (3 * sum(len(g) for _, g in self.away) + ROW * len(self.mine) + 9)


def results_plan(comm, b) -> ResultsPlan:
    """The ``ResultsPlan`` of build ``b`` on ``comm``'s rank (kept on ``b``: made at its first step)."""
    key = ("results", comm.rank)
    hit = b.on_device.get(key)
    if hit is not None:
        return hit
    device = comm.devices[0]
    owner, total = b.plan.owner, b.plan.num_parts
    groups = comm.groups(total)
    counts = np.bincount(owner, minlength=total)
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = np.argsort(owner, kind="stable")  # by part, then ascending id: the owned-row order
    owned = tuple(order[starts[g.start] : starts[g.stop]] if len(g) else order[:0] for g in groups)
    worker_of_part, _ = owned_row_offsets(owner, groups)
    shard = b.shards[0]
    ids = shard.atoms if b.ids is None else b.ids[shard.atoms]
    halo = ids[shard.num_owned:]
    peer = worker_of_part[owner[halo]]
    away = {}
    for q in np.unique(peer):
        if int(q) != comm.rank:
            away[int(q)] = np.unique(halo[peer == q])
    bufs = comm.tell(away)  # each peer learns which of its atoms come home from here
    out = ResultsPlan(
        owned=owned,
        mine=torch.as_tensor(owned[comm.rank], device=device),
        away=tuple((q, torch.as_tensor(away[q], device=device)) for q in sorted(away)),
        home=tuple((q, bufs[q].to(device)) for q in sorted(bufs)),
        width=max((len(o) for o in owned), default=0),
    )
    with b.lock:
        b.on_device[key] = out
    return out


def gather_results(comm, b, step) -> np.ndarray:
    """This step's (4N + 9) float64 results (energies (N), forces (N, 3), virial (3, 3)) from every
    rank's ``step`` (``resident.StepState``) on build ``b``, on every rank."""
    plan = results_plan(comm, b)
    dist, device, wire = comm.dist, comm.devices[0], comm.wire
    e_sum, f_sum, w_sum = step.sums(device)
    # 1. halo forces home (f_sum holds every device's sums of this rank: one device per rank)
    ops, back = [], []
    for q, g in plan.home:
        back.append((g, torch.empty((len(g), 3), dtype=torch.float64, device=wire)))
        ops.append(dist.P2POp(dist.irecv, back[-1][1], q))
    for q, g in plan.away:
        ops.append(dist.P2POp(dist.isend, f_sum.index_select(0, g).to(wire), q))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for g, values in back:  # ascending peers: the same sum every step
        f_sum.index_add_(0, g, values.to(device))
    # 2. owned rows and virial to every rank
    m, n = len(plan.mine), step.n
    payload = torch.zeros(plan.width * ROW + 9, dtype=torch.float64, device=device)
    if m:
        rows = payload[: m * ROW].view(m, ROW)
        rows[:, 0] = e_sum.index_select(0, plan.mine)
        rows[:, 1:] = f_sum.index_select(0, plan.mine)
    payload[plan.width * ROW :] = w_sum.reshape(-1)
    payload = payload.to(wire)
    pieces = [torch.empty_like(payload) for _ in range(comm.world_size)]
    dist.all_gather(pieces, payload)
    total = np.zeros(4 * n + 9)
    forces = total[n : 4 * n].reshape(n, 3)
    virial = total[4 * n :]
    for q, piece in enumerate(pieces):
        piece = piece.cpu().numpy()
        ids = plan.owned[q]
        rows = piece[: len(ids) * ROW].reshape(len(ids), ROW)
        total[ids] = rows[:, 0]
        forces[ids] = rows[:, 1:]
        virial += piece[plan.width * ROW :]
    return total
