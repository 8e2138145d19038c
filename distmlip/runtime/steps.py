"""The layer protocol's bounded-memory evaluation: a model that describes itself as steps
(``DistributableModel.embed/step/energies``, see models/base.py) is evaluated one step per part and
level instead of replayed from the start (``runtime/sequential.py``, whose level exchanges and
workers it reuses).
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms

from ..models.base import HaloExchange, LocalGraph, check_state, compare_steps, edge_entries, has_steps
from .build import Built
from .cache import check_passed, remember_check
from .memory import _probe_graph, probe_local
from .progress import Progress
from .sequential import (
    HALO,
    LevelExchange,
    SequentialWorker,
    _level_backward,
    _level_forward,
    _release,
    _Stop,
    _total,
    for_each,
)

__all__ = ["PROBE_ROWS", "StepWorker", "check_steps_early", "evaluate_steps", "uses_steps"]

# ---------------------------------------------------------------------- the layer protocol
# A model that describes itself as steps (``DistributableModel.embed/step/energies``, see
# models/base.py) is evaluated one layer at a time instead of replayed from the start:
#
# - forward, level by level: part k computes step j's output state from the stored input state
#   (the previous level's Z: exchanged entries on owned + halo rows, the others on owned rows;
#   step 0 from ``embed``) and posts its owned rows; one level exchange per exchanged entry then
#   fills the halo rows (across workers and ranks, as above). Steps 0 .. L-2: L - 1 levels.
# - backward, from the last step: part k recomputes step j (the last with ``energies``, the first
#   with ``embed``) from its stored input made a leaf, and back-propagates
#   sum(eps owned) (last step) or <G^j[owned rows of k], output owned rows> to the input leaves
#   (exchanged entries: every local row, into G^{j-1}, the halo rows sent home by the level's
#   backward exchange; the others: owned rows, added to their own gradient) and to the edge
#   vectors, whose gradient is gathered into forces and virial at once (each step's share; the
#   sum over steps is dE/de_k).
#
# Cost: about one forward (steps 0 .. L-2) plus one forward-and-backward of one step per part,
# instead of L/2 forwards and L + 1 replays. Memory: one part's activations of one step plus the
# stored states. Freed memory goes back to the system after the forward steps and at the end,
# not after every part: parts allocate alike, so the next part reuses what the last one freed
# instead of faulting fresh pages in (trimming after every part cost a quarter of the CPU time of
# SchNet's steps, after every level a tenth). Slots of the store: level j, entry e -> j * width + e.
#
# Edge entries (``DistributableModel.edge_entries``: rows are the part's edges, or its angles) are
# part-local: stored per part and level in ``edge_Z[slot][k]`` as the step returned them, never
# exchanged; the backward step j puts part k's gradient of its input in ``edge_G[slot j-1][k]``
# (one step per part writes it: no sum over parts, no exchange) and reads ``edge_G[slot j][k]``
# for the <G, y> term of its output.

LOCAL = "local"  # a state entry read on owned rows only: stored, never exchanged
EDGE = "edge"  # a part-local entry (the part's edges or angles): stored per part, never exchanged


def uses_steps(runner) -> bool:
    """Whether the sequential evaluation of ``runner`` uses the model's layer protocol: it has the
    steps, the mode is halo (extended mode makes no exchanges: one pass per part already) and
    ``runner.layer_steps`` is not ``False`` (the generic replay, kept for comparison)."""
    model = next(iter(runner.replicas.values()))
    return runner.mode == "halo" and getattr(runner, "layer_steps", True) is not False and has_steps(model)


class _NoExchange(HaloExchange):
    """The exchange a step sees: refuses to be called (the runtime exchanges between steps)."""

    def __init__(self, name: str, num_owned: int, num_rows: int):
        super().__init__(num_owned, num_rows)
        self.name = name

    def _refuse(self, what: str):
        raise RuntimeError(
            f"model: {self.name} implements the layer protocol (embed/step/energies) but called "
            f"graph.{what} inside a step; with steps the runtime exchanges the entries named by "
            f"exchanged between steps, and global_sum only in energies, once, when the model "
            f"declares readout_sum = True: remove the call from the step (or declare readout_sum), "
            f"or remove the steps (exchanged = None) to use the generic path")

    def __call__(self, x):
        self._refuse("halo_exchange")

    def _global_sum(self, partial):
        self._refuse("global_sum")


class _ReadoutSum(_NoExchange):
    """The exchange ``energies`` sees in a model whose readout sums over the system
    (``readout_sum``): its one ``global_sum`` records the part's partial sum and returns
    ``total`` (the system's, a constant or a leaf), or stops the pass (``total`` None)."""

    def __init__(self, name: str, num_owned: int, num_rows: int, total: torch.Tensor | None):
        super().__init__(name, num_owned, num_rows)
        self.total, self.partial = total, None

    def _global_sum(self, partial):
        if self.partial is not None:
            raise RuntimeError(f"model: {self.name}.energies called graph.global_sum twice; with "
                               f"steps (readout_sum = True) energies may sum over the system once")
        self.partial = partial
        if self.total is None:
            raise _Stop()
        return self.total


class StepWorker(SequentialWorker):
    """Evaluates the parts of one shard one at a time, one step of the layer protocol at a time
    (see above). ``width``: entries of a step's output state (found by step 0)."""

    def __init__(self, runner, built, shard, device: torch.device):
        super().__init__(runner, built, shard, device)
        self.width: int | None = None
        self.exchanged = tuple(self.model.exchanged)
        self.edges = edge_entries(self.model)
        self.num_steps = int(self.model.num_steps)
        self.kinds: list[str] = []
        # edge entries: slot -> part (None: the empty part of an idle worker) -> tensor
        self.edge_Z: dict[int, dict] = {}
        self.edge_G: dict[int, dict] = {}
        # a readout summing over the system: (the sum, d(every part's energies)/d(the sum)), and
        # between its two passes each part's last state (part -> state)
        self.readout: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_out: dict = {}

    def _graph(self, k, positions, with_grad: bool, total: torch.Tensor | bool = False):
        """Part k's graph; ``total`` (a tensor, or None to stop at the sum): its ``energies``
        may call ``global_sum`` once (``_ReadoutSum``); ``False``: no exchange at all."""
        num_owned = 0 if k is None else self.parts[k].num_owned
        rows = 0 if k is None else len(self.rows[k])
        name = type(self.model).__name__
        exchange = _NoExchange(name, num_owned, rows) if total is False else \
            _ReadoutSum(name, num_owned, rows, total)
        return self._piece(k, positions, exchange, with_grad)

    def readout_partial(self, positions: np.ndarray) -> torch.Tensor:
        """A readout summing over the system (``readout_sum``): the sum over this worker's parts
        of the partial sums the last step's ``energies`` gives ``global_sum``. Each part's last
        state is kept for ``readout_gradient`` (``last_out``)."""
        last, total = self.num_steps - 1, None
        for k in self._indices():
            local = self._graph(k, positions, with_grad=False, total=None)[0]
            with torch.no_grad():
                out = self._step(last, local, self._start(k, last, local, grad=False)[0])
                self.last_out[k] = out
                try:
                    run_energies(self.model, local, out)
                except _Stop:
                    pass
            partial = local.halo_exchange.partial
            if partial is None:
                raise RuntimeError(f"model: {type(self.model).__name__}.readout_sum is True but its "
                                   f"energies did not call graph.global_sum")
            total = partial if total is None else total + partial
            del local, out
        return total

    def readout_gradient(self, positions: np.ndarray, total: torch.Tensor) -> torch.Tensor:
        """The sum over this worker's parts of d(energies of the part)/d(the system's sum), from
        the last states ``readout_partial`` kept (then released)."""
        grad = torch.zeros_like(total)
        for k in self._indices():
            leaf = total.detach().clone().requires_grad_(True)
            local = self._graph(k, positions, with_grad=False, total=leaf)[0]
            out = self.last_out.pop(k)
            with torch.enable_grad():
                eps = run_energies(self.model, local, out)
                if eps.requires_grad:
                    (g,) = torch.autograd.grad(eps.sum(), [leaf], allow_unused=True)
                    if g is not None:
                        grad = grad + g
            del local, out, eps
        return grad

    def _slot(self, j: int, e: int) -> int:
        return j * self.width + e

    def _owned(self, k) -> slice:
        return slice(0, 0) if k is None else self.owned_slices[k]

    def _input(self, k, j: int, grad: bool) -> list[torch.Tensor]:
        """Step j's input state of part k, from level j - 1's stored Z (leaves if ``grad``)."""
        out = []
        for e in range(self.width):
            if self.kinds[e] == EDGE:
                x = self.edge_Z[self._slot(j - 1, e)][k].detach()
                out.append(x.requires_grad_(grad) if grad and x.is_floating_point() else x)
                continue
            z = self.store.Z[self._slot(j - 1, e)]
            if self.kinds[e] == HALO:
                rows = self.rows[k] if k is not None else torch.zeros(0, dtype=torch.long, device=self.device)
                x = z.index_select(0, rows)
            else:
                x = z[self._owned(k)].detach()
            out.append(x.requires_grad_(grad) if grad and x.is_floating_point() else x)
        return out

    def _start(self, k, j: int, local, grad: bool):
        """The input state of step j (embed for j = 0) and the leaves to differentiate."""
        if j == 0:
            return check_state(self.model, self.model.embed(local), "embed", local.num_nodes,
                               self.edges), []
        state = self._input(k, j, grad)
        return tuple(state), [(e, x) for e, x in enumerate(state) if x.requires_grad]

    def _step(self, j: int, local, state):
        out = check_state(self.model, self.model.step(j, local, state), f"step({j})", local.num_owned,
                          self.edges)
        if j < self.num_steps - 1:
            if self.width is None:
                self.width = len(out)
                for what, entries in (("exchanged", self.exchanged), ("edge_entries", self.edges)):
                    if any(e >= self.width or e < 0 for e in entries):
                        raise ValueError(f"model: {type(self.model).__name__}.{what} = {entries} "
                                         f"names entries its steps' state (of {self.width}) does not "
                                         f"have")
                self.kinds = [HALO if e in self.exchanged else EDGE if e in self.edges else LOCAL
                              for e in range(self.width)]
            elif len(out) != self.width:
                raise ValueError(f"model: {type(self.model).__name__}.step({j}) returned {len(out)} "
                                 f"state entries, step(0) {self.width}; every step but the last "
                                 f"must return the same entries")
        return out

    def forward_step(self, j: int, positions: np.ndarray) -> None:
        """Step j of every part from the stored input; its owned rows posted to level j."""
        for k in self._indices():
            local = self._graph(k, positions, with_grad=False)[0]
            with torch.no_grad():
                state = self._step(j, local, self._start(k, j, local, grad=False)[0])
            for e, y in enumerate(state):
                if self.kinds[e] == EDGE:
                    self.edge_Z.setdefault(self._slot(j, e), {})[k] = y.detach()
                    continue
                self.store.post(self._slot(j, e), self.kinds[e], self._owned(k),
                                y[: local.num_owned].detach())
            del local, state
            self.tick()

    def backward_step(self, j: int, positions: np.ndarray, gather) -> None:
        """Step j of every part again with gradients: dE/d(its input state) into level j - 1's
        G, dE/d(edge vectors) (this step's share) gathered; the last step's energies gathered."""
        store, last = self.store, self.num_steps - 1
        if j > 0:
            for e in range(self.width):
                slot = self._slot(j - 1, e)
                if self.kinds[e] == EDGE:
                    self.edge_G[slot] = {}
                else:
                    store.G[slot] = torch.zeros_like(store.Z[slot])
        readout = j == last and self.readout is not None
        for k in self._indices():
            local, kept = self._graph(k, positions, with_grad=True,
                                      total=self.readout[0] if readout else False)
            with torch.enable_grad():
                state, leaves = self._start(k, j, local, grad=True)
                out = self._step(j, local, state)
                eps = None
                if j == last:
                    eps = run_energies(self.model, local, out)
                    loss = eps.sum()
                    if readout:  # the other parts' energies depend on this part's partial sum too
                        loss = loss + (self.readout[1] * local.halo_exchange.partial).sum()
                else:
                    own = self._owned(k)
                    terms = [(g.to(y.dtype) * (y if self.kinds[e] == EDGE else y[: local.num_owned])).sum()
                             for e, y in enumerate(out) if y.is_floating_point()
                             for g in [self._grad_of(j, e, k, own)] if g is not None]
                    loss = sum(terms)
                wrt = [x for _, x in leaves] + [local.edge_vec]
                grads = torch.autograd.grad(loss, wrt, allow_unused=True) \
                    if isinstance(loss, torch.Tensor) and loss.requires_grad else [None] * len(wrt)
            if k is not None:
                for (e, _), g in zip(leaves, grads[:-1], strict=True):
                    if g is None:
                        continue
                    slot = self._slot(j - 1, e)
                    if self.kinds[e] == EDGE:
                        self.edge_G[slot][k] = g
                    elif self.kinds[e] == HALO:
                        store.G[slot].index_add_(0, self.rows[k], g)
                    else:
                        store.G[slot][self._owned(k)] += g
                if grads[-1] is not None or eps is not None:  # nothing to add otherwise
                    self._gather(gather, local, eps, kept, grads[-1], with_energies=eps is not None)
            del local, state, out, eps, grads
            self.tick()

    def _grad_of(self, j: int, e: int, k, own: slice) -> torch.Tensor | None:
        """dE/d(entry e of level j's state) on part k's rows: its owned rows, or for an edge entry
        the part's own gradient (``None`` if nothing after it depended on it)."""
        slot = self._slot(j, e)
        if self.kinds[e] == EDGE:
            return self.edge_G[slot].get(k)
        return self.store.Gown[slot][own]


def run_energies(model, local: LocalGraph, state) -> torch.Tensor:
    """``model.energies`` of the owned rows, its output checked like ``forward``'s."""
    out = model.energies(local, state)
    n, num_owned = local.num_nodes, local.num_owned
    if not isinstance(out, torch.Tensor) or out.ndim != 1 or not num_owned <= out.shape[0] <= n \
            or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: {type(model).__name__}.energies must return floating per-atom "
                         f"energies of the first graph.num_needed = {local.num_needed} rows, got {got}")
    return out[:num_owned]


#: Rows of the probe on which the runtime checks, once per runner, that the steps compose to
#: ``forward`` (the first owned rows of the first part, taken as a whole system).
PROBE_ROWS = 64


def _probe(worker: StepWorker, positions: np.ndarray) -> str | None:
    """None if the steps compose to ``forward`` on a small probe (the first ``PROBE_ROWS`` owned
    rows of the worker's first part and the edges among them, unsplit), else the refusal's
    message. Owned rows only: a halo row receives no edge in its part, so among owned rows every
    edge's reverse is there too (CHGNet's bond graph matches each edge with its reverse)."""
    k = worker._indices()[0]
    if k is None:
        return None
    local = worker._graph(k, positions, with_grad=False)[0]
    m = min(local.num_owned or local.num_nodes, PROBE_ROWS)
    keep = (local.edge_index < m).all(0)
    probe = LocalGraph.single(local.numbers[:m], local.edge_index[:, keep], local.edge_vec[keep].detach(),
                              local.cell)
    report = compare_steps(worker.model, probe)
    return None if report["ok"] else report["message"]


def _probe_atoms(model):
    """A small periodic crystal of (up to two of) the elements the model declares
    (``model.elements.numbers``; copper when it declares none): 2 atoms, 2.4 Å apart."""
    numbers = sorted(getattr(getattr(model, "elements", None), "numbers", None) or (29,))
    pair = [numbers[len(numbers) // 2], numbers[-1]] if len(numbers) > 1 else [numbers[0]] * 2
    return Atoms(numbers=pair, scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]],
                 cell=np.eye(3) * 2.77, pbc=True)


def check_steps_early(runner) -> None:
    """When the calculator is built: refuse a model whose steps do not compose to ``forward`` on
    a small probe crystal (naming the step and the largest difference), if the runner will take
    the steps (a budget or ``sequential``). A probe the model cannot evaluate (elements it lacks:
    a custom model that declares none) leaves the check to the first evaluation (on the system's
    own first part). Passed checks are remembered per model and dtype on this machine."""
    if not uses_steps(runner) or not (runner.budget is not None or runner.planner.sequential):
        return
    model = next(iter(runner.replicas.values()))
    source = runner.planner.source
    if check_passed(source, runner.dtype, "steps"):
        runner._steps_checked = True
        return
    try:
        graph = _probe_graph(_probe_atoms(model), float(model.cutoff), 16, 1.0)
        report = compare_steps(model, probe_local(graph, runner.dtype, runner.devices[0]))
    except Exception:  # noqa: BLE001 - a probe the model cannot take: checked at the first call
        return
    if not report["ok"]:
        raise ValueError(report["message"])
    remember_check(source, runner.dtype, "steps")
    runner._steps_checked = True


def evaluate_steps(runner, b: Built, positions: np.ndarray) -> tuple[tuple[str, ...], float]:
    """``evaluate_sequential`` for a model with the layer protocol (halo mode): the same results,
    the same level exchanges, one step recomputed per part and level instead of replays."""
    comm = runner.comm
    workers = [StepWorker(runner, b, s, comm.device(s)) for s in b.shards]
    L = workers[0].num_steps
    if not getattr(runner, "_steps_checked", False):
        # once per model, dtype and machine: a probe passed in an earlier process is remembered
        # (the probe costs 2-3 s for SevenNet-0 or MACE); every rank probes if any has no record
        source = runner.planner.source
        if comm.agree(not check_passed(source, runner.dtype, "steps")):
            message = _probe(workers[0], positions)
            if comm.agree(message is not None):
                raise ValueError(message or "model: its layer-protocol steps do not compose to its "
                                 "forward on another rank's probe; see that rank's message")
            remember_check(source, runner.dtype, "steps")
        runner._steps_checked = True
    pieces = sum(len(w._indices()) for w in workers)
    bar = Progress(pieces, L - 1, enabled=runner.progress and comm.rank == 0)
    for w in workers:
        w.tick = bar.tick
    p2p = comm.level_transport(b, runner.mode)
    exchanges = [LevelExchange(workers, i, p2p, comm.rank) for i in range(len(workers))]

    each = for_each(workers)
    gather = b.step.deposit  # the runner flushes or gathers the step's sums
    def width():
        widths = {w.width for w in workers}
        if len(widths) > 1 or comm.maximum(widths.pop()) != -comm.maximum(-workers[0].width):
            raise RuntimeError("model: its step(0) returned states of different lengths on "
                               "different parts")
        return workers[0].width

    for j in range(L - 1):  # forward: levels 0 .. L-2
        each(lambda w: w.forward_step(j, positions))
        for e in range(width()):
            slot = workers[0]._slot(j, e)
            if workers[0].kinds[e] == EDGE:  # part-local: stored as the steps returned it
                continue
            if workers[0].kinds[e] == HALO:
                _level_forward(comm, exchanges, slot, HALO)
            else:
                for w in workers:
                    w.store.Z[slot], w.store.X[slot] = w.store.X[slot], None
    _release()
    if getattr(workers[0].model, "readout_sum", False):
        # energies reads the system's sum of the last step's rows: the sum first, then the
        # gradient of every part's energies by it, which the last backward step adds to each
        # part's own partial sum's (as a global_sum level of the generic replay). The last
        # step's states are kept between the two passes (not recomputed: Orb, 72 parts, a
        # tenth of the call), within the forward's room for the level being posted when they
        # are as wide (a model should hand energies no more than it reads: no edge features)
        total = _total(comm, each(lambda w: w.readout_partial(positions)))
        grad = _total(comm, each(lambda w: w.readout_gradient(positions, total.to(w.device))))
        for w in workers:
            w.readout = (total.to(w.device).detach(), grad.to(w.device).detach())
    for j in reversed(range(L)):  # backward: from the last step
        each(lambda w: w.backward_step(j, positions, gather))
        if j == 0:
            break
        for e in range(workers[0].width):
            slot = workers[0]._slot(j - 1, e)
            if workers[0].kinds[e] == EDGE:  # part-local: each part's gradient is complete
                for w in workers:
                    w.edge_Z.pop(slot, None)
                    w.edge_G.pop(w._slot(j, e), None)
                continue
            if workers[0].kinds[e] == HALO:
                _level_backward(comm, exchanges, slot, HALO)
            else:
                for w in workers:
                    w.store.Gown[slot], w.store.G[slot] = w.store.G[slot], None
            for w in workers:  # level j - 1's input is read no more, level j's gradient neither
                w.store.Z[slot] = None
                if j < L - 1:
                    w.store.Gown[w._slot(j, e)] = None
    bar.close()
    _release()
    for w in workers:
        w.exchange_calls = (L - 1) * len(w.exchanged)
    return (HALO,) * ((L - 1) * len(workers[0].exchanged)), (p2p.seconds if p2p is not None else 0.0)
