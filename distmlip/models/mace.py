"""MACE (``mace-torch``): ``distmlip.wrap(model)`` for ``MACE`` and ``ScaleShiftMACE`` modules.

The adapter runs MACE's own ``forward`` unchanged, on a graph built from the ``LocalGraph``:

- positions are all zero and the edge ``shifts`` are ``-graph.edge_vec``, so MACE's
  ``vectors = positions[receiver] - positions[sender] + shifts`` equal ``-edge_vec``: MACE's
  vector points from the sender to the receiver, distmlip's from the receiver to the sender (both
  use ``edge_index = [senders; receivers]``). The energy then depends on positions only through
  ``edge_vec``, and MACE is asked for no derivatives (``compute_force=False``): distmlip takes
  forces and stress from the gradient with respect to ``edge_vec``.
- a forward pre-hook on every interaction block but the first calls ``graph.halo_exchange`` on
  the ``node_feats`` it is given. The first block reads the element embedding, which is exact on
  halo atoms. The hook does nothing outside ``MACEModel.forward`` (a context variable carries the
  exchange of the running worker), so the wrapped module still works as before on its own.

MACE's LAMMPS hook (``lammps_mliap``, ``LAMMPS_MP``) is not used: it is an autograd Function
whose backward needs a collective "reverse exchange" of the halo gradients, while distmlip's
``halo_exchange`` is an ordinary differentiable ``x -> x`` (all shards of a process are
differentiated in one backward pass, after the workers have returned).

Per-atom energies are MACE's ``node_energy``: atomic reference energies (E0s), plus the
scaled and shifted interaction energy (``ScaleShiftMACE``) or the sum of the readouts and pair
repulsion (``MACE``); they add up to MACE's total energy.
"""

from __future__ import annotations

import contextvars

import torch

from .base import DistributableModel, LocalGraph

__all__ = ["MACEModel", "supports", "wrap"]

# the halo exchange of the worker running in this thread (None outside MACEModel.forward)
_EXCHANGE: contextvars.ContextVar = contextvars.ContextVar("distmlip_mace_exchange", default=None)

_HOOK_FLAG = "_distmlip_exchange_hooks"


def _import_mace_models():
    try:
        from mace.modules import models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "distmlip's MACE adapter needs mace-torch: pip install distmlip[mace] "
            f"(import failed: {exc})"
        ) from exc
    return models


def _is_mace(obj) -> bool:
    if type(obj).__module__.split(".")[0] != "mace":
        return False
    try:
        models = _import_mace_models()
    except ImportError:
        return False
    return isinstance(obj, models.MACE)


def supports(obj) -> bool:
    """True for ``mace.modules.models.MACE`` and its subclasses (``ScaleShiftMACE``)."""
    return _is_mace(obj)


def _exchange_hook(module, args, kwargs):
    exchange = _EXCHANGE.get()
    if exchange is None:
        return None
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


def _install_hooks(model) -> None:
    """Hook the halo exchange in front of interactions 1.. (once per module)."""
    if getattr(model, _HOOK_FLAG, False):
        return
    for interaction in list(model.interactions)[1:]:
        interaction.register_forward_pre_hook(_exchange_hook, with_kwargs=True)
    setattr(model, _HOOK_FLAG, True)


class MACEModel(DistributableModel):
    """A MACE / ScaleShiftMACE module as a ``DistributableModel``.

    Args:
        model: a ``mace.modules.models.MACE`` (or ``ScaleShiftMACE``) module. It is used in place
            (not copied); forward pre-hooks that are inert outside distmlip are added to its
            interaction blocks.
        head: for multi-head models, the name of the head to evaluate (default: the first one,
            as MACE's calculator does).

    ``cutoff`` is the model's ``r_max`` and ``num_layers`` its number of interactions.
    """

    def __init__(self, model, head: str | None = None):
        super().__init__()
        if not _is_mace(model):
            raise TypeError(
                "model: expected a mace.modules.models.MACE or ScaleShiftMACE module, got "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        if hasattr(model, "joint_embedding"):
            raise ValueError(
                "model: MACE models with extra per-graph embeddings (embedding_specs) are not "
                "supported by the distmlip adapter"
            )
        heads = list(getattr(model, "heads", None) or ["Default"])
        if head is None:
            head_index = 0
        elif head in heads:
            head_index = heads.index(head)
        else:
            raise ValueError(f"head: expected one of {heads}, got {head!r}")
        self.model = model
        self.head = heads[head_index]
        self.cutoff = float(model.r_max)
        self.num_layers = int(model.num_interactions)
        z = [int(v) for v in model.atomic_numbers.tolist()]
        self.elements = tuple(z)
        index = torch.full((max(z) + 1,), -1, dtype=torch.long)
        index[torch.tensor(z, dtype=torch.long)] = torch.arange(len(z))
        self.register_buffer("z_index", index, persistent=False)
        self.register_buffer("head_index", torch.tensor([head_index]), persistent=False)
        _install_hooks(model)

    def _node_attrs(self, numbers: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        known = numbers < self.z_index.shape[0]
        idx = torch.where(known, self.z_index[numbers.clamp(max=self.z_index.shape[0] - 1)],
                          torch.full_like(numbers, -1))
        if bool((idx < 0).any()):
            bad = sorted(set(numbers[idx < 0].tolist()))
            raise ValueError(
                f"atoms: atomic numbers {bad} are not among the elements this MACE model was "
                f"trained on ({list(self.elements)})"
            )
        return torch.nn.functional.one_hot(idx, len(self.elements)).to(dtype)

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
        token = _EXCHANGE.set(graph.halo_exchange)
        try:
            out = self.model(data, training=False, compute_force=False, compute_virials=False,
                             compute_stress=False)
        finally:
            _EXCHANGE.reset(token)
        return out["node_energy"].reshape(n)


def wrap(obj, head: str | None = None) -> MACEModel:
    """``MACEModel(obj, head=head)``."""
    return MACEModel(obj, head=head)
