"""matgl's TensorNet and M3GNet (PyTorch Geometric backend) as ``DistributableModel``s.

``distmlip.wrap`` accepts a ``matgl.apps.pes.Potential`` holding a ``TensorNet`` or an ``M3GNet``,
or the model itself (M3GNet: see ``M3GNetModel``). The adapter runs matgl's own submodules in
matgl's order (TensorNet's and M3GNet's blocks composed from their sub-layers, see below); only
the halo exchanges are added.

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

Zero redundant node work (TensorNet): the adapter composes matgl's ``TensorEmbedding`` and
``TensorNetInteraction`` from their own submodules and helpers (same weights, same operations in
the same order) so that node-wise work runs on the first ``graph.num_needed`` rows only (the
owned rows in halo mode) and edge-wise work reads neighbours' rows:

- embedding: the element embedding ``emb`` on every row (a lookup, exact on the halo) feeds the
  edge messages, summed onto the needed rows; the norm, ``init_norm``, scalar MLP and channel
  mixing of the summed tensors run on those rows.
- interaction: the normalisation, decomposition and first three channel mixings
  (``linears_tensor[:3]``) run on the needed rows; their three components, stacked as
  ``(rows, 3, units, 3, 3)``, are what neighbours read, so that stack is exchanged before every
  interaction (``nblocks`` exchanges, three times the volume of ``X`` per halo row, instead of
  recomputing them on halo rows); the messages are summed onto the needed rows, and the group
  action, normalisation, last mixings and residual run on those rows.
- the readout runs on the needed rows.

``num_layers = nblocks + 1`` hops (the embedding sums over neighbours: extended mode needs a halo
that deep).

Zero redundant node work (M3GNet): the adapter composes each block from matgl's
``ThreeBodyInteractions`` and ``M3GNetBlock`` sub-layers (same weights, same operations in the
same order), node-wise work on the needed rows only:

- the node embedding is a lookup on every row; the first block's three-body gate
  (``update_network_atom``, a sigmoid layer of the node features) is per element too: computed
  once on the embedding table (one row per element type) and looked up on every row;
- the three-body term of bond ``i -> j`` reads the gate of the far atom ``k`` of each bond
  ``i -> k`` (a halo row when ``k`` is), so from the second block on the gate is computed on the
  needed rows with the node features they follow from, and exchanged with them: one exchange
  per block after the first, of ``dim_node_embedding + degree`` columns (the gate has one per
  three-body basis function, ``max_n * max_l``: 9 at matgl's defaults, beside 64 node features)
  instead of the gate computed on halo rows;
- the bond update and the node messages are edge-wise (every bond is centred on a needed row and
  reads both ends); the messages are summed onto the needed rows, plus the residual;
- the readout runs on the needed rows.

Layer protocol (both; bounded memory, see ``DistributableModel``): TensorNet's state is per row
(see ``TensorNetModel``); M3GNet's is ``(bond, node)``, one step per block, the bond features an
edge entry (part-local: every bond is centred on an owned atom in halo mode, and its three-body
terms are the part's bonds around that centre) and the node features with the next block's gate
exchanged, as ``forward`` exchanges them.

Saving (``torch.save``, pickle): matgl's spherical Bessel and harmonic bases keep their
functions as ``sympy.lambdify`` output, which pickle cannot store, so a matgl ``M3GNet`` does not
save. The adapter's copy of the module holds those lists as ``_SympyFuncs``: the same functions,
saved as the matgl constructor call that builds them (class and arguments) and built again,
identically, when loaded. ``torch.save(distmlip.wrap(potential), path)`` therefore saves an M3GNet
(the file ``pair_style distmlip`` and ``--model`` accept); the caller's ``Potential`` is unchanged.

Not supported (a ``ValueError`` says so): matgl's Warp kernels (build the model with
``use_warp=False``; the adapter accepts a Warp-built model by rebuilding it without Warp, same
weights), intensive (per-structure) targets, multi-state element references and the ZBL
repulsion (``calc_repuls=True``).
"""

from __future__ import annotations

import copy

import torch

from ._adapter import (
    ElementTable,
    check_options,
    no_pretrained_load,
    optional_import,
    private_copy,
    supported,
)
from .base import DistributableModel, LocalGraph

__all__ = ["M3GNetModel", "OPTIONS", "PACKAGES", "PRETRAINED", "TensorNetModel", "load", "supports",
           "wrap"]

PACKAGES = ("matgl",)
PRETRAINED: dict[str, str] = {}  # matgl's pretrained weights download at run time
OPTIONS: tuple[str, ...] = ()
_WHAT = "matgl models"


def _matgl(arch: str | None = None):
    """``(Potential, the architecture class)``; with ``arch=None``, ``(Potential, {name: class})``."""
    optional_import("matgl", "matgl", "wrap matgl models")
    pes = optional_import("matgl.apps.pes", "matgl", "wrap matgl models")
    models = optional_import("matgl.models", "matgl", "wrap matgl models")
    classes = {name: getattr(models, name) for name in ("TensorNet", "M3GNet")}
    return pes.Potential, (classes if arch is None else classes[arch])


def _architecture(obj) -> str | None:
    potential_cls, classes = _matgl()
    inner = obj.model if isinstance(obj, potential_cls) else obj
    for name, cls in classes.items():
        if isinstance(inner, cls):
            return name
    return None


def supports(obj) -> bool:
    """Whether ``obj`` is a matgl ``TensorNet`` or ``M3GNet``, or a ``Potential`` holding one."""
    return supported(obj, PACKAGES, lambda o: _architecture(o) is not None)


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
    for i, (w, b) in enumerate(zip(weight.chunk(3, 0), bias.chunk(3, 0), strict=True), start=1):
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


def _index_dtype(num_nodes: int) -> torch.dtype:
    """matgl's node-index dtype (int32) when the node ids fit in it, else int64."""
    return torch.int32 if num_nodes <= torch.iinfo(torch.int32).max else torch.int64


class _SympyFuncs(list):
    """A list of matgl's sympy-generated basis functions that pickles as ``recipe``, the
    ``(class, args)`` whose construction builds them (``cls(*args).funcs``): loading builds the
    same functions again. Copies share the functions (as ``copy.deepcopy`` does for a plain list of
    functions), without rebuilding them."""

    def __init__(self, funcs, recipe: tuple):
        super().__init__(funcs)
        self.recipe = recipe

    def __reduce__(self):
        return _build_funcs, self.recipe

    def __copy__(self):
        return _SympyFuncs(self, self.recipe)

    def __deepcopy__(self, memo):
        return _SympyFuncs(self, self.recipe)


def _build_funcs(cls, args: tuple) -> _SympyFuncs:
    return _SympyFuncs(cls(*args).funcs, (cls, args))


def _picklable_bases(module: torch.nn.Module) -> None:
    """Gives every matgl spherical Bessel or harmonic basis in ``module`` (modified in place: the
    adapter's private copy) functions that pickle (``_SympyFuncs``). A smooth Bessel basis is
    built from the Python float cutoff its parent passed (``BondExpansion``,
    ``SphericalBesselWithHarmonics``): the float32 buffer would round it."""
    from matgl.layers._basis import SphericalBesselFunction, SphericalHarmonicsFunction

    parents = {id(child): parent for parent in module.modules() for child in parent.children()}
    for sub in module.modules():
        if isinstance(sub, SphericalBesselFunction):
            cutoff = getattr(parents.get(id(sub)), "cutoff", None)
            cutoff = cutoff if isinstance(cutoff, float) else float(sub.cutoff)
            recipe = (type(sub), (sub.max_l, sub.max_n, cutoff, sub.smooth))
        elif isinstance(sub, SphericalHarmonicsFunction):
            recipe = (type(sub), (sub.max_l, sub.use_phi))
        else:
            continue
        if not isinstance(sub.funcs, _SympyFuncs):
            sub.funcs = _SympyFuncs(sub.funcs, recipe)


class _MatGLModel(DistributableModel):
    """What matgl's energy models share: the ``Potential`` around them (scale, shift, element
    references), the element table, the per-atom energies."""

    ARCH = ""  # the matgl class name, for messages

    def __init__(self, module):
        super().__init__()
        potential_cls, arch_cls = _matgl(self.ARCH)
        potential = module if isinstance(module, potential_cls) else None
        model = potential.model if potential is not None else module
        if not isinstance(model, arch_cls):
            raise TypeError(f"module: expected a matgl {self.ARCH} or a Potential holding one, got "
                            f"{type(model).__module__}.{type(model).__name__}")
        if model.is_intensive:
            raise ValueError(
                f"module: expected a {self.ARCH} energy model (is_intensive=False: a sum of "
                "per-atom energies), got is_intensive=True (a per-structure property); build it "
                "with is_intensive=False")
        if getattr(model, "include_state", False):
            raise ValueError(f"module: expected a {self.ARCH} without state features, got "
                             "include_state=True")
        if potential is not None:
            if potential.calc_repuls:
                raise ValueError("module: expected a Potential with calc_repuls=False, got "
                                 "calc_repuls=True (the ZBL repulsion is not supported yet)")
            refs = potential.element_refs
            if refs is not None and refs.property_offset.ndim > 1:
                raise ValueError("module: expected per-element references of one state, got "
                                 f"shape {tuple(refs.property_offset.shape)}")
        # a copy: matgl models keep non-leaf tensors from their last call (``feature_dict``), which
        # the runtime's per-device deep copy would refuse; the caller's module is not modified
        self.module = private_copy(module)
        _picklable_bases(self.module)
        model = self.module.model if potential is not None else self.module
        from ase.data import atomic_numbers

        self.elements = ElementTable([atomic_numbers[s] for s in model.element_types], self.ARCH)
        self.cutoff = float(model.cutoff)
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

    def _energies(self, graph: LocalGraph, eps: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """matgl's ``data_std * E + data_mean + sum refs`` as per-atom energies: the shift is
        shared equally over the whole system's atoms."""
        needed = graph.num_needed
        share = self.data_mean / max(graph.num_system_atoms, 1)
        return self.data_std * eps[:needed] + self.element_refs[types[:needed]] + share


def _channels(linear: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``linear`` over the channel axis of ``(rows, units, 3, 3)`` tensors (matgl's layout)."""
    return linear(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TensorNetModel(_MatGLModel):
    """A matgl ``TensorNet`` (or a ``Potential`` holding one), split exactly, with its node-wise
    work on the needed rows only (see the module docstring).

    Args:
        module: a ``matgl.apps.pes.Potential`` whose ``model`` is a ``TensorNet``, or a
            ``TensorNet`` (energy in its own units: no scale, shift or references).

    Attributes:
        module: a copy of the wrapped ``Potential`` or ``TensorNet`` (evaluated through its
            submodules).
        cutoff: ``model.cutoff``; ``num_layers``: ``nblocks + 1`` (the embedding is a hop).
    """

    ARCH = "TensorNet"

    def __init__(self, module):
        super().__init__(module)
        model = self.module.model if hasattr(self.module, "data_std") else self.module
        self._tensornet = _without_warp(model)
        self.num_layers = len(model.layers) + 1

    # ------------------------------------------------------------------ the pieces
    def _edges(self, graph: LocalGraph):
        """``(edge_index, vec, dist, rbf)``: matgl's ``[centre (receiver); neighbour (sender)]``
        in matgl's own index dtype (int32: matgl sums messages with ``index_add`` on permuted,
        non-contiguous tensors, for which torch's CPU kernel with an int64 index goes through
        ``scatter_add`` with an expanded index, ~15x slower than its int32 path), the bond
        vectors, their lengths and matgl's radial expansion of them."""
        edge_index = graph.edge_index.flip(0).to(_index_dtype(graph.num_nodes))
        vec = graph.edge_vec
        dist = torch.norm(vec, dim=1)
        return edge_index, vec, dist, self._tensornet.bond_expansion(dist)

    def _embedding(self, graph: LocalGraph, h: torch.Tensor, edges) -> torch.Tensor:
        """matgl's ``TensorEmbedding`` on the needed rows: the element embedding ``h`` of every
        row (exact on the halo) feeds the edge messages, which are summed onto the needed rows
        only; the norm, ``LayerNorm``, scalar MLP and channel mixing run on those rows."""
        from matgl.utils.cutoff import cosine_cutoff
        from matgl.utils.maths import (
            new_radial_tensor,
            tensor_norm,
            vector_to_skewtensor,
            vector_to_symtensor,
        )

        emb = self._tensornet.tensor_embedding
        edge_index, vec, dist, rbf = edges
        envelope = cosine_cutoff(dist, emb.cutoff).view(-1, 1)
        weights = [proj(rbf) * envelope
                   for proj in (emb.distance_proj1, emb.distance_proj2, emb.distance_proj3)]
        unit = vec / torch.norm(vec, dim=1, keepdim=True).clamp(min=1e-6)
        eye = torch.eye(3, 3, device=vec.device, dtype=vec.dtype)[None, None]
        basis = new_radial_tensor(eye, vector_to_skewtensor(unit).unsqueeze(-3),
                                  vector_to_symtensor(unit).unsqueeze(-3), *weights)
        messages = emb.message(h[edge_index[0]], h[edge_index[1]], rbf, dist, *basis)
        components = emb.aggregate(messages, edge_index[0], dim_size=graph.num_needed)
        scale = emb.init_norm(tensor_norm(components[0] + components[1] + components[2]))
        components = [_channels(lin, c) for lin, c in zip(emb.linears_tensor, components, strict=True)]
        for lin in emb.linears_scalar:
            scale = emb.act(lin(scale))
        scale = scale.reshape(scale.shape[0], emb.units, 3)
        scalars, skew, traceless = new_radial_tensor(*components, scale[..., 0], scale[..., 1],
                                                     scale[..., 2])
        return scalars + skew + traceless

    @staticmethod
    def _prepare(layer, X: torch.Tensor):
        """The node-wise start of interaction ``layer`` on the rows of ``X`` (the needed rows):
        ``(Xn, parts)``, the normalised tensors and, stacked on axis 1, the channel-mixed
        scalar, skew and traceless components (what neighbours read: exchanged)."""
        from matgl.utils.maths import decompose_tensor, tensor_norm

        X = X / (tensor_norm(X) + 1)[..., None, None]
        parts = [_channels(lin, c) for lin, c in zip(layer.linears_tensor[:3], decompose_tensor(X),
                                                      strict=True)]
        return X, torch.stack(parts, dim=1)

    @staticmethod
    def _update(layer, needed: int, Xn: torch.Tensor, parts: torch.Tensor, edges) -> torch.Tensor:
        """The rest of interaction ``layer``: edge messages from ``parts`` on every row (halo
        rows exchanged), summed onto the ``needed`` rows, and the node update of those rows."""
        from matgl.utils.cutoff import cosine_cutoff
        from matgl.utils.maths import decompose_tensor, tensor_norm

        edge_index, _, dist, rbf = edges
        f = rbf
        for lin in layer.linears_scalar:
            f = layer.act(lin(f))
        f = (f * cosine_cutoff(dist, layer.cutoff).view(-1, 1)).reshape(f.shape[0], layer.units, 3)
        scalars, skew, traceless = parts.unbind(1)
        messages = layer.message(edge_index, scalars, skew, traceless, f)
        summed = layer.aggregate(messages, edge_index[0], needed)
        msg = summed[0] + summed[1] + summed[2]
        own = parts[:needed]
        Y = own[:, 0] + own[:, 1] + own[:, 2]
        group = layer.equivariance_invariance_group
        if group == "O(3)":
            components = decompose_tensor(torch.matmul(msg, Y) + torch.matmul(Y, msg))
        elif group == "SO(3)":
            components = decompose_tensor(2 * torch.matmul(Y, msg))
        else:
            raise ValueError(f"equivariance_invariance_group: expected 'O(3)' or 'SO(3)', got {group!r}")
        normp1 = (tensor_norm(components[0] + components[1] + components[2]) + 1)[..., None, None]
        mixed = [_channels(lin, c / normp1) for lin, c in zip(layer.linears_tensor[3:], components,
                                                               strict=True)]
        dX = mixed[0] + mixed[1] + mixed[2]
        return Xn[:needed] + dX + torch.matmul(dX, dX)

    def _readout(self, graph: LocalGraph, X: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        from matgl.utils.maths import decompose_tensor, tensor_norm

        m = self._tensornet
        scalars, skew, traceless = decompose_tensor(X[: graph.num_needed])
        x = torch.cat((tensor_norm(scalars), tensor_norm(skew), tensor_norm(traceless)), dim=-1)
        x = m.linear(m.out_norm(x))
        return self._energies(graph, m.final_layer(x).view(-1), types)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        edges = self._edges(graph)  # once for every step (the steps recompute their own)
        state = self.embed(graph)
        for i in range(self.num_steps):
            if i > 0:  # the interaction about to run reads its neighbours' components
                state = (state[0], graph.halo_exchange(state[1]))
            state = self._step(i, graph, state, edges)
        return self.energies(graph, state)

    # ------------------------------------------------------------------ the layer protocol
    # ``forward`` is these steps with an exchange between them (see ``DistributableModel``):
    # ``embed`` gives the element embedding of every row; step 0 is the embedding's message
    # passing and node update and the first interaction's node-wise start, step i (1 .. nblocks)
    # the rest of interaction i - 1 and the start of interaction i. The state is ``(Xn, parts)``:
    # the normalised tensors on the needed rows and the stacked channel-mixed components on every
    # row (exchanged: what the messages read); the last step returns ``(X,)``.

    #: Layer protocol: state entry 1 (the next interaction's components) is read on halo rows.
    exchanged = (1,)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The element embedding of every row (a lookup: exact on the halo)."""
        return (self._tensornet.tensor_embedding.emb(self.elements(graph.numbers)),)

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Step ``i`` (see above) on the needed rows."""
        return self._step(i, graph, state, self._edges(graph))

    def _step(self, i: int, graph: LocalGraph, state, edges) -> tuple[torch.Tensor, ...]:
        layers = self._tensornet.layers
        if i == 0:
            X = self._embedding(graph, state[0], edges)
        else:
            X = self._update(layers[i - 1], graph.num_needed, state[0], state[1], edges)
        if i < len(layers):
            return self._prepare(layers[i], X)
        return (X,)

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout of the last interaction's tensors."""
        return self._readout(graph, state[0], self.elements(graph.numbers))


class M3GNetModel(_MatGLModel):
    """A matgl ``M3GNet`` (or a ``Potential`` holding one), split exactly, with its node-wise
    work on the needed rows only (see the module docstring).

    M3GNet's bonds are directed, ``[centre; neighbour]``; three-body terms couple bonds sharing
    a centre, and both the bond and the node updates are summed onto the centre. A part holds
    every bond centred on its needed rows (distmlip's received edges), hence every triplet around
    them: bond features stay exact with the node features and the next block's three-body gate
    exchanged before every block after the first (the embedding and the first gate are per
    element). ``num_layers = n_blocks``.

    Args:
        module: a ``matgl.apps.pes.Potential`` whose ``model`` is an ``M3GNet``, or an ``M3GNet``.
    """

    ARCH = "M3GNet"

    def __init__(self, module):
        super().__init__(module)
        model = self.module.model if hasattr(self.module, "data_std") else self.module
        self._m3gnet = model
        self.num_layers = int(model.n_blocks)

    @staticmethod
    def _three_body(block, triplets, num_bonds: int, basis: torch.Tensor, gate: torch.Tensor,
                    edge_feat: torch.Tensor) -> torch.Tensor:
        """matgl's ``ThreeBodyInteractions.forward`` given the gate ``update_network_atom(v)`` of
        every row (its node-wise part, computed on the needed rows and exchanged):
        ``(bond_ij, end atom k, cutoff weights)`` of each triplet are ``triplets``."""
        from matgl.utils.maths import scatter_sum

        bond_ij, end, weights = triplets
        terms = basis * gate[end] * weights[:, None]
        new_bonds = scatter_sum(terms.to(edge_feat.dtype), segment_ids=bond_ij,
                                num_segments=num_bonds, dim=0)
        if new_bonds.shape[0] == 0:
            return edge_feat
        return edge_feat + block.update_network_bond(new_bonds)

    @staticmethod
    def _graph_layer(layer, needed: int, edge_index: torch.Tensor, edge_feat: torch.Tensor,
                     node_feat: torch.Tensor, rbf: torch.Tensor):
        """matgl's ``M3GNetBlock`` (``M3GNetGraphConv`` without state, then its dropout) with the
        node update summed onto the ``needed`` rows only (every bond is centred on one of them):
        ``(edge features of every bond, node features of rows :needed)``."""
        from matgl.utils.maths import scatter_add

        conv = layer.conv
        centre, neighbour = edge_index[0], edge_index[1]
        vi, vj = node_feat[centre], node_feat[neighbour]
        edge_feat = edge_feat + (conv.edge_update_func(torch.hstack([vi, vj, edge_feat]))
                                 * conv.edge_weight_func(rbf))
        messages = (conv.node_update_func(torch.hstack([vi, vj, edge_feat]))
                    * conv.node_weight_func(rbf))
        node_feat = node_feat[:needed] + scatter_add(messages, centre, dim_size=needed, dim=0)
        if layer.dropout is not None:
            edge_feat, node_feat = layer.dropout(edge_feat), layer.dropout(node_feat)
        return edge_feat, node_feat

    def _geometry(self, graph: LocalGraph) -> dict:
        """What every block reads from the edge vectors: matgl's bonds ``[centre (receiver);
        neighbour (sender)]`` sorted by centre (for its triplets), their radial expansion, and the
        triplets with their basis, end atoms and cutoff weights."""
        from matgl.graph._compute import compute_theta_and_phi, create_line_graph
        from matgl.utils.cutoff import polynomial_cutoff

        m = self._m3gnet
        order = torch.argsort(graph.edge_index[1], stable=True)
        edge_index = graph.edge_index.flip(0)[:, order]
        vec = graph.edge_vec[order]
        dist = torch.norm(vec, dim=1)
        line = create_line_graph(edge_index, dist, vec, None, graph.num_nodes, m.threebody_cutoff)
        line_index = line["line_edge_index"]
        angles = compute_theta_and_phi(vec, dist, line_index)
        basis = m.basis_expansion(angles["triple_bond_lengths"], angles["cos_theta"], angles["phi"])
        three_cut = polynomial_cutoff(dist, m.threebody_cutoff)
        # per triplet (bond ij, bond ik): the bond it updates, its end atom k, both bonds' cutoffs
        bond_ij, bond_ik = line_index[0].to(torch.long), line_index[1].to(torch.long)
        triplets = (bond_ij, edge_index[1][bond_ik].to(torch.long),
                    three_cut[bond_ij] * three_cut[bond_ik])
        return {"edge_index": edge_index, "expanded": m.bond_expansion(dist), "basis": basis,
                "triplets": triplets}

    def _embed(self, graph: LocalGraph, g: dict) -> tuple[torch.Tensor, ...]:
        m = self._m3gnet
        types = self.elements(graph.numbers)
        node_feat, edge_feat, _ = m.embedding(types, g["expanded"], None)  # lookups on every row
        # the first gate is per element (of the embedding): its table, looked up on every row
        blocks = m.three_body_interactions
        gate = blocks[0].update_network_atom(m.embedding.layer_node_embedding.weight)[types]
        return edge_feat, torch.cat([node_feat, gate], dim=1)

    def _step(self, i: int, graph: LocalGraph, state, g: dict) -> tuple[torch.Tensor, ...]:
        """Block ``i`` from ``(bond features, node features and block i's gate)``: every bond and
        the needed rows' node features, then (but in the last block) block ``i + 1``'s gate of
        those rows beside them."""
        m = self._m3gnet
        edge_feat, both = state
        width = m.embedding.layer_node_embedding.weight.shape[1]
        node_feat, gate = both[:, :width], both[:, width:]
        edge_feat = self._three_body(m.three_body_interactions[i], g["triplets"], edge_feat.shape[0],
                                     g["basis"], gate, edge_feat)
        edge_feat, node_feat = self._graph_layer(m.graph_layers[i], graph.num_needed,
                                                 g["edge_index"], edge_feat, node_feat, g["expanded"])
        if i + 1 < m.n_blocks:
            gate = m.three_body_interactions[i + 1].update_network_atom(node_feat)
            return edge_feat, torch.cat([node_feat, gate], dim=1)
        return edge_feat, node_feat

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        g = self._geometry(graph)  # once for every block (the steps recompute their own)
        state = self._embed(graph, g)
        for i in range(self.num_steps):
            if i > 0:  # the node features and this block's gate, computed on the needed rows
                state = (state[0], graph.halo_exchange(state[1]))
            state = self._step(i, graph, state, g)
        return self.energies(graph, state)

    # ------------------------------------------------------------------ the layer protocol
    # ``forward`` is these steps with an exchange between them (see ``DistributableModel``): state
    # ``(bond, node)``, the bond features of the part's bonds (in matgl's order, sorted by
    # centre; an edge entry: part-local, since every bond is centred on an owned atom in halo mode
    # and its triplets are the part's bonds around that centre) and the node features with the
    # next block's three-body gate beside them (exchanged: the gate is read at the triplets' far
    # atoms, the node features at both ends of a bond). Step ``i`` is block ``i``; the last
    # step's state is ``(bond, node features)``.

    #: Layer protocol: node features and gate on halo rows; bond features per edge.
    exchanged = (1,)
    edge_entries = (0,)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """Bond features (every bond) and node features with the first gate (every row: lookups)."""
        order = torch.argsort(graph.edge_index[1], stable=True)
        expanded = self._m3gnet.bond_expansion(torch.norm(graph.edge_vec[order], dim=1))
        return self._embed(graph, {"expanded": expanded})

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Block ``i`` (see above)."""
        return self._step(i, graph, state, self._geometry(graph))

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout of the last block's node features."""
        types = self.elements(graph.numbers)
        return self._energies(graph, self._m3gnet.final_layer(state[1]).view(-1), types)


_MODELS = {"TensorNet": TensorNetModel, "M3GNet": M3GNetModel}


def wrap(obj, **options) -> _MatGLModel:
    """``TensorNetModel(obj)`` or ``M3GNetModel(obj)`` (no options); ``obj`` is copied, not
    modified."""
    check_options(options, OPTIONS, _WHAT)
    arch = _architecture(obj)
    if arch is None:
        raise TypeError(f"obj: expected a matgl TensorNet or M3GNet, or a Potential holding one, "
                        f"got {type(obj).__module__}.{type(obj).__name__}")
    return _MODELS[arch](obj)


load = no_pretrained_load("matgl", OPTIONS, _WHAT)
