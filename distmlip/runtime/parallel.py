"""All at once: every shard of this process evaluated in one forward and one backward pass (a
thread per shard when there are several), the halo exchanges inside the model's forward."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..models.base import no_exchange
from .build import Built
from .comm import run_threads
from .exchange import P2PExchange
from .local import run_model
from .resident import device_piece

__all__ = ["evaluate_all"]


def evaluate_all(runner, b: Built, positions: np.ndarray) -> tuple[float, int, float]:
    """Evaluate build ``b`` at ``positions`` with ``runner``'s replicas (``comm``, ``replicas``,
    ``mode``, ``cutoff``, ``dtype``), adding each shard's energies, forces and virial to the
    step's sums on its device (``b.step``, which the runner flushes or gathers). Returns the
    seconds spent making the local graphs (edges), the halo-exchange calls the model made and the
    seconds spent in point-to-point exchanges."""
    t0 = time.perf_counter()
    comm = runner.comm
    exchanges = comm.exchanges(b, runner.mode == "halo")
    devices = [comm.device(s) for s in b.shards]
    pieces = [device_piece(b.step, s, ex, runner.cutoff, runner.mode, runner.dtype, d)
              for s, ex, d in zip(b.shards, exchanges, devices, strict=True)]
    edges_s = time.perf_counter() - t0
    _compute(runner.replicas, devices, b, pieces, exchanges)
    calls = max((getattr(e, "calls", 0) for e in exchanges if e is not no_exchange), default=0)
    seconds = sum(e.seconds for e in exchanges if isinstance(e, P2PExchange))
    return edges_s, calls, seconds


def _compute(replicas: dict, devices: list, b: Built, pieces, exchanges) -> None:
    """Run the model on every shard, differentiate, and add each shard's energies, forces and
    virial to the step's sums on its device (``b.step``; the runner flushes them)."""
    outputs: list[torch.Tensor | None] = [None] * len(pieces)

    def work(i: int):
        outputs[i] = run_model(replicas[devices[i]], pieces[i][0])

    if len(pieces) == 1:
        work(0)
    else:
        run_threads(work, len(pieces), getattr(exchanges[0], "hub", None))
    locals_ = [p[0] for p in pieces]
    if isinstance(exchanges[0], P2PExchange):
        ex = exchanges[0]
        loss = outputs[0].sum() + 0.0 * ex.token.to(outputs[0].device, outputs[0].dtype)
        wrt = [locals_[0].edge_vec, ex.first_token]
    else:
        # summed on the first shard's device (the value is not used, only its gradient, 1 for
        # every part): a sum on the host would make the host wait for every device
        loss = sum(o.sum().to(device=outputs[0].device, dtype=torch.float64) for o in outputs)
        wrt = [lg.edge_vec for lg in locals_]
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)[: len(locals_)]
    else:
        grads = [None] * len(locals_)
    for shard, (local, kept), out, grad, device in zip(b.shards, pieces, outputs, grads, devices,
                                                       strict=True):
        if shard.num_rows == 0:
            continue
        b.step.deposit(device, local.atom_ids[: local.num_owned], out,
                       kept if grad is not None else None, grad)
