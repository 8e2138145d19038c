"""Bounded memory: a worker's parts evaluated one at a time, exactly, for any model.

Levels: the calls that couple parts, in the order a forward pass makes them: every
``halo_exchange`` call (halo mode; in extended mode they are no-ops) and every ``global_sum``
call. A ``global_sum`` level is treated like an exchange whose gather is a sum: part k posts its
partial sum p_k^j, every part receives Z^j = sum over all parts (workers, ranks) of p^j, and
since dZ^j/dp_k^j is the identity, dE/dp_k^j = G^j = the sum over all parts of the gradient of
their objective with respect to the (shared) Z^j. Below, "exchange j" means level j of either
kind.

A model's forward on part k is a function of its edge vectors e_k and of what its ``halo_exchange``
calls return, Z_k^0..Z_k^{L-1}; it posts y_k^j (its owned rows) to call j and returns per-atom
energies eps_k. Let X^j be the posted owned rows of every part (N x F_j) and G^j = dE/dX^j. Then,
with only one part's activations alive at a time:

1. forward, level by level: for j = 0..L-1 every part runs from the start up to exchange j (earlier
   exchanges return the stored Z^m), posts y^j into X^j and stops; then one level exchange fills
   the halo rows, Z^j = gather(X^j) (across workers and ranks);
2. backward, level by level: for j = L-1..0 every part replays its forward with every exchange
   returning its stored rows as a detached leaf (only Z^j asks for a gradient), and back-propagates
   S_j = sum(eps owned) + sum over m > j of <G^m[owned], y^m> to Z^j; the gradients are added into
   G^j and the level's backward exchange sends halo rows' gradients home;
3. the edge-vector gradient dE/de_k of S = sum(eps owned) + sum over all m of <G^m[owned], y^m>,
   which gives forces and virial: the level-0 replay differentiates S_0 with respect to the edge
   vectors too, and a short pass up to the first exchange adds the <G^0[owned], y^0> term once G^0
   is known (no separate last replay); the energies come with the level-0 replay.

Every dependence is explicit through the leaves, so residual paths, cached edge embeddings and
per-layer readouts stay exact; so does a readout of the whole system (a mean node feature, Orb's
energy) through ``global_sum``. The cost is about L/2 forwards plus L + 1 forward-and-backward
replays plus a pass up to the first exchange (no level, as in extended mode without
``global_sum``: one pass per part, after a forward on the first call that finds none); the memory
is one part's activations plus the stored Z and G (rows x feature width per exchange).

A model that implements the layer protocol (``embed``/``step``/``energies``, models/base.py) is
evaluated instead, in halo mode, one step per part and level with no replay from the start
(``runtime/steps.py``; the runner chooses); ``runner.layer_steps = False`` keeps the replay.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..models.base import HaloExchange, LocalGraph
from ..partition import PartPlan
from .build import Built
from .comm import run_threads
from .exchange import P2PExchange
from .local import run_model
from .memory import _trim
from .progress import Progress
from .resident import device_piece

__all__ = ["LevelExchange", "SequentialWorker", "evaluate_sequential", "for_each"]


def _release() -> None:
    """Return the finished part's freed memory to the system before the next part starts."""
    _trim()


HALO, SUM = "halo_exchange", "global_sum"  # the kinds of level


class _Stop(Exception):
    """Raised at the exchange a forward pass was asked to stop at."""


class _Store:
    """One worker's stored communication values, per level (a level is one ``halo_exchange``
    call in halo mode, or one ``global_sum`` call; ``kinds[level]`` says which):

    - halo level: X (posted owned rows), Z (owned + halo rows), G (dE/dZ accumulated per row) and
      Gown (dE/dX, after the backward exchange);
    - sum level: X (the sum of this worker's parts' partial sums), Z (the system's total), G
      (dE/dZ summed over this worker's parts) and Gown (dE/dZ summed over every worker: the
      gradient of each part's partial sum)."""

    def __init__(self, num_owned: int, num_rows: int):
        self.num_owned, self.num_rows = num_owned, num_rows
        self.kinds: list[str | None] = []
        self.X: list[torch.Tensor | None] = []
        self.Z: list[torch.Tensor | None] = []
        self.G: list[torch.Tensor | None] = []
        self.Gown: list[torch.Tensor | None] = []

    def post(self, level: int, kind: str, owned_slice: slice, y: torch.Tensor) -> None:
        while len(self.X) <= level:
            for values in (self.kinds, self.X, self.Z, self.G, self.Gown):
                values.append(None)
        if self.kinds[level] is None:
            self.kinds[level] = kind
        elif self.kinds[level] != kind:
            raise RuntimeError(
                f"model: call {level + 1} to halo_exchange/global_sum was a {self.kinds[level]} "
                f"on one part and a {kind} on another; every part must make the same calls in the "
                f"same order")
        if kind == SUM:
            if self.X[level] is None:
                self.X[level] = y.clone()
            elif self.X[level].shape != y.shape:
                raise RuntimeError(
                    f"global_sum: expected the same shape on every part, got "
                    f"{tuple(self.X[level].shape)} and {tuple(y.shape)}")
            else:
                self.X[level] = self.X[level] + y
            return
        if self.X[level] is None:
            self.X[level] = torch.zeros((self.num_owned, *y.shape[1:]), dtype=y.dtype, device=y.device)
        self.X[level][owned_slice] = y


class _PieceExchange(HaloExchange):
    """``halo_exchange`` and ``global_sum`` of one part while it is evaluated alone.

    Levels are the calls that communicate: every ``halo_exchange`` call in halo mode and every
    ``global_sum`` call, in the order made. ``stop_at=j``: post what is given to level j and stop.
    Otherwise every level returns its stored value as a detached leaf (the one of level
    ``grad_level`` asks for a gradient) and keeps what was posted to levels ``> grad_level``
    (live tensors) for the <G, y> terms.
    """

    def __init__(self, store: _Store, rows: torch.Tensor, owned_slice: slice, num_owned: int | None,
                 stop_at: int | None = None, grad_level: int | None = None):
        super().__init__(num_owned, len(rows))
        self.store, self.rows, self.owned_slice = store, rows, owned_slice
        self.stop_at, self.grad_level = stop_at, grad_level
        self.levels = 0  # level calls so far
        self.posted: dict[int, torch.Tensor] = {}
        self.leaf: torch.Tensor | None = None
        self.on_stop = None  # called with what is posted to level ``stop_at`` instead of storing

    def _global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        return self._level(SUM, partial)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.num_owned is None:  # extended mode: only global_sum communicates
            return x
        if x.shape[0] not in (self.num_owned, self.num_rows):
            raise ValueError(
                f"halo_exchange: expected node features with {self.num_rows} rows (all local "
                f"atoms) or {self.num_owned} (the owned atoms, which come first), got {x.shape[0]}"
            )
        return self._level(HALO, x[: self.num_owned])

    def _stored(self, level: int, kind: str) -> torch.Tensor:
        if kind == HALO:
            return self.store.Z[level].index_select(0, self.rows)
        return self.store.Z[level].clone()

    def _level(self, kind: str, y: torch.Tensor) -> torch.Tensor:
        level = self.levels
        self.levels += 1
        if self.stop_at is not None:
            if level == self.stop_at:
                if self.on_stop is not None:
                    self.on_stop(y)
                else:
                    self.store.post(level, kind, self.owned_slice, y.detach())
                raise _Stop()
            return self._stored(level, kind)
        if level >= len(self.store.Z) or self.store.kinds[level] != kind:
            raise RuntimeError(
                f"model: made call {level + 1} to halo_exchange/global_sum a {kind} in a replay, "
                f"but the first pass made {len(self.store.Z)} such calls"
                + (f" (that one a {self.store.kinds[level]})" if level < len(self.store.Z) else "")
                + "; every pass over a part must make the same calls")
        if self.grad_level is None or level > self.grad_level:
            self.posted[level] = y
        z = self._stored(level, kind)
        if level == self.grad_level:
            z.requires_grad_(True)
            self.leaf = z
        return z


class SequentialWorker:
    """Evaluates the parts of one shard one at a time (see the module docstring).

    Args:
        runner: what runs it (``replicas`` per device, ``dtype``, ``cutoff``, ``mode``).
        built: the runner's current build (graph, plan, shards).
        shard: the shard whose parts this worker evaluates.
        device: where it runs.
    """

    def __init__(self, runner, built, shard, device: torch.device):
        self.runner, self.built, self.shard, self.device = runner, built, shard, device
        self.model = runner.replicas[device]
        by_index = {p.index: p for p in built.plan.parts}
        self.parts: list[PartPlan] = [by_index[i] for i in shard.parts]
        offsets = np.cumsum([0] + [p.num_owned for p in self.parts])
        self.owned_slices = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        self.rows = [torch.as_tensor(r, device=device) for r in shard.part_rows]
        self.store = _Store(shard.num_owned, shard.num_rows)
        self.exchange_calls = 0
        self.tick = lambda: None  # called after each part's pass (the runner's progress bar)

    # ------------------------------------------------------------------ one part
    def _piece(self, k: int | None, positions: np.ndarray, exchange, with_grad: bool):
        """The LocalGraph of part ``k`` (``None``: an empty graph) at this step's positions (the
        build's ``step``; ``positions``: the same, global, on the host) and its kept edges."""
        runner = self.runner
        return device_piece(self.built.step, None if k is None else self.parts[k], exchange,
                            runner.cutoff, runner.mode, runner.dtype, self.device, with_grad)

    def _indices(self):
        return list(range(len(self.parts))) or [None]

    def _exchange_for(self, k, **kwargs) -> _PieceExchange:
        if self.runner.mode != "halo":  # extended mode: the exchange is a no-op
            return _PieceExchange(self.store, torch.zeros(0, dtype=torch.long, device=self.device),
                                  slice(0, 0), None, **kwargs)
        if k is None:
            return _PieceExchange(self.store, torch.zeros(0, dtype=torch.long, device=self.device),
                                  slice(0, 0), 0, **kwargs)
        return _PieceExchange(self.store, self.rows[k], self.owned_slices[k], self.parts[k].num_owned,
                              **kwargs)

    def _run(self, local: LocalGraph) -> torch.Tensor:
        return run_model(self.model, local)

    # ------------------------------------------------------------------ the three phases
    def forward_level(self, level: int, positions: np.ndarray) -> str | None:
        """Run every part up to level ``level`` and post its rows (or partial sum); its kind
        (``HALO`` or ``SUM``), or None if the parts finished without reaching it (the model makes
        only ``level`` level calls)."""
        reached = []
        for k in self._indices():
            exchange = self._exchange_for(k, stop_at=level)
            local = self._piece(k, positions, exchange, with_grad=False)[0]
            try:
                with torch.no_grad():
                    self._run(local)
                reached.append(False)
            except _Stop:
                reached.append(True)
            del local, exchange
            _release()
            self.tick()
        if any(reached) and not all(reached):
            raise RuntimeError(
                f"model: some parts made {level + 1} or more halo_exchange/global_sum calls and "
                f"others fewer; every part must make the same calls"
            )
        return self.store.kinds[level] if reached[0] else None

    def backward_level(self, level: int, positions: np.ndarray, gather=None) -> None:
        """Accumulate dE/dZ^level of every part into ``store.G[level]``. With ``gather`` (level 0:
        the last replay merged into this one), also differentiate with respect to the edge vectors
        and ``gather`` energies and edge gradients, still missing the <G^0, y^0> term that
        ``prefix`` adds once G^0 is known."""
        store = self.store
        store.G[level] = torch.zeros_like(store.Z[level])
        for k in self._indices():
            exchange = self._exchange_for(k, grad_level=level)
            local, kept = self._piece(k, positions, exchange, with_grad=gather is not None)
            eps = self._run(local)
            loss = self._objective(eps, exchange, k)
            wrt = [t for t in (exchange.leaf, local.edge_vec if gather is not None else None)
                   if t is not None]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad and wrt \
                else [None] * len(wrt)
            if exchange.leaf is not None and grads[0] is not None and k is not None:
                if store.kinds[level] == HALO:
                    store.G[level].index_add_(0, self.rows[k], grads[0])
                else:
                    store.G[level] += grads[0]
            if gather is not None:
                self.exchange_calls = store.kinds.count(HALO)
                if exchange.levels != len(store.Z):
                    raise RuntimeError(
                        f"model: made {exchange.levels} halo_exchange/global_sum calls in a "
                        f"replay, but {len(store.Z)} in the first pass; every pass must make the "
                        f"same calls")
                if k is not None:
                    self._gather(gather, local, eps, kept, grads[-1], with_energies=True)
            del loss, eps, local, exchange, grads
            _release()
            self.tick()

    def prefix(self, positions: np.ndarray, gather) -> None:
        """The <G^0[owned], y^0> term of the edge gradients: every part runs up to its first
        exchange, differentiates that term with respect to its edge vectors, and stops."""
        for k in self._indices():
            if k is None:
                continue
            exchange = self._exchange_for(k, stop_at=0)
            local, kept = self._piece(k, positions, exchange, with_grad=True)
            g0 = self.store.Gown[0]
            if self.store.kinds[0] == HALO:
                g0 = g0[self.owned_slices[k]]

            def first_exchange(y, g0=g0, local=local, kept=kept):
                if y.requires_grad:
                    (grad,) = torch.autograd.grad((g0.to(y.dtype) * y).sum(), [local.edge_vec],
                                                  allow_unused=True)
                    self._gather(gather, local, None, kept, grad, with_energies=False)

            exchange.on_stop = first_exchange
            try:
                self._run(local)
            except _Stop:
                pass
            del local, exchange
            _release()
            self.tick()

    def final(self, positions: np.ndarray, gather) -> None:
        """The last replay when the model makes no exchange calls (extended mode): energies and
        edge gradients of every part, ``gather``-ed as soon as the part is done."""
        for k in self._indices():
            exchange = self._exchange_for(k, grad_level=-1)
            local, kept = self._piece(k, positions, exchange, with_grad=True)
            eps = self._run(local)
            loss = self._objective(eps, exchange, k)
            if loss.requires_grad and len(kept):
                (grad,) = torch.autograd.grad(loss, [local.edge_vec], allow_unused=True)
            else:
                grad = None
            self.exchange_calls = 0
            if k is not None:
                self._gather(gather, local, eps, kept, grad, with_energies=True)
            del loss, eps, local, exchange, grad
            _release()
            self.tick()

    @staticmethod
    def _gather(gather, local, eps, kept, grad, with_energies: bool) -> None:
        gather(local.edge_vec.device, local.atom_ids[: local.num_owned],
               eps if with_energies else None, kept, grad)

    def _objective(self, eps: torch.Tensor, exchange: _PieceExchange, k) -> torch.Tensor:
        """sum(eps owned) + sum over the posted levels m of <G^m[owned rows of the part], y^m>
        (of a sum level: <G^m, the part's partial sum>)."""
        loss = eps.sum()
        if k is None:
            return loss
        for m, y in exchange.posted.items():
            g = self.store.Gown[m]
            if g is not None and y.requires_grad:
                if self.store.kinds[m] == HALO:
                    g = g[self.owned_slices[k]]
                loss = loss + (g.to(y.dtype) * y).sum()
        return loss


# ---------------------------------------------------------------------- the level exchanges
class LevelExchange(HaloExchange):
    """The halo exchange of one worker whose parts are evaluated one at a time. Called between the
    parts' passes, once per level, on what every part posted (the worker's X^j), not inside a
    forward pass: ``gather(j)`` makes Z^j, the owned rows followed by the halo blocks from their
    sources (the other workers of this process, ``workers``, or across ranks the ``p2p``
    transport); ``send_home(j)`` adds the halo rows' gradients G^j to their owners' rows
    (Gown^j). A sum level is not an exchange: see ``_sum_level``."""

    def __init__(self, workers: list[SequentialWorker], index: int, p2p: P2PExchange | None, rank: int):
        worker = workers[index]
        super().__init__(worker.store.num_owned, worker.store.num_rows)
        self.workers, self.worker, self.p2p, self.rank = workers, worker, p2p, rank
        self.level = 0
        self._rows: dict[tuple[int, str], torch.Tensor] = {}  # block rows, moved once a step

    def _block_rows(self, b: int, rows, device) -> torch.Tensor:
        """Block ``b``'s ``rows`` on ``device``, moved there at their first use this step (not at
        every level)."""
        key = (b, str(device))
        if key not in self._rows:
            self._rows[key] = torch.as_tensor(rows, device=device)
        return self._rows[key]

    def gather(self, level: int) -> None:
        """Z^level of this worker (its X^level stays: the other workers read it)."""
        self.level = level
        self.calls += 1
        self.worker.store.Z[level] = self._exchange(self.worker.store.X[level])

    def _exchange(self, owned: torch.Tensor) -> torch.Tensor:
        blocks = self.worker.shard.blocks
        if self.p2p is not None:
            remote = iter(self.p2p.swap(owned, backward=False))
            values = [owned.index_select(0, self._block_rows(b, rows, owned.device)) if src == self.rank
                      else next(remote) for b, (src, rows) in enumerate(blocks)]
        else:
            values = []
            for b, (src, rows) in enumerate(blocks):
                source = self.workers[src]
                values.append(source.store.X[self.level].index_select(
                    0, self._block_rows(b, rows, source.device)).to(owned.device))
        return torch.cat([owned, *values])

    def send_home(self, level: int, remote: list[torch.Tensor]) -> None:
        """Add the gradients of this worker's halo rows at ``level`` to their owners' Gown (in
        this process), or append them to ``remote`` (owned by another rank)."""
        g, offset = self.worker.store.G[level], self.worker.store.num_owned
        for b, (src, rows) in enumerate(self.worker.shard.blocks):
            block = g[offset : offset + len(rows)]
            offset += len(rows)
            if self.p2p is not None and src != self.rank:
                remote.append(block.contiguous())
                continue
            home = self.workers[0] if self.p2p is not None else self.workers[src]
            home.store.Gown[level].index_add_(
                0, self._block_rows(b, rows, home.device), block.to(home.device))


def _total(comm, values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the workers' ``values`` (one each), added in worker order on the first worker's
    device (the same order everywhere, so every worker holds the same total), then over the
    ranks."""
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return comm.total(total)


def _level_forward(comm, exchanges: list[LevelExchange], level: int, kind: str) -> None:
    """Fill the halo rows of every worker's Z^level from the owners' posted rows (a sum level:
    Z^level is the sum of every worker's partial sums, over the ranks too)."""
    workers = [e.worker for e in exchanges]
    if kind == "global_sum":
        total = _total(comm, [w.store.X[level] for w in workers])
        for w in workers:
            w.store.Z[level] = total.to(w.device)
    else:
        for e in exchanges:
            e.gather(level)
    for w in workers:
        w.store.X[level] = None  # Z holds the owned rows first


def _level_backward(comm, exchanges: list[LevelExchange], level: int, kind: str) -> None:
    """dE/dX^level: each worker's owned-row gradients plus its halo rows' gradients sent home
    (a sum level: every part's partial sum gets dE/dZ^level summed over all workers)."""
    workers = [e.worker for e in exchanges]
    if kind == "global_sum":
        total = _total(comm, [w.store.G[level] for w in workers])
        for w in workers:
            w.store.Gown[level] = total.to(w.device)
            w.store.G[level] = None
        return
    for w in workers:
        w.store.Gown[level] = w.store.G[level][: w.store.num_owned].clone()
    remote: list[torch.Tensor] = []
    for e in exchanges:
        e.send_home(level, remote)
    p2p = exchanges[0].p2p
    if p2p is not None:
        own = workers[0].store.Gown[level]
        back = p2p.swap(remote, backward=True, meta=(own.shape, own.dtype, own.device))
        for rows, g in zip(p2p.send_rows, back, strict=True):
            own.index_add_(0, rows, g)
    for w in workers:
        w.store.G[level] = None


# ---------------------------------------------------------------------- the evaluation
def evaluate_sequential(runner, b: Built, positions: np.ndarray,
                        levels: tuple[str, ...] | None) -> tuple[tuple[str, ...], float]:
    """Every worker of ``runner`` (``comm``, ``replicas``, ``mode``, ``progress``...) evaluates its
    parts one at a time, the level exchanges between them; energies, forces and virial are added to
    the step's sums (``b.step``, which the runner flushes or gathers). ``levels``: the kinds of the levels,
    if a first call found them (``None``: find them). Returns the levels and the seconds spent in
    point-to-point exchanges."""
    comm = runner.comm
    workers = [SequentialWorker(runner, b, s, comm.device(s)) for s in b.shards]
    bar = _progress_bar(runner, workers, levels)
    for w in workers:
        w.tick = bar.tick
    p2p = comm.level_transport(b, runner.mode)
    exchanges = [LevelExchange(workers, i, p2p, comm.rank) for i in range(len(workers))]

    each = for_each(workers)
    # levels (halo exchanges in halo mode, global sums): found by running up to one more each
    # time on the first call; known after (the replays check that the model still makes them)
    level, first = 0, levels is None
    while levels is None or level < len(levels):
        kinds = each(lambda w: w.forward_level(level, positions))
        if len(set(kinds)) > 1:
            raise RuntimeError(f"model: workers made different halo_exchange/global_sum calls "
                               f"(call {level + 1}: {sorted(map(str, set(kinds)))})")
        kind = kinds[0]
        if first:
            if comm.world_size > 1:  # every rank must make the same call
                code = {None: 0, "halo_exchange": 1, "global_sum": 2}[kind]
                if comm.maximum(code) != -comm.maximum(-code):
                    raise RuntimeError(f"model: ranks made different halo_exchange/global_sum "
                                       f"calls (call {level + 1}: this rank {kind})")
            if kind is None:
                break
        elif comm.agree(kind != levels[level]):  # every rank raises together
            raise RuntimeError(
                f"model: call {level + 1} to halo_exchange/global_sum was a "
                f"{levels[level]} on the first evaluation and now (on this rank) "
                f"{kind or 'not made'} or differs on another rank; every evaluation must make "
                f"the same calls")
        _level_forward(comm, exchanges, level, kind)
        level += 1
    if first:
        levels = tuple(workers[0].store.kinds)
        bar.expect(level)
    gather = b.step.deposit  # the runner flushes or gathers the step's sums
    if not levels:
        each(lambda w: w.final(positions, gather))
    for j in reversed(range(len(levels))):
        each(lambda w: w.backward_level(j, positions, gather if j == 0 else None))
        _level_backward(comm, exchanges, j, levels[j])
    if levels:
        each(lambda w: w.prefix(positions, gather))
    bar.close()
    return levels, (p2p.seconds if p2p is not None else 0.0)


def _progress_bar(runner, workers: list[SequentialWorker], levels) -> Progress:
    """A progress bar over the pieces the sequential evaluation runs (``progress=True``; rank 0
    only), or a silent counter."""
    pieces = sum(len(w._indices()) for w in workers)
    guess = None if levels is not None or runner.mode != "halo" else \
        max(int(workers[0].model.num_layers) - 1, 0) if workers else None
    return Progress(pieces, None if levels is None else len(levels),
                    enabled=runner.progress and runner.comm.rank == 0, guess=guess)


def for_each(workers: list) -> Callable:
    """``each(fn)``: ``[fn(w) for w in workers]``, the workers in threads when there are several."""

    def each(fn):
        if len(workers) == 1:
            return [fn(workers[0])]
        results = [None] * len(workers)

        def work(i):
            results[i] = fn(workers[i])

        run_threads(work, len(workers), None)
        return results

    return each
