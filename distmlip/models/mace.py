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


def _exchange_output_hook(module, args, output):
    """Forward hook of ``linear_up`` in interactions 1..: the halo rows of its (owned-row) output
    filled from their owners. Called in every worker, sliced or not (workers meet there)."""
    run = _RUN.get()
    if run is None:
        return None
    return run.exchange(output)


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


def _install_hooks(model) -> None:
    """Hook the halo exchange and the row slicing into the model's blocks (once per module)."""
    if getattr(model, _HOOK_FLAG, False):
        return
    for i, interaction in enumerate(model.interactions):
        known = _known_interaction(interaction)
        move, first, later = known if known is not None else (False, (), ())
        for name in (first if i == 0 else later):
            sub = getattr(interaction, name, None)
            if isinstance(sub, torch.nn.Module):
                sub.register_forward_pre_hook(_slice_hook, with_kwargs=True)
        if i == 0:
            continue
        if move and isinstance(getattr(interaction, "linear_up", None), torch.nn.Module):
            interaction.linear_up.register_forward_pre_hook(_slice_hook, with_kwargs=True)
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


#: ``MACEModel(obj, **options)``; ``obj`` is deep-copied, not modified
wrap = wrap_with(MACEModel, OPTIONS, _WHAT)
load = no_pretrained_load("MACE", OPTIONS, _WHAT)
