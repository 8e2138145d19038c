"""matgl's TensorNet (PyTorch Geometric backend) as a ``DistributableModel``.

``distmlip.wrap`` accepts a ``matgl.apps.pes.Potential`` holding a ``TensorNet``, or the
``TensorNet`` itself. The adapter runs matgl's own submodules in matgl's order; only the halo
exchanges are added.

Conventions (matgl → distmlip):

- matgl's ``edge_index`` is ``[centre; neighbour]`` and messages are summed onto the centre
  (``edge_index[0]``); its bond vector is ``pos[neighbour] + image shift - pos[centre]``. distmlip's
  receiver is that centre, its sender the neighbour, so the adapter passes ``edge_index.flip(0)``
  and distmlip's ``edge_vec`` unchanged (``pos[sender] - pos[receiver] + shift @ cell``).
- Atomic numbers become matgl's node types through ``model.element_types``.
- ``Potential`` adds ``data_std * E + data_mean`` per structure and per-element references
  (``element_refs``) per atom. Per-atom energies here are ``data_std * eps_i + ref(Z_i) +
  data_mean / N`` (``N`` the whole system's atoms, from ``LocalGraph.num_system_atoms``), which
  sum to matgl's total.

Halo exchanges: TensorNet's embedding already sums over neighbours (``TensorEmbedding`` builds
each atom's tensor from its edges), so the halo rows are stale *before* the first interaction:
the adapter exchanges the node tensors ``X`` (``(n, units, 3, 3)``) before every interaction
(``nblocks`` exchanges) and declares ``num_layers = nblocks + 1`` hops. The embedding and the
interactions are matgl's modules, called whole: their node-wise work on halo rows is done and
then overwritten (the readout runs on the needed rows only).

Not supported (a ``ValueError`` says so): matgl's Warp kernels (build the model with
``use_warp=False``; the adapter accepts a Warp-built model by rebuilding it without Warp, same
weights), intensive (per-structure) targets, multi-state element references and the ZBL
repulsion (``calc_repuls=True``).
"""

from __future__ import annotations

import copy

import torch

from ._adapter import ElementTable, optional_import
from .base import DistributableModel, LocalGraph

__all__ = ["PACKAGES", "PRETRAINED", "TensorNetModel", "load", "supports", "wrap"]

PACKAGES = ("matgl",)
PRETRAINED: dict[str, str] = {}  # matgl's pretrained weights download at run time


def _matgl():
    optional_import("matgl", "matgl", "wrap matgl models")
    pes = optional_import("matgl.apps.pes", "matgl", "wrap matgl models")
    models = optional_import("matgl.models", "matgl", "wrap matgl models")
    return pes.Potential, models.TensorNet


def supports(obj) -> bool:
    """Whether ``obj`` is a matgl ``Potential`` holding a ``TensorNet``, or a ``TensorNet``."""
    if type(obj).__module__.split(".")[0] not in PACKAGES:
        return False
    try:
        potential_cls, tensornet_cls = _matgl()
    except ImportError:
        return False
    inner = obj.model if isinstance(obj, potential_cls) else obj
    return isinstance(inner, tensornet_cls)


def _detached_copy(module):
    """A deep copy of ``module`` without the intermediate features matgl models keep from their
    last call (``feature_dict``: non-leaf tensors, which ``copy.deepcopy`` refuses)."""
    saved = {sub: sub.__dict__.pop("feature_dict") for sub in module.modules()
             if "feature_dict" in sub.__dict__}
    try:
        return copy.deepcopy(module)
    finally:
        for sub, value in saved.items():
            sub.feature_dict = value


def _without_warp(model):
    """``model`` with matgl's plain PyTorch layers (same weights) if it was built with Warp.

    The Warp embedding holds the three distance projections as one ``distance_proj``
    (``3 * units`` outputs, in the order 1, 2, 3); the interaction layers have the same
    parameters in both."""
    if not getattr(model, "_use_warp", False):
        return model
    from matgl.layers._embedding import TensorEmbedding
    from matgl.layers._graph_convolution import TensorNetInteraction

    plain = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    emb = model.tensor_embedding
    state = dict(emb.state_dict())
    weight, bias = state.pop("distance_proj.weight"), state.pop("distance_proj.bias")
    for i, (w, b) in enumerate(zip(weight.chunk(3, 0), bias.chunk(3, 0)), start=1):
        state[f"distance_proj{i}.weight"], state[f"distance_proj{i}.bias"] = w, b
    new_emb = TensorEmbedding(emb.units, emb.distance_proj.in_features, model.activation,
                              emb.emb.num_embeddings, emb.cutoff, dtype=dtype)
    new_emb.load_state_dict(state)
    new_layers = torch.nn.ModuleList(
        TensorNetInteraction(layer.num_rbf, layer.units, model.activation, layer.cutoff,
                             layer.equivariance_invariance_group, dtype=dtype)
        for layer in model.layers)
    new_layers.load_state_dict(model.layers.state_dict())
    plain.tensor_embedding = new_emb
    plain.layers = new_layers
    plain._use_warp = False
    return plain


class TensorNetModel(DistributableModel):
    """A matgl ``TensorNet`` (or a ``Potential`` holding one), split exactly.

    Args:
        module: a ``matgl.apps.pes.Potential`` whose ``model`` is a ``TensorNet``, or a
            ``TensorNet`` (energy in its own units: no scale, shift or references).

    Attributes:
        module: a copy of the wrapped ``Potential`` or ``TensorNet`` (evaluated through its
            submodules).
        cutoff: ``model.cutoff``; ``num_layers``: ``nblocks + 1`` (the embedding is a hop).
    """

    def __init__(self, module):
        super().__init__()
        potential_cls, tensornet_cls = _matgl()
        potential = module if isinstance(module, potential_cls) else None
        model = potential.model if potential is not None else module
        if not isinstance(model, tensornet_cls):
            raise TypeError(f"module: expected a matgl TensorNet or a Potential holding one, got "
                            f"{type(model).__module__}.{type(model).__name__}")
        if model.is_intensive:
            raise ValueError(
                "module: expected a TensorNet energy model (is_intensive=False: a sum of per-atom "
                "energies), got is_intensive=True (a per-structure property); build it with "
                "is_intensive=False")
        if potential is not None:
            if potential.calc_repuls:
                raise ValueError("module: expected a Potential with calc_repuls=False, got "
                                 "calc_repuls=True (the ZBL repulsion is not supported yet)")
            refs = potential.element_refs
            if refs is not None and refs.property_offset.ndim > 1:
                raise ValueError("module: expected per-element references of one state, got "
                                 f"shape {tuple(refs.property_offset.shape)}")
        self.module = _detached_copy(module)  # the caller's module is not modified
        model = self.module.model if potential is not None else self.module
        self._tensornet = _without_warp(model)
        from ase.data import atomic_numbers

        self.elements = ElementTable([atomic_numbers[s] for s in model.element_types], "TensorNet")
        self.cutoff = float(model.cutoff)
        self.num_layers = len(model.layers) + 1
        dtype = next(model.parameters()).dtype
        if potential is not None:
            std, mean = potential.data_std.detach(), potential.data_mean.detach()
            refs = potential.element_refs
            offset = refs.property_offset.detach() if refs is not None else None
        else:
            std, mean, offset = torch.tensor(1.0), torch.tensor(0.0), None
        if offset is None:
            offset = torch.zeros(len(model.element_types))
        self.register_buffer("data_std", std.to(dtype).reshape(()))
        self.register_buffer("data_mean", mean.to(dtype).reshape(()))
        self.register_buffer("element_refs", offset.to(dtype).reshape(-1))

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        from matgl.utils.maths import decompose_tensor, tensor_norm

        m = self._tensornet
        needed = graph.num_needed
        types = self.elements(graph.numbers)
        edge_index = graph.edge_index.flip(0)  # matgl: [centre (receiver); neighbour (sender)]
        vec = graph.edge_vec
        dist = torch.norm(vec, dim=1)
        edge_attr = m.bond_expansion(dist)
        X, _ = m.tensor_embedding(types, edge_index, edge_attr, dist, vec, None)
        for layer in m.layers:
            X = graph.halo_exchange(X[:needed])  # the embedding and every layer sum over edges
            X = layer(edge_index, dist, edge_attr, X)
        scalars, skew, traceless = decompose_tensor(X[:needed])
        x = torch.cat((tensor_norm(scalars), tensor_norm(skew), tensor_norm(traceless)), dim=-1)
        x = m.linear(m.out_norm(x))
        eps = m.final_layer(x).view(-1)
        share = self.data_mean / max(graph.num_system_atoms, 1)
        return self.data_std * eps + self.element_refs[types[:needed]] + share


def wrap(obj, **options) -> TensorNetModel:
    if options:
        raise TypeError(f"options: expected none for matgl models, got {sorted(options)}")
    return TensorNetModel(obj)


def load(name: str, **options):
    raise ValueError(f"name: expected a pretrained model shipped in an installed package, got "
                     f"{name!r}: matgl's weights download at run time; build the model and wrap it")
