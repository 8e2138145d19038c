"""The contract between distmlip and a message-passing model."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["DistributableModel", "HaloExchange", "LocalGraph", "NUM_ELEMENTS", "check_model",
           "check_numbers", "compare_steps", "edge_entries", "has_steps", "no_exchange", "run_steps",
           "unknown_elements"]

#: Length of ``LocalGraph.composition``: atomic numbers 0..118.
NUM_ELEMENTS = 119


class HaloExchange:
    """The one type of every halo exchange: ``x -> x`` on node features.

    ``x`` holds either every local row, shape ``(num_rows, ...)``, or only the owned rows, shape
    ``(num_owned, ...)`` (owned rows always come first in a ``LocalGraph``); the result always has
    every row, the halo rows ``num_owned:`` holding their owners' values. It is differentiable:
    the backward pass sends each halo row's gradient home to its owner.

    This base class is the exchange of a system that is not split (every row owned: nothing to
    refresh). The runtime's exchanges (in one process, across threads, across ranks) subclass it
    and implement ``_exchange(owned)``, given the owned rows.

    It also carries the system-wide sum (``global_sum``, reached through
    ``LocalGraph.global_sum``): the sum of a per-atom quantity over the owned rows of every part,
    differentiable, equal on every worker. The base class's is the sum of an unsplit system.

    Attributes:
        num_owned, num_rows: rows owned, rows in all (``None``: any, for the unsplit no-op).
        halo: whether ``__call__`` refreshes halo rows (``False`` in extended mode, where the
            halo is deep enough and only ``global_sum`` communicates).
        calls: how many times it was called; ``reductions``: ``global_sum`` calls;
        ``seconds``: time spent communicating.
    """

    def __init__(self, num_owned: int | None = None, num_rows: int | None = None,
                 halo: bool = True):
        self.num_owned = num_owned
        self.num_rows = num_rows
        self.halo = halo
        self.calls = 0
        self.reductions = 0
        self.seconds = 0.0

    def global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over every worker of ``partial`` (this worker's sum over its owned rows, any
        shape), differentiable: the gradient of each worker's ``partial`` is the sum over all
        workers of the gradients of the result. Every worker must call it the same number of
        times, in the same order relative to ``__call__``."""
        self.reductions += 1
        return self._global_sum(partial)

    def _global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.halo:
            return x
        self.calls += 1
        if self.num_rows is None or self.num_owned == self.num_rows:
            return x
        rows = x.shape[0]
        if rows == self.num_rows:
            owned = x[: self.num_owned]
        elif rows == self.num_owned:
            owned = x
        else:
            raise ValueError(
                f"halo_exchange: expected node features with {self.num_rows} rows (all local "
                f"atoms) or {self.num_owned} (the owned atoms, which come first), got {rows}"
            )
        return self._exchange(owned)

    def _exchange(self, owned: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


#: The halo exchange of a system that is not split: nothing to refresh.
no_exchange = HaloExchange()


def _accept_owned_keyword(cls):
    """``LocalGraph(..., owned=mask)``, the field's old name, still works until the next release
    (with a ``DeprecationWarning``)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, owned=None, **kwargs):
        if owned is not None:
            if "owned_mask" in kwargs or len(args) > 4:
                raise TypeError("owned: got both owned and owned_mask; pass owned_mask only")
            warnings.warn("LocalGraph(owned=...) is deprecated: pass owned_mask=... (the (n,) bool "
                          "mask of owned rows); owned is removed in the next release",
                          DeprecationWarning, stacklevel=2)
            kwargs["owned_mask"] = owned
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accept_owned_keyword
@dataclass(frozen=True, eq=False)
class LocalGraph:
    """The piece of the system one worker evaluates: owned atoms first, then a halo.

    Attributes:
        numbers: (n,) int64 atomic numbers of the local atoms (owned rows first, then halo rows).
        edge_index: (2, E) int64 local ``[senders; receivers]`` (PyG's source-to-target order):
            a message flows from ``edge_index[0]`` to ``edge_index[1]``.
        edge_vec: (E, 3) edge vectors, receiver -> sender image, Å, in the model's dtype. Forces
            and stress are taken from the gradient of the energy with respect to this tensor.
        halo_exchange: ``x -> x`` on node features (a ``HaloExchange``): given ``(n, ...)`` or the
            owned rows ``(num_owned, ...)``, returns ``(n, ...)`` with the halo rows refreshed from
            their owners (autograd sends gradients home). Call it wherever a layer is about to read
            neighbours' features that an earlier layer has updated. A no-op when nothing is split.
        owned_mask: (n,) bool, which local atoms this worker owns (the first ``num_owned`` rows).
            Its old name ``owned`` (reading ``graph.owned``, constructing with ``owned=``) still
            works until the next release, with a ``DeprecationWarning``.
        atom_ids: (n,) int64 global atom indices (for adapters that need them).
        cell: (3, 3) lattice vectors (no gradient), in the model's dtype.
        num_owned: rows owned (default: counted from ``owned_mask``).
        num_needed: rows whose node-wise updates (and readouts) a layer must compute: ``num_owned``
            when a halo exchange refreshes the halo before it is read again (halo mode), ``n``
            otherwise (unsplit, or extended mode, where halo rows are computed redundantly).
            Default ``n``.
        composition: (119,) int64 counts of each atomic number (index = Z) in the *whole*
            system, on every worker alike (default: counted from the owned rows, right for an
            unsplit system). ``num_system_atoms`` is its sum.

    System-wide quantities (a readout of the mean node feature, a mixture of experts weighted by
    the composition) use ``global_sum`` and ``composition``; nothing else couples parts except
    ``halo_exchange``.
    """

    numbers: torch.Tensor
    edge_index: torch.Tensor
    edge_vec: torch.Tensor
    halo_exchange: HaloExchange
    owned_mask: torch.Tensor
    atom_ids: torch.Tensor
    cell: torch.Tensor
    num_owned: int | None = field(default=None)
    num_needed: int | None = field(default=None)
    composition: torch.Tensor | None = field(default=None)

    def __post_init__(self):
        if self.num_owned is None:
            object.__setattr__(self, "num_owned", int(self.owned_mask.sum()))
        if self.num_needed is None:
            object.__setattr__(self, "num_needed", self.num_nodes)
        if self.composition is None:
            counts = torch.bincount(self.numbers[: self.num_owned], minlength=NUM_ELEMENTS)
            object.__setattr__(self, "composition", counts[:NUM_ELEMENTS].to(torch.int64))

    @property
    def owned(self) -> torch.Tensor:
        """Deprecated alias of ``owned_mask`` (removed in the next release)."""
        warnings.warn("LocalGraph.owned is deprecated: use LocalGraph.owned_mask (the (n,) bool mask "
                      "of owned rows) or num_owned (they are the first rows); it is removed in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return self.owned_mask

    @property
    def num_system_atoms(self) -> int:
        """Atoms in the whole system (every part's owned atoms)."""
        return int(self.composition.sum())

    def global_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum`` over the owned atoms of the *whole* system of a per-atom quantity.

        ``x``: ``(rows, ...)`` with ``rows`` any of ``num_owned``, ``num_needed`` or ``n`` (only
        the first ``num_owned`` rows, the owned ones, are summed). Returns ``(...)``, the same
        on every worker, differentiable (forces through it are exact). Every worker must make
        the same ``global_sum`` calls, in the same order relative to ``halo_exchange``, even on
        an empty part. Example, a readout of the mean feature: ``graph.global_sum(h) /
        graph.num_system_atoms``.
        """
        if x.ndim == 0 or x.shape[0] < self.num_owned:
            got = tuple(x.shape)
            raise ValueError(
                f"global_sum: expected a per-atom tensor with at least num_owned = "
                f"{self.num_owned} rows (owned rows first), got shape {got}; pass the node "
                f"features themselves, not a sum over them"
            )
        return self.halo_exchange.global_sum(x[: self.num_owned].sum(0))

    @property
    def num_nodes(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @classmethod
    def single(cls, numbers, edge_index, edge_vec, cell=None) -> LocalGraph:
        """A whole, unsplit system (every atom owned, exchange a no-op)."""
        n = int(numbers.shape[0])
        device = edge_vec.device
        if cell is None:
            cell = torch.zeros(3, 3, dtype=edge_vec.dtype, device=device)
        return cls(
            numbers=numbers,
            edge_index=edge_index,
            edge_vec=edge_vec,
            halo_exchange=no_exchange,
            owned_mask=torch.ones(n, dtype=torch.bool, device=device),
            atom_ids=torch.arange(n, device=device),
            cell=cell,
            num_owned=n,
            num_needed=n,
        )


class DistributableModel(torch.nn.Module):
    """A message-passing interatomic potential distmlip can split.

    A model author subclasses this (or wraps an existing module) and provides:

    - ``cutoff`` (float, Å): the radius of the neighbour graph the model reads.
    - ``num_layers`` (int >= 1): how many hops of neighbours an atom's energy depends on (the
      number of message-passing layers; 1 for a pair potential). Extended mode holds a halo this
      deep.
    - ``forward(graph: LocalGraph) -> Tensor``: per-atom energies (eV) of the local atoms, shape
      ``(n,)``, or only of the first ``graph.num_needed`` rows (at least the ``num_owned`` owned
      rows, which come first). The energy must depend on positions only through
      ``graph.edge_vec``, and before every layer that reads neighbours' *updated* features the
      model calls ``graph.halo_exchange(x)`` on them. Every worker must call ``halo_exchange``
      the same number of times.

    Zero redundant work: node-wise updates and readouts need only rows ``:graph.num_needed``;
    ``halo_exchange`` accepts those rows and returns every row (see docs/wrapping.md).

    Features that live on edges or angles across atoms (CHGNet's bond graph) are not exchanged by
    distmlip: split their update into per-atom partial sums and exchange those as node features
    (see ``distmlip/models/chgnet.py`` and docs/wrapping.md); in the layer protocol such features
    are ``edge_entries`` of the state (below).

    distmlip sums the energies of owned atoms, and obtains forces and stress from the gradient of
    that sum with respect to ``edge_vec``. Halo rows of the output are discarded.

    An energy that is not a sum of per-atom terms (a readout of the system's mean feature, a
    mixture of experts weighted by the composition) uses ``graph.global_sum(x)`` and
    ``graph.composition`` (the whole system's, on every part) and returns per-atom shares that
    add up to it (docs/wrapping.md, section 4a); exact in every runner, the bounded-memory mode
    included.

    The layer protocol (optional; docs/wrapping.md, "Opting into the layer protocol"). A model
    may also describe its ``forward`` as steps the runtime calls one at a time, so that the
    bounded-memory mode recomputes one layer per part instead of replaying the model from the
    start for every exchange it differentiates (about one extra forward instead of L):

    - ``embed(graph) -> state``: a tuple of tensors whose first dimension is rows, exact on every
      local row that step 0 reads (node-wise work on ``graph.numbers``, say: the element
      embedding). A model whose first layer needs exchanged inputs makes step 0 the end of its
      embedding (owned rows), exchanged before step 1.
    - ``step(i, graph, state) -> state`` for ``i = 0 .. num_steps - 1`` (one message-passing
      layer): reads its input state (the entries listed in ``exchanged`` on every local row, the
      others on the first ``graph.num_needed`` rows) and returns the new state on the first
      ``graph.num_needed`` rows (the owned rows in halo mode; more rows are allowed and ignored).
      It must not call ``graph.halo_exchange`` or ``graph.global_sum``: between step ``i`` and
      step ``i + 1`` the runtime refreshes the halo rows of the ``exchanged`` entries of the state
      from their owners. Every step but the last returns a state of the same length; the last
      may return a shorter one (what ``energies`` reads).
    - ``energies(graph, state) -> Tensor``: per-atom energies of the first ``num_needed`` rows
      from the last step's state.
    - ``num_steps`` (default ``num_layers``) and ``exchanged``: the indices of the state entries
      other parts read on halo rows (``None``, the default: the model has no steps).
    - ``edge_entries`` (default ``()``): the indices of the state entries that are part-local:
      their rows are not atoms but the part's own edges (``graph.edge_index`` order), or anything
      else the part alone has and indexes by its edges (angles between two edges received by one
      atom, say), any number of rows, never exchanged. A step reads them and returns them whole
      (all their rows, not ``num_needed``); ``embed`` and the last step's state use the same
      indices for them. They are right in halo mode because every edge of a part ends at an
      owned atom: an edge feature that depends only on its receiver's edges and on the atom
      features (exchanged) is the same wherever the part boundary runs. The runtime stores them
      per part and level and sums their gradients per part; the memory model prices them per edge
      (CHGNet's bond and angle features, ``distmlip/models/chgnet.py``).
    - ``readout_sum`` (default ``False``): ``energies`` calls ``graph.global_sum`` once (a readout
      of a whole-system sum of the last step's rows, e.g. Orb's mean node feature). The runtime
      then sums the parts' partial sums before the last backward step and adds the gradient of
      every part's energies by that sum to each part's own (two extra passes of the last step).

    Composing them with the exchanges between steps must equal ``forward`` (``run_steps`` does
    exactly that; ``compare_steps`` and ``distmlip.testing.check_steps`` check it, and the runtime
    checks it on a small probe crystal when a calculator that will use the steps is built). A
    model without them keeps working through the generic replay, unchanged.
    """

    cutoff: float
    num_layers: int

    #: Layer protocol: indices of the state entries the next step reads on halo rows (exchanged
    #: by the runtime between steps); ``None``: the model does not implement the steps.
    exchanged: tuple[int, ...] | None = None

    #: Layer protocol: indices of the part-local state entries whose rows are the part's edges (or
    #: angles), stored per part, never exchanged (see the class docstring).
    edge_entries: tuple[int, ...] = ()

    #: Layer protocol: ``energies`` sums over the system once (``graph.global_sum``).
    readout_sum: bool = False

    def forward(self, graph: LocalGraph) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        """Layer protocol: how many ``step`` calls make the model (default ``num_layers``)."""
        return int(self.num_layers)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:  # pragma: no cover - optional
        """Layer protocol: the state step 0 reads (see the class docstring)."""
        raise NotImplementedError

    def step(self, i: int, graph: LocalGraph,
             state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        """Layer protocol: message-passing layer ``i`` (see the class docstring)."""
        raise NotImplementedError

    def energies(self, graph: LocalGraph,
                 state: tuple[torch.Tensor, ...]) -> torch.Tensor:  # pragma: no cover - optional
        """Layer protocol: per-atom energies from the last step's state (see the class docstring)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.get_default_dtype()


_GUIDE = "see docs/wrapping.md"


def check_model(model) -> None:
    """Check that ``model`` declares the ``DistributableModel`` contract: a positive, finite
    ``cutoff`` (Å), an integer ``num_layers >= 1`` and its own ``forward``. Raises ``TypeError``
    (not a ``DistributableModel``, a declaration missing or of the wrong type) or ``ValueError``
    (a declaration out of range), naming the class, the attribute and what was expected."""
    import math

    import numpy as np

    if not isinstance(model, DistributableModel):
        raise TypeError(
            f"model: expected a distmlip.models.DistributableModel, got {type(model).__name__}; "
            f"wrap a third-party module with distmlip.wrap(module) ({_GUIDE})"
        )
    name = type(model).__name__
    missing = object()
    cutoff = getattr(model, "cutoff", missing)
    if cutoff is missing:
        raise TypeError(f"model: {name}.cutoff: expected a positive number (the radius of the "
                        f"neighbour graph it reads, in Å), got no attribute 'cutoff'; set "
                        f"self.cutoff in {name}.__init__ ({_GUIDE})")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.integer, np.floating)):
        raise TypeError(f"model: {name}.cutoff: expected a positive number of Å, got "
                        f"{type(cutoff).__name__} {cutoff!r}")
    if not (math.isfinite(float(cutoff)) and float(cutoff) > 0):
        raise ValueError(f"model: {name}.cutoff: expected a positive, finite number of Å, got {cutoff!r}")
    layers = getattr(model, "num_layers", missing)
    if layers is missing:
        raise TypeError(f"model: {name}.num_layers: expected an integer >= 1 (how many hops of "
                        f"neighbours an atom's energy depends on: its message-passing layers), got "
                        f"no attribute 'num_layers'; set self.num_layers in {name}.__init__ ({_GUIDE})")
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)):
        raise TypeError(f"model: {name}.num_layers: expected an integer >= 1 (message-passing "
                        f"layers), got {type(layers).__name__} {layers!r}")
    if layers < 1:
        raise ValueError(f"model: {name}.num_layers: expected an integer >= 1 (message-passing "
                         f"layers; 1 for a pair potential), got {layers}")
    if type(model).forward is DistributableModel.forward:
        raise TypeError(f"model: {name}.forward: expected an implementation (graph -> per-atom "
                        f"energies), got DistributableModel's abstract forward ({_GUIDE})")


def unknown_elements(name: str, unknown, knows: str) -> ValueError:
    """The error every adapter raises for atomic numbers its model has no parameters for:
    ``name`` the model, ``unknown`` the atomic numbers, ``knows`` what it covers (text)."""
    from ase.data import chemical_symbols

    unknown = sorted({int(z) for z in unknown})
    symbols = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?" for z in unknown)
    return ValueError(
        f"numbers: {name} has no parameters for atomic number(s) {unknown} ({symbols}); it knows "
        f"{knows}; use a model trained on these elements"
    )


def check_numbers(numbers: torch.Tensor, low: int, high: int, name: str) -> None:
    """``ValueError`` (``unknown_elements``) if an atomic number is outside the range
    ``[low, high]`` a model ``name`` has parameters for."""
    bad = (numbers < low) | (numbers > high)
    if bool(bad.any()):
        from ase.data import chemical_symbols

        def symbol(z):
            return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"

        raise unknown_elements(name, numbers[bad].tolist(),
                               f"atomic numbers {low}-{high} ({symbol(low)}-{symbol(high)})")


# ---------------------------------------------------------------------- the layer protocol
def has_steps(model) -> bool:
    """Whether ``model`` implements the layer protocol (``embed``, ``step``, ``energies`` and
    ``exchanged``; see ``DistributableModel``)."""
    if not isinstance(model, DistributableModel) or getattr(model, "exchanged", None) is None:
        return False
    cls = type(model)
    return all(getattr(cls, name) is not getattr(DistributableModel, name)
               for name in ("embed", "step", "energies"))


def edge_entries(model) -> tuple[int, ...]:
    """The model's part-local (per-edge) state entries, checked: ``ValueError`` if one is also
    ``exchanged`` or is not an index."""
    entries = tuple(getattr(model, "edge_entries", ()) or ())
    name = type(model).__name__
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in entries):
        raise ValueError(f"model: {name}.edge_entries: expected indices of state entries (ints >= 0), "
                         f"got {entries!r}")
    both = sorted(set(entries) & set(getattr(model, "exchanged", None) or ()))
    if both:
        raise ValueError(f"model: {name}: state entries {both} are both exchanged and edge_entries; "
                         f"an edge entry is part-local and never exchanged")
    return entries


def check_state(model, state, what: str, rows: int, edges: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """``state`` as a tuple of tensors of at least ``rows`` rows (the entries listed in ``edges``:
    any number of rows), or ``ValueError`` naming ``what`` returned it."""
    name = type(model).__name__
    if isinstance(state, torch.Tensor) or not isinstance(state, (tuple, list)):
        raise ValueError(f"model: {name}.{what} must return a tuple of tensors (the state), got "
                         f"{type(state).__name__}")
    for e, t in enumerate(state):
        least = 0 if e in edges else rows
        if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] < least:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"model: {name}.{what}: state entry {e}: expected a tensor of at least "
                             f"{rows} rows, got {got}")
    return tuple(state)


def run_steps(model, graph: LocalGraph, record: list | None = None) -> torch.Tensor:
    """``model``'s per-atom energies composed from its steps: ``embed``, every ``step`` with
    ``graph.halo_exchange`` applied to the ``exchanged`` entries between steps, ``energies``.
    Equal to ``model(graph)`` for a model whose steps are right. ``record``: a list that receives,
    per step, the state it returned."""
    edges = edge_entries(model)
    state = check_state(model, model.embed(graph), "embed", graph.num_nodes, edges)
    last = model.num_steps - 1
    for i in range(model.num_steps):
        if i > 0:
            state = tuple(graph.halo_exchange(t) if e in model.exchanged else t
                          for e, t in enumerate(state))
        state = check_state(model, model.step(i, graph, state), f"step({i})", graph.num_needed, edges)
        if record is not None:
            record.append(state)
        if i < last and any(e >= len(state) for e in model.exchanged):
            raise ValueError(f"model: {type(model).__name__}.step({i}) returned {len(state)} state "
                             f"entries; exchanged = {tuple(model.exchanged)} names more")
    return model.energies(graph, state)


class _Recorder(HaloExchange):
    """The exchange of an unsplit graph that records what ``forward`` exchanges."""

    def __init__(self, num_rows: int):
        super().__init__(num_rows, num_rows)
        self.seen: list[torch.Tensor] = []

    def __call__(self, x):
        self.calls += 1
        self.seen.append(x.detach())
        return x


def compare_steps(model, graph: LocalGraph) -> dict:
    """How far ``model``'s steps are from its ``forward`` on ``graph`` (unsplit: taken as a whole
    system, every row owned): ``{"ok", "where", "energies", "gradient", "levels", "message"}``.
    ``energies`` and ``gradient``: the relative error (max|a - b| / max(max|b|, 1)) of the per-atom
    energies and of their sum's gradient with respect to the edge vectors; ``levels``: per exchange
    ``forward`` makes, the error of the matching exchanged state entry of the steps (when forward
    exchanges exactly the declared entries); ``where``: the first step whose exchanged output
    differs (a step that only spoils entries that are not exchanged shows at the next step that
    exchanges, or as ``"step(L-1) or energies"``), ``None`` if nothing differs beyond 1e-10
    (float64; 1e-4 in lower precision)."""
    n = graph.num_nodes
    vec = graph.edge_vec.detach().clone()

    def graph_for(exchange):
        return LocalGraph(numbers=graph.numbers, edge_index=graph.edge_index,
                          edge_vec=vec.clone().requires_grad_(True), halo_exchange=exchange,
                          owned_mask=torch.ones(n, dtype=torch.bool, device=vec.device),
                          atom_ids=graph.atom_ids, cell=graph.cell, num_owned=n, num_needed=n,
                          composition=graph.composition)

    def rel(a, b):
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        if a.shape != b.shape:
            return float("inf")
        if b.numel() == 0:
            return 0.0
        return float((a - b).abs().max() / max(float(b.abs().max()), 1.0))

    tol = 1e-10 if vec.dtype == torch.float64 else 1e-4
    with torch.enable_grad():
        g_ref = graph_for(_Recorder(n))
        ref = model(g_ref)[:n]
        (grad_ref,) = torch.autograd.grad(ref.sum(), [g_ref.edge_vec], allow_unused=True)
        g_steps = graph_for(_Recorder(n))
        states: list = []
        got = run_steps(model, g_steps, states)[:n]
        (grad_got,) = torch.autograd.grad(got.sum(), [g_steps.edge_vec], allow_unused=True)
    zero = torch.zeros_like(vec)
    report = {"energies": rel(got, ref),
              "gradient": rel(zero if grad_got is None else grad_got, zero if grad_ref is None else grad_ref),
              "levels": [], "where": None}
    seen, exchanged = g_ref.halo_exchange.seen, tuple(model.exchanged)
    if len(seen) == (model.num_steps - 1) * len(exchanged):
        it = iter(seen)
        for i, state in enumerate(states[:-1]):
            for e in exchanged:
                err = rel(state[e][:n], next(it)[:n])
                report["levels"].append(err)
                if err > tol and report["where"] is None:
                    report["where"] = f"step({i})"
    if report["where"] is None and max(report["energies"], report["gradient"]) > tol:
        report["where"] = (f"step({model.num_steps - 1}) or energies" if report["levels"]
                           else "the steps (forward exchanges other tensors than the declared "
                                "entries: no step-by-step comparison)")
    worst = max([report["energies"], report["gradient"], *report["levels"]])
    report["ok"] = report["where"] is None
    report["message"] = (
        f"model: {type(model).__name__}: its steps compose to its forward (largest relative "
        f"difference {worst:.2e})" if report["ok"] else
        f"model: {type(model).__name__}: its layer-protocol steps do not compose to its forward: "
        f"{report['where']} differs first (largest relative difference {worst:.2e}: per-atom "
        f"energies {report['energies']:.2e}, edge gradient {report['gradient']:.2e}, exchanged "
        f"states {', '.join(f'{x:.2e}' for x in report['levels']) or '-'}); fix the step or "
        f"remove the steps (exchanged = None) to use the generic path")
    return report
