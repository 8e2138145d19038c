"""fairchem's eSCN-MD (UMA) models as a ``DistributableModel``.

``distmlip.wrap(model, task="omat")`` accepts a ``fairchem.core.models.base.HydraModelV2`` whose
backbone is an ``eSCNMDBackbone`` (UMA's architecture; fairchem's inference with merged experts
gives this too) and whose heads include an energy (or energy/forces/stress) head
(``MLP_EFS_Head`` / ``MLP_Energy_Head`` with ``reduce="sum"``). The adapter runs the backbone's
own modules in the backbone's order; only the halo exchanges are added.

Conventions (fairchem → distmlip): fairchem's ``edge_index`` is ``[source; target]``, messages are
summed onto the target (``edge_index[1]``) and its edge vector is ``pos[source] - pos[target] +
offsets @ cell``: exactly distmlip's ``edge_index`` and ``edge_vec``.

Halo exchanges: the edge-degree embedding already sums over each atom's edges, so the node
embedding ``x`` (``(n, (lmax+1)^2, C)``) is exchanged before every block (``num_layers`` blocks, a
receptive field of ``num_layers + 1`` hops). The blocks' node-wise work on halo rows is done and
overwritten; the final norm and the energy head run on the needed rows only.

The task (``task=``: the dataset embedding, e.g. ``"omat"``, ``"omol"``), total ``charge`` and
``spin`` are options of ``wrap``: they are per system, the same for every part.

Not supported (``ValueError``): the mixture-of-experts backbone with unmerged experts
(``eSCNMDMoeBackbone`` with ``num_experts > 0``), charge/spin-balanced channels, direct force
heads, ``reduce="mean"`` energy heads; element references applied outside the model (fairchem's
predict unit) are not included.
"""

from __future__ import annotations

import copy

import torch

from ._adapter import optional_import
from .base import DistributableModel, LocalGraph

__all__ = ["PACKAGES", "PRETRAINED", "UMAModel", "load", "supports", "wrap"]

PACKAGES = ("fairchem",)
PRETRAINED: dict[str, str] = {}  # UMA's weights download at run time (and are gated)


def _fairchem():
    what = "wrap fairchem UMA models"
    base = optional_import("fairchem.core.models.base", "fairchem", what)
    escn = optional_import("fairchem.core.models.uma.escn_md", "fairchem", what)
    return base.HydraModelV2, escn.eSCNMDBackbone


def supports(obj) -> bool:
    """Whether ``obj`` is a ``HydraModelV2`` with an eSCN-MD backbone."""
    if type(obj).__module__.split(".")[0] not in PACKAGES:
        return False
    try:
        hydra, backbone = _fairchem()
    except ImportError:
        return False
    return isinstance(obj, hydra) and isinstance(obj.backbone, backbone)


class UMAModel(DistributableModel):
    """A fairchem ``HydraModelV2`` with an eSCN-MD backbone, split exactly.

    Args:
        module: the ``HydraModelV2``.
        task: the dataset (task) embedding to use, e.g. ``"omat"`` (default: the only one if the
            model has one).
        charge, spin: the system's total charge and spin multiplicity (fairchem's defaults 0, 0).

    Attributes:
        module: a copy of the model; ``cutoff``: the backbone's; ``num_layers``: blocks + 1.
    """

    def __init__(self, module, *, task: str | None = None, charge: int = 0, spin: int = 0):
        super().__init__()
        hydra_cls, backbone_cls = _fairchem()
        if not (isinstance(module, hydra_cls) and isinstance(module.backbone, backbone_cls)):
            raise TypeError(f"module: expected a fairchem HydraModelV2 with an eSCN-MD backbone, "
                            f"got {type(module).__module__}.{type(module).__name__}")
        bb = module.backbone
        if getattr(bb, "num_experts", 0) > 0:
            raise ValueError(
                f"module: expected an eSCN-MD backbone without unmerged experts, got "
                f"{type(bb).__name__} with num_experts={bb.num_experts}; merge the experts for "
                f"the system's composition first (fairchem's inference setting merge_mole=True)")
        if bb.charge_channel_end > bb.charge_channel_start or bb.spin_channel_end > bb.spin_channel_start:
            raise ValueError("module: expected no charge/spin-balanced channels, got some "
                             "(a system-wide balance, not supported yet)")
        if bb.regress_config.direct_forces:
            raise ValueError("module: expected forces from the energy's gradient, got "
                             "direct_forces=True (a direct force head)")
        heads = [h for h in module.output_heads.values() if hasattr(h, "energy_block")]
        if len(heads) != 1:
            raise ValueError(f"module: expected one energy head (MLP_EFS_Head / MLP_Energy_Head), "
                             f"got {len(heads)} among {list(module.output_heads)}")
        if heads[0].reduce != "sum":
            raise ValueError(f"module: expected an energy head with reduce='sum', got "
                             f"{heads[0].reduce!r}")
        names = sorted(getattr(bb, "dataset_mapping", None) or {})
        if bb.use_dataset_embedding:
            if task is None and len(names) == 1:
                task = names[0]
            if task not in names:
                raise ValueError(f"task: expected one of {names}, got {task!r}")
        self.module = copy.deepcopy(module)  # the caller's module is not modified
        self.task = task
        self.charge, self.spin = int(charge), int(spin)
        self.cutoff = float(bb.cutoff)
        self.num_layers = len(bb.blocks) + 1

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        bb = self.module.backbone
        head = next(h for h in self.module.output_heads.values() if hasattr(h, "energy_block"))
        n, needed = graph.num_nodes, graph.num_needed
        vec = graph.edge_vec
        device, dtype = vec.device, vec.dtype
        charge = torch.tensor([self.charge], device=device, dtype=torch.long)
        spin = torch.tensor([self.spin], device=device, dtype=torch.long)
        csd = bb.csd_embedding(charge=charge, spin=spin, dataset=[self.task])
        width = (bb.sph_feature_size, bb.sphere_channels)
        if n == 0:  # an empty part: fairchem's layers need an edge; just meet the others
            x = torch.zeros((0, *width), dtype=dtype, device=device)
            for _ in bb.blocks:
                x = graph.halo_exchange(x)
            return torch.zeros(0, dtype=dtype, device=device)
        numbers = graph.numbers
        edge_index = graph.edge_index
        if edge_index.shape[1] == 0:  # fairchem's own fix-up: one self-loop beyond the cutoff
            edge_index = torch.zeros((2, 1), dtype=torch.long, device=device)
            vec = vec.new_tensor([[bb.cutoff + 1.0, 0.0, 0.0]]) + 0.0 * vec.sum()
        dist = torch.linalg.norm(vec, dim=-1)
        wigner, wigner_inv = bb._get_rotmat_and_wigner(vec)
        coefficient_index = bb.coefficient_index if bb.mmax != bb.lmax else None
        wigner, wigner_inv = bb.backend.prepare_wigner(wigner, wigner_inv, bb.mappingReduced,
                                                       coefficient_index)
        x = torch.zeros((n, *width), dtype=dtype, device=device)
        sys_node_embedding = csd[torch.zeros(n, dtype=torch.long, device=device)]
        x[:, 0, :] = bb.sphere_embedding(numbers) + sys_node_embedding
        envelope = bb.envelope(dist / bb.cutoff).reshape(-1, 1)
        x_edge = torch.cat((bb.distance_expansion(dist), bb.source_embedding(numbers[edge_index[0]]),
                            bb.target_embedding(numbers[edge_index[1]])), dim=1)
        if wigner_inv.ndim == 3:
            envelope = envelope.unsqueeze(-1)
        wigner_inv_envelope = wigner_inv * envelope
        x = bb.edge_degree_embedding(x, x_edge, edge_index[1], wigner_inv_envelope)
        x_edge_per_layer = bb.backend.get_layer_radial_emb(x_edge, bb)
        for i, block in enumerate(bb.blocks):
            x = graph.halo_exchange(x[:needed])  # the embedding and every block sum over edges
            x = block(x, x_edge_per_layer[i], edge_index, wigner, wigner_inv_envelope,
                      total_atoms_across_gp_ranks=n, sys_node_embedding=sys_node_embedding,
                      scatter_target=edge_index[1], gp_ctx=None)
        x = bb.norm(x[:needed])
        return head.energy_block(x[:, 0, :]).view(-1)


def wrap(obj, *, task: str | None = None, charge: int = 0, spin: int = 0, **options) -> UMAModel:
    if options:
        raise TypeError(f"options: expected task, charge or spin for fairchem models, got "
                        f"{sorted(options)}")
    return UMAModel(obj, task=task, charge=charge, spin=spin)


def load(name: str, **options):
    raise ValueError(f"name: expected a pretrained model shipped in an installed package, got "
                     f"{name!r}: UMA's weights download at run time; build the model and wrap it")
