"""CHGNet (``chgnet``) adapter: ``load("chgnet-0.3.0")`` and ``wrap(<chgnet.model.CHGNet>)``.

CHGNet (Deng et al., Nat. Mach. Intell. 2023) reads two graphs: the atom graph (every pair closer
than ``atom_graph_cutoff``, 6 Å for 0.3.0) and the bond graph, whose nodes are the bonds shorter
than ``bond_graph_cutoff`` (3 Å) and whose edges are the angles between two such bonds meeting at
an atom. Its layer loop (``CHGNet._compute``) is, for ``l = 0 .. n_conv - 2``::

    A = AtomConv_l(A, B)                   # atom features from neighbours' atom + bond features
    B = BondConv_l(A, B, G)                # bond u: sum over the angles whose first bond is u,
                                           #   at BOTH ends of u (the two atoms u joins)
    G = AngleUpdate_l(A, B, G)             # angle at atom c: from c's two bonds and A[c]

then ``A = AtomConv_last(A, B)``, a layer norm and an MLP give each atom's energy; the
composition model (``AtomRef``, per-element reference energies: CHGNet's MPtrj offsets) adds one
constant per element. The per-atom energies returned here are exactly what
``CHGNetCalculator(return_site_energies=True)`` reports, and they sum to its total energy.

How it is evaluated on a ``LocalGraph``
---------------------------------------
Bond features live here on directed edges (edge ``e`` received by atom ``x`` from ``y`` stands
for CHGNet's undirected bond ``x-y``; its reverse edge, received by ``y``, carries the same
features). Angles are the ordered pairs of distinct short edges received by the same atom,
computed from ``graph.edge_vec`` (so are bond lengths and the 3 Å subset): positions enter only
through ``edge_vec``, which is how distmlip takes forces and stress.

The update of bond ``e = (x <- y)`` splits into the two ends: ``m_x(e)``, the sum over the angles
at ``x`` whose first bond is ``e``, and ``m_y(rev e)``, the same at ``y``. BondConv's output MLP
is linear, so ``B'(e) = B(e) + mlp_out(m_x(e) + m_y(rev e))`` (then CHGNet's optional norm) is
CHGNet's update up to summation order. ``m_x`` needs only ``x``'s own bonds, angles and atom
feature, so the worker owning ``x`` computes it exactly; the worker owning the other end gets it
through the halo exchange. For that, each atom's partial messages are packed into a node feature
of ``max_bonds`` slots, one per short bond it receives, and exchanged together with the atom
features after every AtomConv (``n_conv - 1`` exchanges in all). The first exchange also carries
each slot's edge vector, by which a worker finds, for each of its edges ``x <- y``, the slot of
``y`` holding the reverse edge (the one whose vector is ``-edge_vec``).

With that, halo mode needs only the one-hop halo: every edge is evaluated once
and angles only at owned atoms: zero redundancy, no halo angles. Node work is not repeated
either: every atom convolution sums its messages into, and updates (output MLP, residual, norm),
only the first ``graph.num_needed`` rows (the owned rows in halo mode: every edge is received by
one), the packed partial messages are built for those rows, the exchange receives them and
returns every row, and the readout (norm, MLP, composition model) runs on them only. The atom
convolution's update is therefore written out here (``_atom_conv``) with CHGNet's own submodules
and ``aggregate``; with every row needed it is CHGNet's ``AtomConv`` itself.

Extended mode (no exchange) needs ``num_layers = n_conv`` hops: per layer, atom features and bond
features each lose one hop of exactness at the halo's edge (a bond ``x <- y`` needs ``y``'s bonds,
and ``y`` is one hop further out), so after ``n_conv - 1`` bond updates and ``n_conv`` atom
convolutions the owned atoms are exact when the halo is ``n_conv`` hops deep, and not with fewer.

``max_bonds`` must be the same on every worker (it fixes the width of the exchanged features);
an atom receiving more short bonds raises ``ValueError`` naming the option to raise.

Layer protocol (bounded memory, see ``DistributableModel``): the same layers as steps, bond and
angle features as part-local edge entries of the state, the atom features, packed partial
messages and slot keys exchanged between steps (see ``CHGNetModel.step``). A CHGNet without a
bond update (``update_bond=False``) has no steps and keeps the generic replay.

Known difference: if a structure has no bond shorter than ``bond_graph_cutoff`` at all, CHGNet
skips the bond update entirely, while this adapter (which cannot know that globally) applies it
with zero messages. For 0.3.0 and r2SCAN this changes nothing (the output MLP has no bias and
there is no bond norm); for 0.2.0, whose output MLP has a bias, such structures differ.
"""

from __future__ import annotations

import contextlib
import io

import torch

from ._adapter import ElementTable, check_options, optional_import, supported
from .base import DistributableModel, LocalGraph

__all__ = ["OPTIONS", "PACKAGES", "PRETRAINED", "CHGNetModel", "load", "supports", "wrap"]

PACKAGES = ("chgnet",)
OPTIONS = ("max_bonds",)
_WHAT = "CHGNet models"


# distmlip name -> (CHGNet.load's model_name, description). All three checkpoints ship inside the
# chgnet wheel (chgnet/pretrained); nothing is downloaded.
_CHECKPOINTS = {
    "chgnet-0.3.0": ("0.3.0", "CHGNet 0.3.0, MPtrj PBE(+U) with MP2020-style corrections, 6 Å atom "
                              "graph + 3 Å bond graph, 4 layers (chgnet)"),
    "chgnet-0.2.0": ("0.2.0", "CHGNet 0.2.0 (deprecated MPtrj version), 5 Å atom graph + 3 Å bond "
                              "graph, 4 layers (chgnet)"),
    "chgnet-r2scan": ("r2scan", "CHGNet r2SCAN, transfer-learned on MP r2SCAN, 6 Å + 3 Å, 4 layers "
                                "(chgnet)"),
}
PRETRAINED = {name: desc for name, (_, desc) in _CHECKPOINTS.items()}

# Two different periodic images seen from one atom are at least an interatomic distance apart;
# the vector of an edge and minus that of its reverse agree to rounding. Anything in between is
# a safe threshold for recognising the reverse edge.
_MATCH_TOL = 1e-3  # Å
_EMPTY_SLOT = 1.0e6  # Å, edge vector stored in unused slots (never matches)


def _chgnet_class():
    return optional_import("chgnet.model.model", "chgnet", "wrap or load CHGNet models").CHGNet


def supports(obj) -> bool:
    """Whether ``obj`` is a ``chgnet.model.CHGNet``."""
    return supported(obj, PACKAGES, lambda o: isinstance(o, _chgnet_class()))


def wrap(obj, **options) -> CHGNetModel:
    """``CHGNetModel(obj, **options)`` (options: ``max_bonds``); ``obj`` (a ``chgnet.model.CHGNet``)
    is held, not copied, and not modified."""
    check_options(options, OPTIONS, _WHAT)
    if not supports(obj):
        raise TypeError(f"obj: expected a chgnet.model.CHGNet, got {type(obj).__module__}."
                        f"{type(obj).__name__}")
    return CHGNetModel(obj, **options)


def load(name: str, **options) -> CHGNetModel:
    """A pretrained CHGNet shipped in the chgnet wheel, by distmlip name (see ``PRETRAINED``)."""
    check_options(options, OPTIONS, _WHAT)
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    key = name.lower()
    if key not in _CHECKPOINTS:
        raise ValueError(f"name: expected one of {sorted(_CHECKPOINTS)}, got {name!r}")
    chgnet_cls = _chgnet_class()
    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
        model = chgnet_cls.load(model_name=_CHECKPOINTS[key][0], use_device="cpu", verbose=False)
    return CHGNetModel(model, **options)


class CHGNetModel(DistributableModel):
    """A ``chgnet.model.CHGNet`` as a ``DistributableModel`` (see the module docstring).

    Args:
        module: the CHGNet module (held as ``module``, not copied and not modified; its weights
            are used as they are, in its dtype, float32 for the pretrained models).
        max_bonds: slots per atom for the exchanged bond messages: the largest number of bonds
            shorter than the bond-graph cutoff (3 Å) any atom may have. Every worker must use the
            same value. 64 leaves room beyond dense metals (14 in bcc Fe) and the 32-hydrogen cage
            of superhydrides such as LaH10; the exchanged features grow with it (64 x 64 floats
            per halo atom and layer).

    Attributes: ``cutoff`` (atom graph, Å), ``bond_cutoff`` (bond graph, Å), ``num_layers``
    (``n_conv``).
    """

    def __init__(self, module, *, max_bonds: int = 64):
        super().__init__()
        chgnet_cls = _chgnet_class()
        if not isinstance(module, chgnet_cls):
            raise TypeError(f"module: expected a chgnet.model.CHGNet, got {type(module).__name__}")
        if isinstance(max_bonds, bool) or not isinstance(max_bonds, int) or max_bonds < 1:
            raise ValueError(f"max_bonds: expected an integer >= 1, got {max_bonds!r}")
        if not module.mlp_first:
            raise ValueError(
                "module: expected a CHGNet with mlp_first=True (per-atom energies, as in every "
                "pretrained CHGNet), got mlp_first=False: its energy is not a sum over atoms, so it "
                "cannot be split"
            )
        comp = module.composition_model
        if comp is not None and not (hasattr(comp, "fc") and hasattr(comp, "get_site_energies")
                                     and getattr(comp.fc, "bias", None) is None):
            raise ValueError(
                f"module: expected composition_model None or an AtomRef (per-element reference "
                f"energies), got {type(comp).__name__}, which does not give per-atom energies"
            )
        if len(module.atom_conv_layers) != module.n_conv:
            raise ValueError(f"module: expected {module.n_conv} atom convolutions, got "
                             f"{len(module.atom_conv_layers)}")
        converter = module.graph_converter
        self.module = module
        self.cutoff = float(converter.atom_graph_cutoff)
        self.bond_cutoff = float(converter.bond_graph_cutoff)
        self.num_layers = int(module.n_conv)
        self.max_bonds = int(max_bonds)
        # CHGNet's embedding row of atomic number z is z - 1
        self.elements = ElementTable({z: z - 1 for z in
                                      range(1, module.atom_embedding.embedding.num_embeddings + 1)},
                                     "CHGNet")
        if any(layer is None for layer in module.bond_conv_layers):
            self.exchanged = None  # no bond update (update_bond=False): no steps, the generic replay

    def extra_repr(self) -> str:
        return (f"cutoff={self.cutoff}, bond_cutoff={self.bond_cutoff}, "
                f"num_layers={self.num_layers}, max_bonds={self.max_bonds}")

    # ------------------------------------------------------------------ the bond graph
    def _bond_graph(self, graph: LocalGraph, r: torch.Tensor):
        """Short edges, their slot at their receiver, and the angles between them."""
        n = graph.num_nodes
        device = r.device
        short = torch.nonzero(r < self.bond_cutoff).reshape(-1)
        s_recv = graph.edge_index[1][short]
        counts = torch.bincount(s_recv, minlength=n)
        if counts.numel() and int(counts.max()) > self.max_bonds:
            worst = int(torch.argmax(counts))
            raise ValueError(
                f"max_bonds: atom {int(graph.atom_ids[worst])} has {int(counts[worst])} bonds "
                f"shorter than the bond-graph cutoff ({self.bond_cutoff} Å), more than "
                f"max_bonds={self.max_bonds}; wrap the model with a larger max_bonds, e.g. "
                f"distmlip.wrap(chgnet, max_bonds={2 * int(counts[worst])})"
            )
        order = torch.argsort(s_recv, stable=True)  # short-edge positions grouped by receiver
        starts = torch.cumsum(counts, 0) - counts
        s_count = len(short)
        slot = torch.empty(s_count, dtype=torch.int64, device=device)
        slot[order] = torch.arange(s_count, device=device) - starts[s_recv[order]]
        # angles: ordered pairs (p, q), p != q, of short edges received by the same atom
        size = counts[s_recv[order]]
        first = torch.repeat_interleave(torch.arange(s_count, device=device), size)
        offset = torch.arange(len(first), device=device) - torch.repeat_interleave(
            torch.cumsum(size, 0) - size, size)
        second = starts[s_recv[order]][first] + offset
        keep = second != first
        e1, e2 = order[first[keep]], order[second[keep]]
        return short, s_recv, slot, e1, e2

    @staticmethod
    def _match_reverse(keys, s_send, s_vec):
        """For every short edge x <- y: the slot of y whose stored vector is minus this edge's
        (and whether there is one)."""
        cand = keys[s_send]  # (S, K, 3)
        dev = (cand + s_vec.detach().unsqueeze(1)).abs().amax(dim=-1)
        if dev.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=keys.device)
            return empty, torch.zeros(0, dtype=torch.bool, device=keys.device)
        best_dev, best = dev.min(dim=1)
        return best, best_dev < _MATCH_TOL

    @staticmethod
    def _atom_conv(layer, atom, bond, weight, atom_graph, directed, rows: int):
        """CHGNet's ``AtomConv`` (chgnet/model/layers.py) updating only the first ``rows`` atoms
        (every edge's centre, ``atom_graph[:, 0]``, must be one of them); ``atom`` holds every
        row (the neighbours' features are read)."""
        if rows == len(atom):
            return layer(atom_feas=atom, bond_feas=bond, bond_weights=weight, atom_graph=atom_graph,
                         directed2undirected=directed)
        from chgnet.model.functions import aggregate

        center = torch.index_select(atom, 0, atom_graph[:, 0])
        neighbour = torch.index_select(atom, 0, atom_graph[:, 1])
        messages = layer.twoBody_atom(torch.cat([center, torch.index_select(bond, 0, directed),
                                                 neighbour], dim=1))
        messages = messages * torch.index_select(weight, 0, directed)
        new = aggregate(messages, atom_graph[:, 0], average=False, num_owner=rows)
        if layer.use_mlp_out:
            new = layer.mlp_out(new)
        if layer.resnet:
            new = new + atom[:rows]
        if layer.atom_norm is not None:
            new = layer.atom_norm(new)
        return new

    # ------------------------------------------------------------------ forward
    def forward(self, graph: LocalGraph) -> torch.Tensor:
        c = self.module
        n = graph.num_nodes
        k_slots = self.max_bonds
        send, recv = graph.edge_index[0], graph.edge_index[1]
        vec = graph.edge_vec
        r = torch.linalg.vector_norm(vec, dim=-1)
        num_edges = len(r)
        # rows whose atom updates and readout are needed (the owned rows in halo mode); every row
        # if nothing refreshes the halo (a graph given the no-op exchange)
        needed = graph.num_needed

        # embeddings (CHGNet._compute / BatchedGraph.from_graphs, with bonds per directed edge)
        types = self.elements(graph.numbers)
        atom = c.atom_embedding(types)
        rbf_ag = c.bond_basis_expansion.rbf_expansion_ag(r)
        bond = c.bond_embedding(rbf_ag)
        weight_ag = c.bond_weights_ag(rbf_ag)
        atom_graph = torch.stack([recv, send], dim=1)  # CHGNet: [center, neighbour]
        directed = torch.arange(num_edges, device=vec.device)

        short, s_recv, slot, e1, e2 = self._bond_graph(graph, r)
        s_send = send[short]
        s_vec = vec[short]
        s_r = r[short]
        weight_bg = c.bond_weights_bg(c.bond_basis_expansion.rbf_expansion_bg(s_r))
        unit = -s_vec / s_r.unsqueeze(-1)  # CHGNet's bond vectors point centre -> neighbour's image
        angle_graph = torch.stack([s_recv[e1], e1, e2], dim=1)  # [centre, first bond, second bond]
        angle = c.angle_embedding(c.angle_basis_expansion(unit[e1], unit[e2])) if len(e1) else None

        width = atom.shape[1]
        keys = torch.full((needed, k_slots, 3), _EMPTY_SLOT, dtype=vec.dtype, device=vec.device)
        keys[s_recv, slot] = s_vec.detach()
        reverse = found = None

        for idx in range(self.num_layers - 1):
            # the needed rows, then (exchange) every row
            atom = self._atom_conv(c.atom_conv_layers[idx], atom, bond, weight_ag, atom_graph,
                                   directed, needed)
            bond_layer = c.bond_conv_layers[idx]
            if bond_layer is None:
                atom = graph.halo_exchange(atom)
                continue
            s_bond = bond[short]
            if angle is not None:
                total = torch.cat([s_bond[e1], s_bond[e2], angle, atom[angle_graph[:, 0]]], dim=1)
                update = bond_layer.twoBody_bond(total) * weight_bg[e1] * weight_bg[e2]
                partial = update.new_zeros(len(short), update.shape[1]).index_add(0, e1, update)
            else:
                partial = bond.new_zeros(len(short), bond.shape[1])
            bond_width = partial.shape[1]
            packed = partial.new_zeros(needed, k_slots, bond_width).index_put((s_recv, slot), partial)
            pieces = [atom, packed.reshape(needed, k_slots * bond_width)]
            if reverse is None:
                pieces.append(keys.reshape(needed, k_slots * 3))
            mixed = graph.halo_exchange(torch.cat(pieces, dim=1))
            atom = mixed[:, :width]
            packed = mixed[:, width: width + k_slots * bond_width].reshape(n, k_slots, bond_width)
            if reverse is None:
                keys = mixed[:, width + k_slots * bond_width:].reshape(n, k_slots, 3).detach()
                reverse, found = self._match_reverse(keys, s_send, s_vec)
                missing = ~found & graph.owned_mask[s_recv]
                if bool(missing.any()):
                    i = int(torch.nonzero(missing)[0])
                    raise RuntimeError(
                        f"CHGNet bond graph: the reverse of the edge {int(graph.atom_ids[s_recv[i]])}"
                        f" <- {int(graph.atom_ids[s_send[i]])} (vector "
                        f"{s_vec[i].tolist()}) was not found among the neighbour's bonds; the halo "
                        f"exchange or the neighbour graph is inconsistent"
                    )
            other = packed[s_send, reverse] * found.unsqueeze(-1).to(packed.dtype)
            messages = bond.new_zeros(num_edges, bond_width).index_copy(0, short, partial + other)
            new_bond = bond_layer.mlp_out(messages) if bond_layer.use_mlp_out else messages
            if bond_layer.resnet:
                new_bond = new_bond + bond
            if bond_layer.bond_norm is not None:
                new_bond = bond_layer.bond_norm(new_bond)
            bond = new_bond
            angle_layer = c.angle_layers[idx]
            if angle_layer is not None and angle is not None:
                angle = angle_layer(atom_feas=atom, bond_feas=bond[short], angle_feas=angle,
                                    bond_graph=angle_graph)

        atom = self._atom_conv(c.atom_conv_layers[-1], atom, bond, weight_ag, atom_graph, directed,
                               needed)
        if c.readout_norm is not None:
            atom = c.readout_norm(atom)
        energies = c.mlp(atom).squeeze(-1)
        if c.composition_model is not None:
            energies = energies + c.composition_model.fc.weight[0, types[:needed]]
        return energies

    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps (see ``DistributableModel``). State
    # ``(bond, angle, atom, packed, keys)``: the bond features of the part's edges and the angle
    # features of its angles (edge entries: part-local, since every edge of a part is received by
    # an owned atom and its angles are the pairs of edges received by one atom), and, on every row
    # (exchanged), the atom features, each atom's packed partial bond messages (its ``max_bonds``
    # slots) and its slots' edge vectors (by which a part finds the reverse of each edge among
    # the sender's slots). Step ``i`` finishes layer ``i - 1``'s bond update (own partial message
    # from the owned rows of ``packed``, the other end's from the sender's row) and angle update,
    # then runs atom convolution ``i`` and, but in the last step, layer ``i``'s partial bond
    # messages; ``embed`` is the three embeddings, ``energies`` the readout. ``forward``'s
    # exchanges are the same rows (its first also carries the keys, the later ones not).

    #: Layer protocol: atom features, packed partial bond messages and slot keys are read on halo
    #: rows; bond features (per edge) and angle features (per angle) are part-local.
    exchanged = (2, 3, 4)
    edge_entries = (0, 1)

    def _geometry(self, graph: LocalGraph) -> dict:
        """What every step recomputes from the edge vectors: radial weights, the bond graph, the
        angles' centres."""
        c = self.module
        vec = graph.edge_vec
        r = torch.linalg.vector_norm(vec, dim=-1)
        rbf_ag = c.bond_basis_expansion.rbf_expansion_ag(r)
        short, s_recv, slot, e1, e2 = self._bond_graph(graph, r)
        s_vec, s_r = vec[short], r[short]
        return {"r": r, "rbf_ag": rbf_ag, "weight_ag": c.bond_weights_ag(rbf_ag),
                "atom_graph": torch.stack([graph.edge_index[1], graph.edge_index[0]], dim=1),
                "directed": torch.arange(len(r), device=vec.device), "short": short,
                "s_recv": s_recv, "s_send": graph.edge_index[0][short], "slot": slot, "e1": e1,
                "e2": e2, "s_vec": s_vec, "s_r": s_r,
                "weight_bg": c.bond_weights_bg(c.bond_basis_expansion.rbf_expansion_bg(s_r)),
                "centre": s_recv[e1]}

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """Bond features (every edge), angle features (every angle), atom features (every row)."""
        c = self.module
        g = self._geometry(graph)
        atom = c.atom_embedding(self.elements(graph.numbers))
        bond = c.bond_embedding(g["rbf_ag"])
        e1, e2 = g["e1"], g["e2"]
        if len(e1):
            unit = -g["s_vec"] / g["s_r"].unsqueeze(-1)
            angle = c.angle_embedding(c.angle_basis_expansion(unit[e1], unit[e2]))
        else:
            angle = bond.new_zeros(0, c.angle_embedding.out_features)
        return bond, angle, atom

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Layer ``i - 1``'s bond and angle updates, atom convolution ``i``, layer ``i``'s partial
        bond messages packed per atom (but in the last step)."""
        c = self.module
        g = self._geometry(graph)
        bond, angle, atom = state[:3]
        if i > 0:
            bond, angle = self._finish_bonds(i - 1, graph, g, atom, bond, angle, state[3], state[4])
        needed = graph.num_needed
        atom = self._atom_conv(c.atom_conv_layers[i], atom, bond, g["weight_ag"], g["atom_graph"],
                               g["directed"], needed)
        if i == self.num_layers - 1:
            return bond, angle, atom
        s_recv, slot, e1, e2 = g["s_recv"], g["slot"], g["e1"], g["e2"]
        s_bond = bond[g["short"]]
        if len(e1):
            total = torch.cat([s_bond[e1], s_bond[e2], angle, atom[g["centre"]]], dim=1)
            update = c.bond_conv_layers[i].twoBody_bond(total) * g["weight_bg"][e1] * g["weight_bg"][e2]
            partial = update.new_zeros(len(s_bond), update.shape[1]).index_add(0, e1, update)
        else:
            partial = bond.new_zeros(len(s_bond), bond.shape[1])
        k_slots, width = self.max_bonds, partial.shape[1]
        packed = partial.new_zeros(needed, k_slots, width).index_put((s_recv, slot), partial)
        vec = graph.edge_vec
        keys = torch.full((needed, k_slots, 3), _EMPTY_SLOT, dtype=vec.dtype, device=vec.device)
        keys[s_recv, slot] = g["s_vec"].detach()
        return (bond, angle, atom, packed.reshape(needed, k_slots * width),
                keys.reshape(needed, k_slots * 3))

    def _finish_bonds(self, idx: int, graph: LocalGraph, g: dict, atom, bond, angle, packed, keys):
        """Bond update ``idx`` of every edge of the part from the exchanged partial messages (its
        receiver's: the owned rows; its sender's: the slot holding the reverse edge), then angle
        update ``idx``."""
        c = self.module
        n, k_slots = graph.num_nodes, self.max_bonds
        packed = packed.reshape(n, k_slots, -1)
        reverse, found = self._match_reverse(keys.reshape(n, k_slots, 3).detach(), g["s_send"], g["s_vec"])
        missing = ~found & graph.owned_mask[g["s_recv"]]
        if bool(missing.any()):
            j = int(torch.nonzero(missing)[0])
            raise RuntimeError(
                f"CHGNet bond graph: the reverse of the edge {int(graph.atom_ids[g['s_recv'][j]])} <- "
                f"{int(graph.atom_ids[g['s_send'][j]])} was not found among the neighbour's bonds; "
                f"the halo exchange or the neighbour graph is inconsistent")
        own = packed[g["s_recv"], g["slot"]]
        other = packed[g["s_send"], reverse] * found.unsqueeze(-1).to(packed.dtype)
        messages = bond.new_zeros(len(bond), packed.shape[2]).index_copy(0, g["short"], own + other)
        layer = c.bond_conv_layers[idx]
        new_bond = layer.mlp_out(messages) if layer.use_mlp_out else messages
        if layer.resnet:
            new_bond = new_bond + bond
        if layer.bond_norm is not None:
            new_bond = layer.bond_norm(new_bond)
        angle_layer = c.angle_layers[idx]
        if angle_layer is not None and len(g["e1"]):
            angle = angle_layer(atom_feas=atom, bond_feas=new_bond[g["short"]], angle_feas=angle,
                                bond_graph=torch.stack([g["centre"], g["e1"], g["e2"]], dim=1))
        return new_bond, angle

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout (norm, MLP, composition model) of the last atom convolution's rows."""
        c = self.module
        needed = graph.num_needed
        atom = state[2][:needed]
        if c.readout_norm is not None:
            atom = c.readout_norm(atom)
        energies = c.mlp(atom).squeeze(-1)
        if c.composition_model is not None:
            types = self.elements(graph.numbers[:needed])
            energies = energies + c.composition_model.fc.weight[0, types]
        return energies
