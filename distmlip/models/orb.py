"""Orb v3 conservative models (``orb-models``) as a ``DistributableModel``.

``distmlip.wrap`` accepts an ``orb_models.forcefield.conservative_regressor.
ConservativeForcefieldRegressor`` (what ``pretrained.orb_v3_conservative_*`` and
``orb_v3_conservative_architecture`` build) whose base model is a ``MoleculeGNS``, or an
``ORBCalculator`` holding one (its ``system_config`` and ``max_num_neighbors`` are used). The adapter
calls Orb's own modules (edge and node featurisation, the encoder's MLPs, energy head) and composes
each ``AttentionInteractionNetwork`` from its own sub-layers (attention gates, ``_edge_mlp``,
``_node_mlp``; same weights, same operations in the same order) so that node-wise work runs on the
first ``graph.num_needed`` rows only (the owned rows in halo mode):

- the encoder's node MLP depends on the element only: it runs once per element present and is
  looked up for every row (the first interaction reads neighbours' rows before any exchange);
- in an interaction, the gates and the edge update are edge-wise: every edge, reading both ends'
  rows (halo rows exchanged). Every edge a part holds has an owned end, and its state is updated
  from both ends, so every edge is kept up to date. The gated edges are summed per node and the
  node update and residual run on the needed rows;
- the energy head reads the needed rows (through ``graph.global_sum``).

Layer protocol (``embed``/``step``/``energies``, see ``OrbModel``'s section on it): Orb's edge
features are part-local edge entries; the readout's ``global_sum`` is declared (``readout_sum``),
so the bounded-memory mode sums it over the parts before the last backward step.

Conventions (Orb → distmlip):

- Orb's edges run from a *sender* (an atom of the central cell) to a *receiver*, vector
  ``pos[receiver] + shift - pos[sender]``, and each sender keeps only its ``max_num_neighbors``
  nearest neighbours within ``radius``. distmlip's edge (sender s, receiver r) has vector
  ``pos[s] - pos[r] + shift``: it is Orb's edge with sender ``r`` and receiver ``s``, same vector.
  So a part holds every candidate edge *sent* by its owned atoms in Orb's sense, and applies the
  neighbour cap to them exactly.
- Orb updates each node from the edges it sends *and* the edges it receives. An owned atom also
  receives edges from halo atoms, whose cap is decided by their owners: every owner computes, for
  its atoms, the distance of the ``max_num_neighbors``-th nearest neighbour, and one halo exchange
  (before the encoder) gives it to the halo; the reversed edge ``halo → owned`` (vector
  ``-edge_vec``) is kept if it is not longer than that. Boundary edges are therefore evaluated in
  the two parts that own their ends (Orb's edge state is updated from both ends).
- The cap keeps every neighbour not farther than the k-th nearest: when several neighbours tie
  at exactly the k-th distance (an unperturbed high-symmetry crystal), all are kept, where Orb
  keeps k of them in an order its neighbour search decides (for an edge sent by a halo atom, a
  tie is within ``CAP_SLACK``, 1e-12 relative: its two ends' copies of the edge may differ in
  the last bits). Otherwise the graphs are identical.
- Halo exchanges: node features before every interaction after the first (the encoder is per
  atom and per edge), plus the cap distances: ``num_message_passing_steps`` calls. Receptive field
  ``num_layers = num_message_passing_steps + 1`` hops (whether an edge exists depends on its
  sender's neighbourhood), which extended mode needs.
- Energy: Orb's head is ``N * denorm(MLP(mean of node features)) + sum_i ref(Z_i)`` (or, with
  ``predict_atom_avg=False``, ``denorm(MLP(sum)) + refs``): the mean is ``graph.global_sum`` over
  the whole system. Per-atom energies are ``denorm(MLP(mean)) + ref(Z_i)``: an equal share of the
  learned part plus each atom's reference (docs/wrapping.md, section 4a); they are not Orb
  outputs (Orb has none). Exact in the bounded-memory mode too (the global sum is a level there).

Orb v3's ZBL pair repulsion is included as Orb computes it: summed over the capped edges each
atom sends, then *averaged* over the system's atoms (``ZBLBasis(node_aggregation="mean")``, the
default), so each atom's share is its own sum over ``N``.

Not supported (``ValueError``): charge/spin conditioning, extra node or edge input features,
atom-type embedding bags. Direct (non-conservative) force heads are ignored:
forces are always the energy's gradient.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ._adapter import ElementTable, no_pretrained_load, optional_import, supported, wrap_with
from .base import DistributableModel, LocalGraph

__all__ = ["OPTIONS", "PACKAGES", "PRETRAINED", "OrbModel", "load", "supports", "wrap"]

PACKAGES = ("orb_models",)
PRETRAINED: dict[str, str] = {}  # Orb's weights download at run time
OPTIONS = ("max_num_neighbors", "radius")

#: relative slack of the neighbour cap for edges sent by halo atoms (see ``forward``)
CAP_SLACK = 1e-12
_WHAT = "Orb models"


def _orb():
    what = "wrap Orb models"
    regressor = optional_import("orb_models.forcefield.conservative_regressor", "orb", what)
    calculator = optional_import("orb_models.forcefield.calculator", "orb", what)
    return regressor.ConservativeForcefieldRegressor, calculator.ORBCalculator


def supports(obj) -> bool:
    """Whether ``obj`` is an Orb ``ConservativeForcefieldRegressor`` or an ``ORBCalculator``."""
    return supported(obj, PACKAGES, lambda o: isinstance(o, _orb()))


class OrbModel(DistributableModel):
    """An Orb v3 conservative regressor, split exactly.

    Args:
        module: a ``ConservativeForcefieldRegressor`` or an ``ORBCalculator`` holding one.
        max_num_neighbors: the neighbour cap (default: the calculator's, else the model's
            ``system_config``'s).
        radius: the graph radius, Å (default: likewise).

    Attributes:
        module: the regressor (held, not copied, and not modified; its submodules are evaluated).
        cutoff: ``radius``; ``num_layers``: message-passing steps + 1.
    """

    def __init__(self, module, *, max_num_neighbors: int | None = None, radius: float | None = None):
        super().__init__()
        regressor_cls, calculator_cls = _orb()
        config = None
        if isinstance(module, calculator_cls):
            config = module.system_config
            if max_num_neighbors is None:
                max_num_neighbors = getattr(module, "max_num_neighbors", None)
            module = module.model
        if not isinstance(module, regressor_cls):
            raise TypeError(f"module: expected an Orb ConservativeForcefieldRegressor or an "
                            f"ORBCalculator holding one, got {type(module).__module__}."
                            f"{type(module).__name__}")
        config = config or module.system_config
        if config is None and (max_num_neighbors is None or radius is None):
            raise ValueError("module: expected a model with a system_config (radius, "
                             "max_num_neighbors), got None; pass radius= and max_num_neighbors=")
        gns = module.model
        if module.pair_repulsion and module.pair_repulsion_fn.node_aggregation not in ("mean", "sum"):
            raise ValueError(f"module: expected the ZBL term aggregated by 'mean' or 'sum', got "
                             f"{module.pair_repulsion_fn.node_aggregation!r}")
        if gns.conditioner is not None:
            raise ValueError("module: expected a model without charge/spin conditioning, got "
                             f"{type(gns.conditioner).__name__}")
        extra = [k for k in (*gns.node_feature_names, *gns.edge_feature_names) if k != "feat"]
        if extra or not gns.use_embedding or gns.expects_atom_type_embedding:
            raise ValueError("module: expected Orb v3's featurisation (an atom embedding table, no "
                             f"extra input features), got extra features {extra}, use_embedding="
                             f"{gns.use_embedding}, expects_atom_type_embedding="
                             f"{gns.expects_atom_type_embedding}")
        self.module = module
        self.cutoff = float(radius if radius is not None else config.radius)
        self.max_num_neighbors = int(max_num_neighbors if max_num_neighbors is not None
                                     else config.max_num_neighbors)
        if self.max_num_neighbors < 1:
            raise ValueError(f"max_num_neighbors: expected an integer >= 1, got {self.max_num_neighbors}")
        self.num_layers = len(gns.gnn_stacks) + 1
        # Orb's embedding row of atomic number z is z; its reference energies (and the ZBL term's
        # covalent radii, at z + 1) cover one element fewer (1-117): the table stops there
        top = min(gns.atom_emb.embeddings.num_embeddings,
                  module.heads[module.energy_name].reference.linear.weight.numel())
        if module.pair_repulsion:
            top = min(top, module.pair_repulsion_fn.covalent_radii.numel() - 1)
        self.elements = ElementTable({z: z for z in range(1, top)}, "Orb")

    def _cap(self, receivers: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
        """Per row, the distance of its k-th nearest neighbour among the edges it receives here
        (infinite with fewer than k), k = ``max_num_neighbors``: each receiving row's lengths in a
        row of a table padded with infinity, and its k-th smallest value (ties counted, as a
        stable sort's rank k - 1). The graph's edges come grouped by receiver; otherwise they
        are grouped first."""
        k = self.max_num_neighbors
        if length.numel() == 0:
            return torch.full((n,), float("inf"), dtype=length.dtype, device=length.device)
        if not bool((receivers[1:] >= receivers[:-1]).all()):
            order = torch.argsort(receivers, stable=True)
            receivers, length = receivers[order], length[order]
        counts = torch.bincount(receivers, minlength=n)
        width = int(counts.max())
        if width < k:
            return torch.full((n,), float("inf"), dtype=length.dtype, device=length.device)
        rows = int(receivers[-1]) + 1  # up to the last receiving row
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(receivers), device=length.device) - starts[receivers]
        table = torch.full((rows, width), float("inf"), dtype=length.dtype, device=length.device)
        table[receivers, rank] = length
        kth = torch.full((n,), float("inf"), dtype=length.dtype, device=length.device)
        kth[:rows] = torch.kthvalue(table, k, dim=1).values
        return kth

    def _pick(self, graph: LocalGraph, kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part's Orb edges given every row's cap distance ``kth``, as ids of distmlip edges
        (ascending): ``kept``, the edges kept as they are (Orb's sender is distmlip's receiver),
        and ``back``, those whose reverse is an Orb edge sent by a halo atom."""
        senders, receivers = graph.edge_index  # distmlip: message from senders to receivers
        length = graph.edge_vec.detach().norm(dim=1)
        keep = length <= kth[receivers]
        # Orb edges sent by halo atoms to owned ones (halo mode only: rows >= num_needed); a halo
        # sender's cap distance was computed by its owner from its own copy of the edge, whose
        # length may differ in the last bits where the two ends' positions come from different
        # periodic images (LAMMPS's ghost atoms): compared with a relative slack
        back = (senders >= graph.num_needed) & (length <= kth[senders] * (1.0 + CAP_SLACK))
        return keep.nonzero().squeeze(1), back.nonzero().squeeze(1)

    @staticmethod
    def _orb_edges(graph: LocalGraph, kept: torch.Tensor, back: torch.Tensor):
        """Orb's edges ``(senders, receivers, vectors)`` of the distmlip edges ``kept`` and
        ``back`` (``_pick``), in Orb's direction; the vectors differentiable."""
        senders, receivers = graph.edge_index
        vec = graph.edge_vec
        return (torch.cat([receivers[kept], senders[back]]), torch.cat([senders[kept], receivers[back]]),
                torch.cat([vec[kept], -vec[back]]))

    def _encode_nodes(self, numbers: torch.Tensor) -> torch.Tensor:
        """The encoder's node features: they depend on the element only, so they are encoded once
        per element present and looked up for every row."""
        gns = self.module.model
        elements, row_element = torch.unique(self.elements(numbers), return_inverse=True)
        return gns._encoder._node_fn(gns.atom_emb(elements))[row_element]

    def _encode_edges(self, orb_vec: torch.Tensor) -> torch.Tensor:
        gns = self.module.model
        return gns._encoder._edge_fn(gns.featurize_edges(SimpleNamespace(edge_features={"vectors": orb_vec})))

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        from orb_models.forcefield.nn_util import get_cutoff

        gns = self.module.model
        n, needed = graph.num_nodes, graph.num_needed
        length = graph.edge_vec.detach().norm(dim=1)
        kth = self._cap(graph.edge_index[1], length, n)
        # halo rows: their owners' cap distances (a no-op in extended mode)
        kth = graph.halo_exchange(kth[:needed].unsqueeze(1)).squeeze(1)
        kept, back = self._pick(graph, kth)
        orb_senders, orb_receivers, orb_vec = self._orb_edges(graph, kept, back)
        nodes = self._encode_nodes(graph.numbers)
        edges = self._encode_edges(orb_vec)
        cutoff = get_cutoff(orb_vec.norm(dim=-1))
        for i, gnn in enumerate(gns.gnn_stacks):
            if i > 0:
                nodes = graph.halo_exchange(nodes[:needed])
            nodes, edges = self._interaction(gnn, needed, nodes, edges, orb_senders, orb_receivers,
                                             cutoff)
        return self._readout(graph, nodes, kept)

    def _readout(self, graph: LocalGraph, nodes: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Per-atom energies of the needed rows from the last node features (a ``global_sum``),
        the references and the ZBL term of the capped edges each atom sends (``kept``, ids)."""
        needed, vec = graph.num_needed, graph.edge_vec
        head = self.module.heads[self.module.energy_name]
        total = graph.global_sum(nodes[:needed])
        count = max(graph.num_system_atoms, 1)
        if head.atom_avg:
            share = head.normalizer.inverse(head.mlp((total / count).unsqueeze(0))).reshape(())
        else:
            share = head.normalizer.inverse(head.mlp(total.unsqueeze(0))).reshape(()) / count
        reference = head.reference.linear.weight.reshape(-1).to(vec.dtype)[graph.numbers[:needed]]
        energies = share + reference
        if self.module.pair_repulsion:
            senders, receivers = graph.edge_index
            zbl = self._zbl(graph.numbers, receivers[kept], senders[kept], vec[kept],
                            graph.num_nodes)[:needed]
            if self.module.pair_repulsion_fn.node_aggregation == "mean":
                zbl = zbl / count
            energies = energies + zbl
        return energies

    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps (see ``DistributableModel``). State
    # ``(nodes, kth, edges, kept, back)``: the node features and every row's cap distance
    # (exchanged: the edge update reads both ends' node features, and whether a halo atom's edge
    # to an owned atom exists is decided by its owner's cap), the features of the part's Orb edges
    # and which distmlip edges they are (``_pick``'s ids; edge entries). Those are part-local in
    # halo mode: a part holds every Orb edge with an owned end, in both directions (a distmlip
    # edge ends at an owned atom; Orb's edge from a halo sender is its reverse, kept by the
    # sender's exchanged cap), and an edge's update reads only its own features and both ends'
    # node features (exchanged), so a boundary edge evaluated by the two parts that own its ends
    # is the same in both and nothing about edges is exchanged. Every softmax gate of an owned
    # atom normalises over edges the part holds. ``embed`` is the encoder's node features; step 0
    # the cap distances of the owned rows; step 1 picks the part's Orb edges from the exchanged
    # caps (once: positions are fixed within a call, and the ids carry no gradient; the vectors
    # are taken from ``graph.edge_vec`` by id in every step, so their gradients flow as in
    # ``forward``), encodes them and runs interaction 0; step ``i`` (2 ..
    # num_message_passing_steps) interaction ``i - 1``; ``energies`` the readout (the last step
    # hands it the node features, the caps and ``kept``, for the ZBL term).
    #
    # The readout is a nonlinear function of the whole system's mean node feature, a
    # ``graph.global_sum`` in ``energies`` (``readout_sum``): the runtime sums the parts' partial
    # sums before the last backward step.

    exchanged = (0, 1)
    readout_sum = True
    edge_entries = (2, 3, 4)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The encoder's node features (every row, by element), placeholders for the caps, the
        edge features and the edge ids."""
        vec, index = graph.edge_vec, graph.edge_index
        return (self._encode_nodes(graph.numbers), vec.new_zeros(graph.num_nodes), vec.new_zeros(0),
                index.new_zeros(0), index.new_zeros(0))

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Step 0: the cap distances of the needed rows. Step 1: the part's Orb edges from the
        exchanged caps, encoded, and interaction 0; step ``i > 1``: interaction ``i - 1``."""
        from orb_models.forcefield.nn_util import get_cutoff

        needed = graph.num_needed
        nodes, kth, edges, kept, back = state
        if i == 0:
            length = graph.edge_vec.detach().norm(dim=1)
            kth = self._cap(graph.edge_index[1], length, graph.num_nodes)[:needed]
            # finite: an exchanged entry meets zero gradients in the runtime's backward
            return nodes[:needed], kth.clamp(max=torch.finfo(kth.dtype).max), edges, kept, back
        if i == 1:
            kept, back = self._pick(graph, kth)
        orb_senders, orb_receivers, orb_vec = self._orb_edges(graph, kept, back)
        if i == 1:
            edges = self._encode_edges(orb_vec)
        cutoff = get_cutoff(orb_vec.norm(dim=-1))
        nodes, edges = self._interaction(self.module.model.gnn_stacks[i - 1], needed, nodes, edges,
                                         orb_senders, orb_receivers, cutoff)
        if i == self.num_steps - 1:  # the readout reads no edge features (``kept``: an edge entry)
            return nodes, kth[:needed], kept
        return nodes, kth[:needed], edges, kept, back

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout (``graph.global_sum`` of the node features), references and ZBL."""
        return self._readout(graph, state[0], state[2])

    @staticmethod
    def _interaction(gnn, needed: int, nodes, edges, senders, receivers, cutoff):
        """Orb's ``AttentionInteractionNetwork`` (no conditioning) composed from its sub-layers,
        node-wise work on the first ``needed`` rows: the attention gates and the edge update are
        edge-wise (every edge, reading both ends' rows); the gated edges are summed per node and
        the node update (``_node_mlp``) and residual run on the needed rows. Returns the node
        features of rows ``:needed`` and every edge's features."""
        from orb_models.forcefield import segment_ops

        n = nodes.shape[0]
        if gnn._attention_gate == "softmax":
            weights = cutoff if gnn._distance_cutoff else None
            receive = segment_ops.segment_softmax(gnn._receive_attn(edges), receivers, n, weights=weights)
            send = segment_ops.segment_softmax(gnn._send_attn(edges), senders, n, weights=weights)
        else:
            receive = torch.sigmoid(gnn._receive_attn(edges))
            send = torch.sigmoid(gnn._send_attn(edges))
        if gnn._distance_cutoff:
            receive, send = receive * cutoff, send * cutoff
        updated = gnn._edge_mlp(torch.cat([edges, nodes[senders], nodes[receivers]], dim=1))
        # summed onto every row (an edge-wise scatter), then only the needed rows are updated
        received = segment_ops.segment_sum(updated * receive, receivers, n)[:needed]
        sent = segment_ops.segment_sum(updated * send, senders, n)[:needed]
        own = nodes[:needed]
        return own + gnn._node_mlp(torch.cat([own, received, sent], dim=1)), edges + updated

    def _zbl(self, numbers, senders, receivers, vec, n) -> torch.Tensor:
        """Orb's ZBL pair repulsion per sending atom (``ZBLBasis.forward`` before its reduction
        over atoms), on the capped edges each atom sends. Orb's atomic numbers there are one more
        than the elements' (``argmax(one_hot(Z)) + 1``); kept as Orb has it."""
        zbl = self.module.pair_repulsion_fn
        z_u = (numbers[senders] + 1).to(vec.dtype)
        z_v = (numbers[receivers] + 1).to(vec.dtype)
        a = zbl.a_prefactor * 0.529 / (torch.pow(z_u, zbl.a_exp) + torch.pow(z_v, zbl.a_exp))
        x = vec.norm(dim=1)
        phi = torch.sum(zbl.c * torch.exp(-zbl.d * (x / a).unsqueeze(0)), dim=0)
        raw = 14.3996 * z_u * z_v / x * phi
        r_max = zbl.covalent_radii[numbers[senders] + 1] + zbl.covalent_radii[numbers[receivers] + 1]
        envelope, _ = zbl._polynomial_cutoff_with_derivative(x, r_max, zbl.p)
        out = torch.zeros(n, dtype=vec.dtype, device=vec.device)
        return out.index_add(0, senders, 0.5 * raw * envelope)


#: ``OrbModel(obj, **options)``; ``obj`` is held, not copied, and not modified
wrap = wrap_with(OrbModel, OPTIONS, _WHAT)
load = no_pretrained_load("Orb", OPTIONS, _WHAT)
