"""MatterSim (``mattersim``) M3GNet potentials as a ``DistributableModel``.

``distmlip.wrap`` accepts a ``mattersim.forcefield.potential.Potential`` holding an ``M3Gnet``, a
``MatterSimCalculator`` holding one, or the ``M3Gnet`` itself. The adapter calls MatterSim's own
modules (embeddings, bases, readout, per-element scaling) on a graph built from the
``LocalGraph``, and composes each ``MainBlock`` from its own sub-layers (``three_body``,
``gated_mlp_edge``/``edge_layer_edge``, ``gated_mlp_atom``/``edge_layer_atom``; same weights, same
operations in the same order) so that node-wise work runs on the first ``graph.num_needed`` rows
only (the owned rows in halo mode):

- the atom embedding (a linear map of the one-hot element) runs on every row: the first block
  reads neighbours' rows before any exchange;
- in a block, the three-body atom gate (``three_body.atom_mlp``) runs on the needed rows (it is
  read at bond centres only); the bond update and the atom messages are edge-wise and read both
  ends (halo rows exchanged); the messages are summed onto the needed rows, plus the residual;
- the readout and per-element scaling run on the needed rows.

Every bond a part holds is centred on a needed row, so every bond's features stay exact.

No layer protocol: the bond features are carried from block to block (per bond, not per row),
which the steps' state cannot hold; the bounded-memory mode uses the generic replay.

Conventions (MatterSim → distmlip):

- MatterSim's bonds are ``[centre; neighbour]`` with vector ``pos[centre] - pos[neighbour image]``;
  three-body terms couple bonds sharing a centre (both within ``threebody_cutoff``), and bond and
  atom updates are summed onto the centre. distmlip's receiver is the centre, its sender the
  neighbour: the adapter passes ``edge_index.flip(0)`` and ``-edge_vec``.
- A part holds every bond centred on its owned atoms, hence every triplet around them; the atom
  features are exchanged before every block after the first (the embedding is per element):
  ``num_layers = num_blocks``.
- The triplets are built here from the part's bonds (every ordered pair of distinct bonds of a
  centre within the three-body cutoff, as MatterSim's ``compute_threebody_indices``) and passed
  with their bond map, so no order of bonds is assumed.
- Per-atom energies are MatterSim's (its readout and per-element scale and shift are per atom).
"""

from __future__ import annotations

import torch

from ._adapter import ElementTable, no_pretrained_load, optional_import, supported, wrap_with
from .base import DistributableModel, LocalGraph

__all__ = ["MatterSimModel", "OPTIONS", "PACKAGES", "PRETRAINED", "load", "supports", "wrap"]

PACKAGES = ("mattersim",)
PRETRAINED: dict[str, str] = {}  # MatterSim's weights download at run time
OPTIONS: tuple[str, ...] = ()
_WHAT = "MatterSim models"


def _mattersim():
    what = "wrap MatterSim models"
    potential = optional_import("mattersim.forcefield.potential", "mattersim", what)
    m3gnet = optional_import("mattersim.forcefield.m3gnet.m3gnet", "mattersim", what)
    return potential.Potential, potential.MatterSimCalculator, m3gnet.M3Gnet


def _inner(obj):
    potential_cls, calculator_cls, m3gnet_cls = _mattersim()
    if isinstance(obj, calculator_cls):
        obj = obj.potential
    if isinstance(obj, potential_cls):
        obj = obj.model
    return obj if isinstance(obj, m3gnet_cls) else None


def supports(obj) -> bool:
    """Whether ``obj`` is a MatterSim ``M3Gnet``, a ``Potential`` or a ``MatterSimCalculator``
    holding one."""
    return supported(obj, PACKAGES, lambda o: _inner(o) is not None)


def triplets(centres: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(b, c)`` of distinct bonds with the same centre, both ``valid``.

    Returns ``(first, second)`` bond ids, grouped by ``first``."""
    bonds = torch.nonzero(valid).squeeze(1)
    if bonds.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=centres.device)
        return empty, empty
    order = torch.argsort(centres[bonds], stable=True)
    bonds = bonds[order]
    c = centres[bonds]
    counts = torch.bincount(c)
    starts = torch.cumsum(counts, 0) - counts
    start, size = starts[c], counts[c]
    pairs = size - 1  # partners of each bond
    first = torch.repeat_interleave(torch.arange(len(bonds), device=c.device), pairs)
    offset = torch.cumsum(pairs, 0) - pairs
    local = torch.arange(int(pairs.sum()), device=c.device) - torch.repeat_interleave(offset, pairs)
    mine = (torch.arange(len(bonds), device=c.device) - start)[first]
    second = start[first] + local + (local >= mine).long()
    return bonds[first], bonds[second]


class MatterSimModel(DistributableModel):
    """A MatterSim ``M3Gnet``, split exactly.

    Args:
        module: a MatterSim ``Potential`` or ``MatterSimCalculator`` holding an ``M3Gnet``, or the
            ``M3Gnet``.

    Attributes:
        module: the ``M3Gnet`` (held, not copied, and not modified; its submodules are evaluated).
        cutoff: its two-body cutoff; ``num_layers``: its number of blocks.
    """

    def __init__(self, module):
        super().__init__()
        model = _inner(module)
        if model is None:
            raise TypeError(f"module: expected a MatterSim M3Gnet, or a Potential or "
                            f"MatterSimCalculator holding one, got {type(module).__module__}."
                            f"{type(module).__name__}")
        self.module = model  # only read: held without copying
        # MatterSim's one-hot row of atomic number z is z
        self.elements = ElementTable({z: z for z in range(1, int(model.max_z) + 1)}, "MatterSim")
        self.cutoff = float(model.model_args["cutoff"])
        self.threebody_cutoff = float(model.model_args["threebody_cutoff"])
        self.num_layers = len(model.graph_conv)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        m = self.module
        needed = graph.num_needed
        numbers = self.elements(graph.numbers)
        edge_index = graph.edge_index.flip(0)  # MatterSim: [centre (receiver); neighbour (sender)]
        vec = -graph.edge_vec  # MatterSim: pos[centre] - pos[neighbour image]
        length = torch.linalg.norm(vec, dim=1)
        ij, ik = triplets(edge_index[0], length <= self.threebody_cutoff)
        cos = torch.sum(vec[ij] * vec[ik], dim=1) / (length[ij] * length[ik])
        cos = torch.clamp(cos, min=-1.0 + 1e-7, max=1.0 - 1e-7)
        num_bonds = edge_index.shape[1]
        three = torch.stack([ij, ik], dim=1)
        num_triple_ij = torch.bincount(ij, minlength=num_bonds).unsqueeze(-1)
        # MatterSim's one_hot_atoms casts to float32: the same one-hot, in the run's dtype
        one_hot = torch.nn.functional.one_hot(numbers, num_classes=m.max_z + 1).to(vec.dtype)
        atom = m.atom_embedding(one_hot)
        edge = m.rbf(length)
        edge_zero = edge
        edge = m.edge_encoder(edge)
        basis = m.sbf(length[ik], torch.acos(cos))
        length = length.unsqueeze(-1)
        num_bonds_t = torch.tensor([num_bonds], device=numbers.device)
        for i, conv in enumerate(m.graph_conv):
            if i > 0:
                atom = graph.halo_exchange(atom[:needed])
            atom, edge = self._block(conv, needed, atom, edge, edge_zero, edge_index, basis, three,
                                     length, num_bonds_t, num_triple_ij, ij)
        energies = m.final(atom[:needed]).view(-1)
        return m.normalizer(energies, numbers[:needed])

    @staticmethod
    def _block(conv, needed, atom, edge, edge_zero, edge_index, basis, three, length, num_bonds,
               num_triple_ij, ij):
        """MatterSim's ``MainBlock`` composed from its sub-layers, node-wise work on the first
        ``needed`` rows: the three-body atom gate (``three_body.atom_mlp``) reads only bond
        centres (rows ``:needed``), the bond and atom messages read both ends (every row) and the
        atom residual sums onto the centres. Returns the atom features of rows ``:needed`` and
        every bond's features."""
        centre, neighbour = edge_index
        edge = conv.three_body(edge, basis, atom[:needed], edge_index, three, length, num_bonds,
                               num_triple_ij.view(-1), total_num_bonds=edge.shape[0],
                               three_body_edge_map=ij)
        feat = torch.cat([atom[centre], atom[neighbour], edge], dim=1)
        edge = edge + conv.gated_mlp_edge(feat) * conv.edge_layer_edge(edge_zero)
        feat = torch.cat([atom[centre], atom[neighbour], edge], dim=1)
        message = conv.gated_mlp_atom(feat) * conv.edge_layer_atom(edge_zero)
        summed = torch.zeros((needed, message.shape[1]), dtype=message.dtype, device=message.device)
        summed = summed.scatter_add(0, centre.unsqueeze(1).expand_as(message), message)
        return atom[:needed] + summed, edge


#: ``MatterSimModel(obj)`` (no options); ``obj`` is held, not copied, and not modified
wrap = wrap_with(MatterSimModel, OPTIONS, _WHAT)
load = no_pretrained_load("MatterSim", OPTIONS, _WHAT)
