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

Layer protocol (bounded memory, see ``DistributableModel``): one step per block, state
``(bond, atom)``. The bond features are an edge entry (part-local): a bond is received by its
centre, an owned atom in halo mode, and its update reads the three-body terms at that centre (the
part's own bonds, the atom gate of the centre) and the atom features of both ends, which are
exchanged; so every bond of a part is exact without exchanging bond features. The atom features
are exchanged between steps, as ``forward`` does before every block after the first.

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

    def _geometry(self, graph: LocalGraph) -> dict:
        """What every block reads from the edge vectors: MatterSim's bonds, their radial basis
        (``edge_zero``), the triplets and their spherical basis."""
        m = self.module
        edge_index = graph.edge_index.flip(0)  # MatterSim: [centre (receiver); neighbour (sender)]
        vec = -graph.edge_vec  # MatterSim: pos[centre] - pos[neighbour image]
        length = torch.linalg.norm(vec, dim=1)
        ij, ik = triplets(edge_index[0], length <= self.threebody_cutoff)
        cos = torch.sum(vec[ij] * vec[ik], dim=1) / (length[ij] * length[ik])
        cos = torch.clamp(cos, min=-1.0 + 1e-7, max=1.0 - 1e-7)
        num_bonds = edge_index.shape[1]
        return {"edge_index": edge_index, "edge_zero": m.rbf(length),
                "basis": m.sbf(length[ik], torch.acos(cos)),
                "three": torch.stack([ij, ik], dim=1), "length": length.unsqueeze(-1),
                "num_bonds": torch.tensor([num_bonds], device=vec.device),
                "num_triple_ij": torch.bincount(ij, minlength=num_bonds).unsqueeze(-1), "ij": ij}

    def _atoms(self, graph: LocalGraph) -> torch.Tensor:
        """The atom embedding of every row."""
        m = self.module
        # MatterSim's one_hot_atoms casts to float32: the same one-hot, in the run's dtype
        one_hot = torch.nn.functional.one_hot(self.elements(graph.numbers), num_classes=m.max_z + 1)
        return m.atom_embedding(one_hot.to(graph.edge_vec.dtype))

    def _run_block(self, i: int, graph: LocalGraph, g: dict, atom, edge):
        return self._block(self.module.graph_conv[i], graph.num_needed, atom, edge, g["edge_zero"],
                           g["edge_index"], g["basis"], g["three"], g["length"], g["num_bonds"],
                           g["num_triple_ij"], g["ij"])

    def _readout(self, graph: LocalGraph, atom: torch.Tensor) -> torch.Tensor:
        m = self.module
        needed = graph.num_needed
        energies = m.final(atom[:needed]).view(-1)
        return m.normalizer(energies, self.elements(graph.numbers[:needed]))

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        g = self._geometry(graph)
        atom = self._atoms(graph)
        edge = self.module.edge_encoder(g["edge_zero"])
        for i in range(self.num_layers):
            if i > 0:
                atom = graph.halo_exchange(atom[: graph.num_needed])
            atom, edge = self._run_block(i, graph, g, atom, edge)
        return self._readout(graph, atom)

    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps (see ``DistributableModel``): state
    # ``(bond, atom)``, the bond features of the part's edges (an edge entry: part-local, see the
    # module docstring) and the atom features (exchanged before every step after the first, as
    # ``forward`` exchanges them before every block after the first). Step ``i`` is block ``i``.

    #: Layer protocol: the atom features are read on halo rows; the bond features are per edge.
    exchanged = (1,)
    edge_entries = (0,)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """Bond features (every edge: the encoded radial basis), atom features (every row)."""
        m = self.module
        vec = graph.edge_vec
        return m.edge_encoder(m.rbf(torch.linalg.norm(vec, dim=1))), self._atoms(graph)

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Block ``i``: every bond of the part and the atom features of rows ``:num_needed``."""
        edge, atom = state
        atom, edge = self._run_block(i, graph, self._geometry(graph), atom, edge)
        return edge, atom

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout and per-element scaling of rows ``:num_needed``."""
        return self._readout(graph, state[1])

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
