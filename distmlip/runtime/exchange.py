"""The runtime's halo exchanges: one type (``HaloExchange``), two transports.

- ``LocalExchange``: workers in this process. Differentiable indexing across the shards' tensors
  (threads meet at a barrier when there are several), so one backward pass covers them all.
- ``P2PExchange``: one worker per rank; ``isend``/``irecv`` with the ranks it shares halo atoms
  with, inside an autograd function whose backward sends the halo rows' gradients home.

Both return ``cat([owned rows] + [one block per source worker])``: a shard's halo rows are grouped
by source (``Shard.blocks``), so no scatter is needed. Both also implement ``global_sum`` (the
contract's system-wide sum): in one process each shard posts its partial sum at the hub and adds
all of them in shard order (so every shard holds the identical value, and autograd sums the
gradients of every shard into each partial sum); across ranks an all-reduce whose backward is an
all-reduce of the gradients, on the same token chain as the halo exchanges. In extended mode
(``halo=False``) only ``global_sum`` communicates.

Made once per build (``comm.exchanges`` keeps them on the ``Built``; ``start_step`` resets the
counters, the token chain and the hub at each evaluation), so their index tensors move to the
device once. ``P2PExchange`` also keeps its send and receive buffers (``buffers``: per direction,
peer, trailing shape and dtype), refilled at every call: a received block is read only by the
``cat`` that follows (which saves nothing for the backward pass), a sent block only until its
``wait``, a received gradient only by the ``index_add_`` into the owned rows; the gradient
returned to autograd (``grad``) is made at each call (autograd may keep or add into it). The
level exchanges of an evaluation one part at a time do not keep them (``reuse`` off: that
evaluation bounds its memory). ``LocalExchange`` has no buffer to keep: its halo blocks are
differentiable gathers (``index_select``) whose results autograd tracks, so each call makes them
(one gather when the shard is alone).

Synchronisation (audited for issue 21, item 4): no call reads a tensor's value on the host
(no ``.item()``, ``.cpu()``, ``.numpy()``, ``int()``/``bool()`` of a tensor); shapes come from the
build (block and send row counts) or from the features' ``shape``. ``time.perf_counter`` around a
P2P exchange times the host's side only (on CUDA the queueing, not the transfer).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from ..errors import CommunicationError
from ..models.base import HaloExchange
from .shards import Shard

__all__ = ["CommunicationError", "Hub", "LocalExchange", "P2PExchange", "PeerFailed"]


class PeerFailed(RuntimeError):
    """Another worker of this process failed; this one stops."""


class Hub:
    """Where the shards of one process meet at each halo exchange."""

    def __init__(self, num_shards: int, timeout: float):
        self.slots: list[torch.Tensor | None] = [None] * num_shards
        self.sums: list[torch.Tensor | None] = [None] * num_shards
        self.barrier = threading.Barrier(num_shards, timeout=timeout)

    def wait(self):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise PeerFailed() from None


class LocalExchange(HaloExchange):
    """The halo exchange of a shard whose sources all live in this process (``hub`` is needed
    when there are several shards: they post their owned rows there and read each other's)."""

    def __init__(self, shard: Shard, device: torch.device, hub: Hub | None = None,
                 halo: bool = True):
        super().__init__(shard.num_owned, shard.num_rows, halo)
        self.index = shard.index
        self.hub = hub
        self.blocks = [(source, torch.as_tensor(rows, device=device)) for source, rows in shard.blocks] \
            if halo else []
        # one shard: every block comes from its own rows, gathered by one index_select
        self.gather = torch.cat([rows for _, rows in self.blocks]) if hub is None and self.blocks else None

    def start_step(self, hub: Hub | None) -> None:
        """Reuse this exchange (made once per build) for a new evaluation: counters zeroed, the
        step's ``hub`` (a fresh barrier: a failed step leaves its own broken)."""
        self.calls = self.reductions = 0
        self.seconds = 0.0
        self.hub = hub

    def _global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        if self.hub is None:
            return partial
        self.hub.sums[self.index] = partial
        self.hub.wait()  # every shard has posted its partial sum
        total = None
        for other in self.hub.sums:  # the same order on every shard: identical totals
            other = other.to(partial.device)
            total = other if total is None else total + other
        self.hub.wait()  # every shard has read them
        return total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.halo:
            return x
        if self.hub is not None and self.num_owned == self.num_rows:
            self.calls += 1  # nothing to receive, but the others may read this shard's rows
            self._exchange(x[: self.num_owned])
            return x
        return super().__call__(x)

    def _exchange(self, owned: torch.Tensor) -> torch.Tensor:
        if self.hub is None:
            values = [] if self.gather is None else [owned.index_select(0, self.gather)]
        else:
            self.hub.slots[self.index] = owned
            self.hub.wait()  # every shard has posted its owned rows
            values = []
            for source, rows in self.blocks:
                other = owned if source == self.index else self.hub.slots[source]
                values.append(other.index_select(0, rows.to(other.device)).to(owned.device))
            self.hub.wait()  # every shard has read what it needs; the slots may be reused
        return torch.cat([owned, *values]) if values else owned


class _P2P(torch.autograd.Function):
    """Forward: send owned rows to the peers that hold them in their halo, receive one block per
    peer. Backward: send those blocks' gradients home, add what comes back to the owned rows.
    A token chains the calls so that every rank runs their backward passes in the same order."""

    @staticmethod
    def forward(ctx, owned, token, exchange):
        ctx.exchange = exchange
        ctx.meta = (owned.shape, owned.dtype, owned.device)
        received = exchange.swap(owned, backward=False)
        # the received blocks are reused buffers: autograd gets an alias of each (its own tensor,
        # for its history). Only the ``cat`` of ``_exchange`` reads them and saves nothing, so the
        # next call may refill them while this call's graph is alive.
        return (token.clone(), *(r.detach() for r in received))

    @staticmethod
    def backward(ctx, grad_token, *grads):
        exchange = ctx.exchange
        grad = torch.zeros(*ctx.meta[:1], dtype=ctx.meta[1], device=ctx.meta[2])
        back = exchange.swap([g.contiguous() for g in grads], backward=True, meta=ctx.meta)
        for rows, g in zip(exchange.send_rows, back, strict=True):
            grad.index_add_(0, rows, g)
        return grad, grad_token, None


class _AllReduce(torch.autograd.Function):
    """Forward: the sum over ranks of each rank's partial sum. Backward: the gradient of each
    rank's partial sum is the sum over ranks of the result's gradients (an all-reduce too), run
    in token order with the halo exchanges."""

    @staticmethod
    def forward(ctx, partial, token, exchange):
        ctx.exchange = exchange
        return exchange.all_reduce(partial, backward=False), token.clone()

    @staticmethod
    def backward(ctx, grad, grad_token):
        return ctx.exchange.all_reduce(grad, backward=True), grad_token, None


class P2PExchange(HaloExchange):
    """The halo exchange of one rank's shard. ``send``: ``{peer: owned rows it holds}``, from the
    handshake; halo blocks owned by this rank itself are copied locally."""

    def __init__(self, shard: Shard, send: dict[int, torch.Tensor], device: torch.device, rank: int,
                 halo: bool = True):
        super().__init__(shard.num_owned, shard.num_rows, halo)
        self.rank = rank
        self.blocks = [(source, torch.as_tensor(rows, device=device)) for source, rows in shard.blocks]
        self.recv_from = [(source, len(rows)) for source, rows in self.blocks if source != rank]
        self.send_to = sorted(send)
        self.send_rows = [send[q] for q in self.send_to]
        # the first token is a leaf: asking autograd for its gradient makes every rank run every
        # exchange's backward pass, in the same order, even where features carry no gradient
        self.first_token = torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
        self.token = self.first_token
        #: the send and receive buffers, made at their first use and reused while the exchange
        #: (one per build) lives: ``(direction, peer, trailing shape, dtype) -> tensor``
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.reuse = True  # False: a fresh buffer at every call (the level exchanges: see comm.py)

    def start_step(self) -> None:
        """Reuse this exchange (made once per build) for a new evaluation: counters zeroed and the
        token chain restarted at ``first_token``; the buffers stay."""
        self.calls = self.reductions = 0
        self.seconds = 0.0
        self.token = self.first_token

    def _buffer(self, key: tuple, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """The buffer ``key`` of ``shape``: the one made at an earlier call when it fits."""
        buf = self.buffers.get(key) if self.reuse else None
        if buf is None or buf.shape != shape or buf.device != torch.device(device):
            buf = torch.empty(shape, dtype=dtype, device=device)
            if self.reuse:
                self.buffers[key] = buf
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.halo:
            return x
        if self.num_owned == self.num_rows:  # peers may still need this rank's rows
            self.calls += 1
            self._exchange(x[: self.num_owned])
            return x
        return super().__call__(x)

    def _exchange(self, owned: torch.Tensor) -> torch.Tensor:
        self.token, *received = _P2P.apply(owned, self.token, self)
        remote = iter(received)
        values = [owned.index_select(0, rows) if source == self.rank else next(remote)
                  for source, rows in self.blocks]
        return torch.cat([owned, *values]) if values else owned

    def _global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        total, self.token = _AllReduce.apply(partial, self.token, self)
        return total

    def all_reduce(self, value: torch.Tensor, backward: bool) -> torch.Tensor:
        """The sum over ranks of ``value`` (a new tensor)."""
        t0 = time.perf_counter()
        out = value.detach().clone().contiguous()
        try:
            dist.all_reduce(out)
        except RuntimeError as exc:
            raise CommunicationError(
                f"global_sum: the all-reduce across ranks failed ({'backward' if backward else 'forward'} "
                f"pass): a peer has failed, died or timed out. {exc}"
            ) from exc
        self.seconds += time.perf_counter() - t0
        return out

    def swap(self, tensors, backward: bool, meta=None) -> list[torch.Tensor]:
        """Forward (``tensors``: the owned rows): send each peer its rows, return the blocks
        received (in ``recv_from`` order). Backward (``tensors``: gradients of those blocks): send
        them home, return the gradients received for ``send_rows``."""
        t0 = time.perf_counter()
        if backward:
            outgoing = [(q, g) for (q, _), g in zip(self.recv_from, tensors, strict=True)]
            incoming = [(q, len(rows)) for q, rows in zip(self.send_to, self.send_rows, strict=True)]
            shape, dtype, device = meta
        else:
            shape, dtype, device = tensors.shape, tensors.dtype, tensors.device
            outgoing = []
            with torch.no_grad():  # data movement: the autograd function carries the gradients
                for q, rows in zip(self.send_to, self.send_rows, strict=True):
                    buf = self._buffer(("send", q, tuple(shape[1:]), dtype), (len(rows), *shape[1:]),
                                       dtype, device)
                    outgoing.append((q, torch.index_select(tensors, 0, rows, out=buf)))
            incoming = self.recv_from
        tail = tuple(shape[1:])
        ops, buffers = [], []
        direction = "grad" if backward else "recv"
        for peer, count in incoming:
            buf = self._buffer((direction, peer, tail, dtype), (count, *tail), dtype, device)
            buffers.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, peer))
        for peer, value in outgoing:
            ops.append(dist.P2POp(dist.isend, value, peer))
        if ops:
            try:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            except RuntimeError as exc:
                peers = sorted({q for q, _ in self.recv_from} | set(self.send_to))
                raise CommunicationError(
                    f"halo exchange with rank(s) {peers} failed ({'backward' if backward else 'forward'} "
                    f"pass): a peer has failed, died or timed out. {exc}", peers
                ) from exc
        self.seconds += time.perf_counter() - t0
        return buffers
