"""MACE (``mace-torch``): ``distmlip.wrap(model)`` for ``MACE`` and ``ScaleShiftMACE`` modules.

The adapter runs MACE's own ``forward`` unchanged, on a graph built from the ``LocalGraph``:

- positions are all zero and the edge ``shifts`` are ``-graph.edge_vec``, so MACE's
  ``vectors = positions[receiver] - positions[sender] + shifts`` equal ``-edge_vec``: MACE's
  vector points from the sender to the receiver, distmlip's from the receiver to the sender (both
  use ``edge_index = [senders; receivers]``). The energy then depends on positions only through
  ``edge_vec``, and MACE is asked for no derivatives (``compute_force=False``): distmlip takes
  forces and stress from the gradient with respect to ``edge_vec``.
- the halo exchange before interaction ``i >= 1``: for MACE's own interaction blocks it is moved
  onto the output of the block's ``linear_up`` (a forward hook; its input is sliced to the owned
  rows first), the node-wise linear map whose result the messages read on senders: only owned
  rows are mapped, and the exchange refreshes the halo rows of its result instead of its input
  (the same values, as the map is node-wise; the same data volume for MACE's blocks, where
  ``linear_up`` keeps the irreps). For interaction blocks the adapter does not know, a forward
  pre-hook calls ``graph.halo_exchange`` on the ``node_feats`` the block is given, as before. The
  first block reads the element embedding, which is exact on halo atoms: no exchange.
- zero redundant node work (halo mode, where ``graph.num_needed`` is the number of owned rows):
  forward pre-hooks slice the inputs of every node-wise block to rows ``:num_needed``: the
  product basis (``products[i]``: symmetric contraction, linear map and residual), the readouts
  (whose per-atom energies are padded back to every row with zeros: MACE indexes them over all
  atoms, and distmlip discards halo rows), and inside the interactions the self-connection
  (``skip_tp``) and the linear map after the message aggregation (``linear``; per block class,
  where MACE's code allows it, see ``_INTERACTIONS``). Messages are still aggregated onto every
  row (MACE sizes the scatter by its input), but in halo mode no edge points to a halo row, and
  the slices drop those rows before any node-wise work. Halo rows of node features are thus
  never computed: the next exchange fills them, and readouts never see them. In extended mode or
  unsplit (``num_needed`` = every row) nothing is sliced.

The hooks are registered on the adapter's own deep copy of the module (``MACEModel.module``),
never on the caller's; they also do nothing outside ``MACEModel.forward`` (a context variable
carries the exchange and row counts of the running worker).

MACE's LAMMPS hook (``lammps_mliap``, ``LAMMPS_MP``) is not used: it is an autograd Function
whose backward needs a collective "reverse exchange" of the halo gradients, while distmlip's
``halo_exchange`` is an ordinary differentiable ``x -> x`` (all shards of a process are
differentiated in one backward pass, after the workers have returned).

The layer protocol (bounded memory by steps, ``DistributableModel``): ``MACEModel.embed/step/
energies`` restate MACE's and ScaleShiftMACE's own ``forward`` one interaction at a time, under the
same hooks (so with the same row slicing); the exchanged state entry is what the exchange above
refreshes (``linear_up``'s output, or the node features), which a step's run hands to the hook
instead of exchanging. Subclasses with another ``forward`` keep the generic replay.

Per-atom energies are MACE's ``node_energy``: atomic reference energies (E0s), plus the
scaled and shifted interaction energy (``ScaleShiftMACE``) or the sum of the readouts and pair
repulsion (``MACE``); they add up to MACE's total energy.
"""

from __future__ import annotations

import torch

from ._adapter import (
    ElementTable,
    HookState,
    no_pretrained_load,
    optional_import,
    private_copy,
    supported,
    wrap_with,
)
from ._adapter import RunRows as _Run
from .base import DistributableModel, LocalGraph

__all__ = ["MACEModel", "OPTIONS", "PACKAGES", "PRETRAINED", "load", "supports", "wrap"]

PACKAGES = ("mace",)
PRETRAINED: dict[str, str] = {}  # MACE's foundation models download at run time
OPTIONS = ("head",)
_WHAT = "MACE models"

# the running worker's ``_Run`` (None outside MACEModel.forward)
_RUN = HookState("distmlip_mace_run")

_HOOK_FLAG = "_distmlip_exchange_hooks"

# MACE's interaction blocks whose node-wise submodules the adapter slices: per class, whether
# the exchange moves onto ``linear_up``'s output (interactions 1..), and which submodules' inputs
# are sliced to the needed rows in the first interaction and in the later ones. Checked against
# mace-torch 0.3's ``forward``s: the sliced submodules' outputs meet only other needed-row
# tensors. (The density blocks size their density scatter by the rows of their input: all rows
# in the first interaction, whose ``linear`` output is divided by it, so it is not sliced there;
# the owned rows later, which is exact in halo mode, where every edge is received by an owned
# atom.) Other classes keep the exchange on their input and are not sliced inside.
_INTERACTIONS = {
    "RealAgnosticInteractionBlock": (True, ("linear", "skip_tp"), ("linear", "skip_tp")),
    "RealAgnosticResidualInteractionBlock": (True, ("skip_tp", "linear"), ("skip_tp", "linear")),
    "RealAgnosticDensityInteractionBlock": (True, ("skip_tp",), ("linear", "skip_tp")),
    "RealAgnosticDensityResidualInteractionBlock": (True, ("skip_tp",), ("skip_tp", "linear")),
    "RealAgnosticResidualNonLinearInteractionBlock": (True, ("skip_tp",),
                                                      ("skip_tp", "linear_res")),
    "RealAgnosticAttResidualInteractionBlock": (False, ("skip_linear", "linear"),
                                                ("skip_linear", "linear")),
}




def _trim(x, run: _Run):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == run.rows:
        return x[: run.needed]
    return x


def _slice_hook(module, args, kwargs):
    """Forward pre-hook of a node-wise block: its per-node inputs cut to the needed rows."""
    run = _RUN.get()
    if run is None or run.needed == run.rows:
        return None
    return tuple(_trim(a, run) for a in args), {k: _trim(v, run) for k, v in kwargs.items()}


def _pad_hook(module, args, output):
    """Forward hook of a readout: its needed rows padded back to every row with zeros (MACE
    indexes the readouts over all atoms; distmlip discards halo rows)."""
    run = _RUN.get()
    if run is None or run.needed == run.rows or output.shape[0] != run.needed:
        return None
    pad = output.new_zeros((run.rows - run.needed, *output.shape[1:]))
    return torch.cat([output, pad])


def _up_slice_hook(module, args, kwargs):
    """Forward pre-hook of ``linear_up`` in interactions 1..: its input cut to the needed rows, or
    to none in a layer-protocol step, where its output is the state's exchanged entry."""
    if isinstance(_RUN.get(), _StepRows):
        return tuple(a[:0] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args), kwargs
    return _slice_hook(module, args, kwargs)


def _exchange_output_hook(module, args, output):
    """Forward hook of ``linear_up`` in interactions 1..: the halo rows of its (owned-row) output
    filled from their owners. Called in every worker, sliced or not (workers meet there)."""
    run = _RUN.get()
    if run is None:
        return None
    return run.exchange(output)


class _StepRows(_Run):
    """The run of a layer-protocol step: the rows of a forward call's, but nothing is exchanged: the
    stepped interaction's exchanged input (``linear_up``'s output, or its node features for a block
    whose exchange is not moved) is ``given``, the state's exchanged entry."""

    __slots__ = ("given",)

    def __init__(self, graph, given):
        super().__init__(graph)
        self.given = given
        self.exchange = self._given

    def _given(self, x):
        if self.given is None:  # pragma: no cover - interaction 0 has no exchange hook
            raise RuntimeError("distmlip MACE adapter: an exchange in the first interaction's step")
        return self.given


def _import_mace_models():
    return optional_import("mace.modules.models", "mace", "wrap MACE models")


def _is_mace(obj) -> bool:
    return supported(obj, PACKAGES, lambda o: isinstance(o, _import_mace_models().MACE))


def supports(obj) -> bool:
    """True for ``mace.modules.models.MACE`` and its subclasses (``ScaleShiftMACE``)."""
    return _is_mace(obj)


def _exchange_hook(module, args, kwargs):
    """Forward pre-hook of an interaction block the adapter does not slice inside: the halo rows
    of its ``node_feats`` refreshed."""
    run = _RUN.get()
    if run is None:
        return None
    exchange = run.exchange
    if "node_feats" in kwargs:
        kwargs = dict(kwargs)
        kwargs["node_feats"] = exchange(kwargs["node_feats"])
        return args, kwargs
    if len(args) >= 2:  # positional call: (node_attrs, node_feats, ...)
        args = (args[0], exchange(args[1])) + tuple(args[2:])
        return args, kwargs
    raise RuntimeError(
        f"distmlip MACE adapter: {type(module).__name__} was called without node_feats"
    )


def _known_interaction(block):
    if type(block).__module__.split(".")[0] != "mace":
        return None
    return _INTERACTIONS.get(type(block).__name__)


def _moves_exchange(block) -> bool:
    """Whether the exchange before ``block`` (interactions 1..) is moved onto ``linear_up``'s output."""
    known = _known_interaction(block)
    return bool(known and known[0]) and isinstance(getattr(block, "linear_up", None), torch.nn.Module)


def _install_hooks(model) -> None:
    """Hook the halo exchange and the row slicing into the model's blocks (once per module)."""
    if getattr(model, _HOOK_FLAG, False):
        return
    for i, interaction in enumerate(model.interactions):
        known = _known_interaction(interaction)
        first, later = known[1:] if known is not None else ((), ())
        for name in (first if i == 0 else later):
            sub = getattr(interaction, name, None)
            if isinstance(sub, torch.nn.Module):
                sub.register_forward_pre_hook(_slice_hook, with_kwargs=True)
        if i == 0:
            continue
        if _moves_exchange(interaction):
            interaction.linear_up.register_forward_pre_hook(_up_slice_hook, with_kwargs=True)
            interaction.linear_up.register_forward_hook(_exchange_output_hook)
        else:
            interaction.register_forward_pre_hook(_exchange_hook, with_kwargs=True)
    for product in model.products:
        product.register_forward_pre_hook(_slice_hook, with_kwargs=True)
    for readout in model.readouts:
        readout.register_forward_pre_hook(_slice_hook, with_kwargs=True)
        readout.register_forward_hook(_pad_hook)
    setattr(model, _HOOK_FLAG, True)


class MACEModel(DistributableModel):
    """A MACE / ScaleShiftMACE module as a ``DistributableModel``.

    Args:
        module: a ``mace.modules.models.MACE`` (or ``ScaleShiftMACE``) module. It is not modified:
            the adapter deep-copies it (``.module``) and adds forward hooks, inert outside
            distmlip, to the copy's interaction, product and readout blocks (module docstring).
        head: for multi-head models, the name of the head to evaluate (default: the first one,
            as MACE's calculator does).

    ``cutoff`` is the model's ``r_max`` and ``num_layers`` its number of interactions.
    """

    def __init__(self, module, *, head: str | None = None):
        super().__init__()
        if not _is_mace(module):
            raise TypeError(
                "module: expected a mace.modules.models.MACE or ScaleShiftMACE module, got "
                f"{type(module).__module__}.{type(module).__name__}"
            )
        if hasattr(module, "joint_embedding"):
            raise ValueError(
                "module: MACE models with extra per-graph embeddings (embedding_specs) are not "
                "supported by the distmlip adapter"
            )
        heads = list(getattr(module, "heads", None) or ["Default"])
        if head is None:
            head_index = 0
        elif head in heads:
            head_index = heads.index(head)
        else:
            raise ValueError(f"head: expected one of {heads}, got {head!r}")
        self.module = private_copy(module)  # hooked below: the caller's module is not modified
        self.head = heads[head_index]
        self.cutoff = float(module.r_max)
        self.num_layers = int(module.num_interactions)
        self.elements = ElementTable([int(v) for v in module.atomic_numbers.tolist()], "this MACE model")
        self.register_buffer("head_index", torch.tensor([head_index]), persistent=False)
        _install_hooks(self.module)
        # Layer protocol, per instance: the steps below restate the body of MACE's and
        # ScaleShiftMACE's own ``forward`` (mace-torch 0.3), so a subclass with another forward
        # (mace's MACELES, whose long-range term couples the whole system, PolarMACE, a user's)
        # or a readout layout other than one readout per interaction or one on the last keeps the
        # generic replay; every interaction block class works (the exchange hooks decide what is
        # exchanged, and they are the same in forward and in the steps).
        self.exchanged = (1,) if _steps_describe(self.module) else None

    def _node_attrs(self, numbers: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        idx = self.elements(numbers)
        return torch.nn.functional.one_hot(idx, self.elements.num_types).to(dtype)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        vec = graph.edge_vec
        n = graph.num_nodes
        device, dtype = vec.device, vec.dtype
        data = {
            "node_attrs": self._node_attrs(graph.numbers, dtype),
            "positions": torch.zeros(n, 3, dtype=dtype, device=device),
            "edge_index": graph.edge_index,
            "shifts": -vec,
            "unit_shifts": torch.zeros_like(vec),
            "cell": graph.cell.reshape(3, 3).to(dtype),
            "batch": torch.zeros(n, dtype=torch.long, device=device),
            "ptr": torch.tensor([0, n], dtype=torch.long, device=device),
            "head": self.head_index,
        }
        with _RUN.active(_Run(graph)):
            out = self.module(data, training=False, compute_force=False, compute_virials=False,
                             compute_stress=False)
        return out["node_energy"].reshape(n)


    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward`` (MACE's own), as steps the runtime calls one at a time
    # (see ``DistributableModel``). The state is ``(h, x, acc)``: ``h`` the node features on the
    # needed rows (the product basis' output; the element embedding, on every row, before step 0),
    # ``x`` what the next interaction reads on halo rows, exchanged between steps: its
    # ``linear_up`` of ``h`` when the exchange is moved there, else ``h`` itself; ``acc`` the
    # per-atom energy terms summed so far on the needed rows (pair repulsion, plus the E0s for
    # plain MACE, then each layer's readout, in forward's order). Step ``i`` runs interaction ``i``
    # and product ``i`` under the same hooks as forward (the same row slicing), the exchange hook
    # handing over ``x`` instead of exchanging; the last step returns ``(acc,)``.

    #: Layer protocol: state entry 1 (the next interaction's input read on halo rows) is exchanged
    #: (set per instance in ``__init__``: ``None`` where the steps do not describe the module).
    exchanged = None

    def _inputs(self, graph: LocalGraph):
        """node_attrs on every row, node_heads, edge vectors (MACE's sign) and lengths."""
        vectors = -graph.edge_vec
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        heads = self.head_index[torch.zeros(graph.num_nodes, dtype=torch.long, device=vectors.device)]
        return self._node_attrs(graph.numbers, vectors.dtype), heads, vectors, lengths

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The element embedding on every row, and the energy terms before the interactions."""
        mace = self.module
        attrs, heads, _, lengths = self._inputs(graph)
        h = mace.node_embedding(attrs)
        if hasattr(mace, "pair_repulsion"):
            acc = mace.pair_repulsion_fn(lengths, attrs, graph.edge_index, mace.atomic_numbers)
        else:
            acc = h.new_zeros(graph.num_nodes)
        if not hasattr(mace, "scale_shift"):  # plain MACE sums the E0s first
            acc = self._node_e0(attrs, heads) + acc
        return h, h, acc

    def _node_e0(self, attrs, heads):
        rows = torch.arange(attrs.shape[0], device=attrs.device)
        return self.module.atomic_energies_fn(attrs)[rows, heads]

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Interaction ``i``, product ``i`` and readout ``i`` on the needed rows; the next
        interaction's exchanged input of the result."""
        mace = self.module
        h, x, acc = state
        attrs, heads, vectors, lengths = self._inputs(graph)
        edge_attrs = mace.spherical_harmonics(vectors)
        edge_feats, cutoff = mace.radial_embedding(lengths, attrs, graph.edge_index, mace.atomic_numbers)
        run = _StepRows(graph, x if i > 0 else None)
        last = i == len(mace.interactions) - 1
        with _RUN.active(run):
            feats, sc = mace.interactions[i](
                node_attrs=attrs, node_feats=h, edge_attrs=edge_attrs, edge_feats=edge_feats,
                edge_index=graph.edge_index, cutoff=cutoff, first_layer=(i == 0),
                lammps_class=None, lammps_natoms=(0, 0))
            h = mace.products[i](node_feats=feats, sc=sc, node_attrs=attrs)
            acc = acc[: run.needed]
            if len(mace.readouts) > 1 or last:  # one readout per layer, or one on the last
                readout = mace.readouts[i if len(mace.readouts) > 1 else 0]
                rows = torch.arange(graph.num_nodes, device=h.device)
                acc = acc + readout(h, heads)[rows, heads][: run.needed]
        if last:
            return (acc,)
        following = mace.interactions[i + 1]
        x = following.linear_up(h) if _moves_exchange(following) else h  # hooks inert: no run
        return h, x, acc

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The energy terms summed by the steps, scaled and shifted and with the E0s added as
        ``ScaleShiftMACE`` does (plain MACE: already the sum)."""
        mace = self.module
        acc = state[0]
        if not hasattr(mace, "scale_shift"):
            return acc
        attrs, heads, _, _ = self._inputs(graph)
        needed = acc.shape[0]
        inter = mace.scale_shift(acc, heads[:needed])
        return self._node_e0(attrs, heads)[:needed].double() + inter.double()


def _steps_describe(module) -> bool:
    """Whether ``MACEModel``'s steps restate ``module``'s forward (see ``MACEModel.__init__``)."""
    models = _import_mace_models()
    interactions = len(module.interactions)
    return (type(module).forward in (models.MACE.forward, models.ScaleShiftMACE.forward)
            and interactions == len(module.products) == int(module.num_interactions) >= 1
            and len(module.readouts) in (1, interactions)
            and not hasattr(module, "joint_embedding"))


#: ``MACEModel(obj, **options)``; ``obj`` is deep-copied, not modified
wrap = wrap_with(MACEModel, OPTIONS, _WHAT)
load = no_pretrained_load("MACE", OPTIONS, _WHAT)
