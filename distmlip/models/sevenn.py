"""SevenNet (``sevenn``) adapter: ``load("sevennet-0")`` and ``wrap(<AtomGraphSequential>)``.

SevenNet's model is an ``AtomGraphSequential``: an ordered list of modules that each read and
write a data dict (edge embedding, one-hot element embedding, then per interaction layer
``{i}_self_connection_intro``, ``{i}_self_interaction_1``, ``{i}_convolution``,
``{i}_self_interaction_2``, ``{i}_self_connection_outro``, ``{i}_equivariant_gate``, then the
readout, the species-wise shift/scale, the energy sum and the force/stress output).

``SevenNetModel`` builds that data dict from a ``LocalGraph`` and runs the modules one by one:

- SevenNet's ``edge_index`` is ``[receivers; senders]`` (its convolution gathers messages from
  ``edge_index[1]`` into ``edge_index[0]``; matscipy's ``i, j`` with ``D = pos[j] - pos[i] + S@cell``),
  i.e. distmlip's ``[senders; receivers]`` flipped. Its ``edge_vec`` then has distmlip's sign:
  ``pos[sender] - pos[receiver] + shift@cell``. ``graph.edge_vec`` itself is SevenNet's
  ``edge_vec``, so distmlip's autograd gives the forces and stress.
- Atomic numbers become SevenNet's type indices through the checkpoint's ``type_map``.
- ``graph.halo_exchange`` runs before every interaction block but the first (everything before
  the first convolution is per-atom and depends on the element only, so it is already exact on
  the halo). For the structures the layer protocol describes (below; SevenNet's builder's) it
  refreshes the block's input node features h, and the block's pre-convolution modules
  (``{i}_self_interaction_1``) then run on every row, halo rows included, as the steps do (their
  state is h alone). For any other structure it refreshes the convolution's input features right
  before the convolution, where SevenNet's own LAMMPS parallel mode communicates
  (``IrrepsConvolution._comm_size = irreps_x.dim``; the same width as h in SevenNet's builds).
- Node work on the needed rows: right after the first convolution, the per-atom keys of the data
  dict (node features, one-hot attributes, type indices, the self-connection residual, ``batch``;
  ``_node_keys``) are narrowed to the first ``graph.num_needed`` rows (the owned rows, which
  come first, in halo mode), and so is every convolution's output. Every node-wise module after
  it (self-connections, self-interactions after the convolution, gates, readout, shift/scale)
  then computes only those rows; the exchange receives the owned rows and returns every row.
  The one redundancy is the pre-convolution modules on the halo rows (above; their inputs read
  the per-atom keys of every row, kept aside when they are narrowed). Before the first
  convolution only the self-connection's residual is computed on the needed rows (it is read
  after the convolution); the input of the first convolution must hold every row. In extended
  mode or unsplit ``num_needed`` is every row and nothing is narrowed.
- The energy sum and force/stress output modules are skipped; the per-atom energies
  (``KEY.ATOMIC_ENERGY``, after the shift/scale: what ``SevenNetCalculator`` reports as
  ``energies``) of the needed rows are returned.

- The layer protocol (``embed``/``step``/``energies``, ``exchanged = (0,)``; see the section
  below ``_narrow``): the same computation as steps, one per interaction block, so the
  bounded-memory mode recomputes one block per part instead of replaying the model. Set per
  instance for the structures SevenNet's builder makes (single- and multi-fidelity); a module
  whose structure the steps do not describe (``_layer_structure``) keeps ``exchanged = None``
  and the generic path.

Why not SevenNet's ghost-exchange hook (``sevenn/nn/_ghost_exchange.py``, used by
``sevenn/mliap.py``, which narrows the same node keys)? It wraps each convolution in a module
whose autograd ``Function`` calls LAMMPS' ``forward_exchange``/``reverse_exchange``: using it would
need a hand-written reverse exchange duplicating what distmlip's ``halo_exchange`` already gets
from autograd (it is built on differentiable indexing). It also exchanges before the first
convolution, which is unnecessary. Calling the exchange from this module loop is shorter and
leaves SevenNet's modules untouched.

The wrapped module is not modified (no ``set_is_batch_data``): the data dict carries a ``batch``
vector of zeros, so modules in either batch or single mode give the same result.
"""

from __future__ import annotations

import torch

from ._adapter import ElementTable, check_options, optional_import, supported
from .base import DistributableModel, LocalGraph

__all__ = ["OPTIONS", "PACKAGES", "PRETRAINED", "SevenNetModel", "load", "supports", "wrap"]

PACKAGES = ("sevenn",)
OPTIONS = ("modal",)
_WHAT = "SevenNet models"


# distmlip name -> (sevenn's pretrained name, description). All three checkpoints ship inside
# the sevenn wheel (sevenn/pretrained_potentials); nothing is downloaded.
_CHECKPOINTS = {
    "sevennet-0": ("7net-0", "SevenNet-0 (11Jul2024), MPtrj PBE(+U), 5 Å cutoff, 5 convolutions (sevenn)"),
    "sevennet-l3i5": ("7net-l3i5", "SevenNet-l3i5, MPtrj, l_max=3, 5 convolutions (sevenn)"),
    "sevennet-mf-0": ("7net-mf-0", "SevenNet-MF-0, multi-fidelity PBE/r2SCAN; modal='PBE' (default) "
                                   "or 'R2SCAN' (sevenn)"),
}
PRETRAINED = {name: desc for name, (_, desc) in _CHECKPOINTS.items()}

# The documented default fidelity of SevenNet-MF-0: PBE(+U), the MPtrj level of theory shared by
# SevenNet-0, so the two models are interchangeable by default.
_DEFAULT_MODAL = {"sevennet-mf-0": "PBE"}


def _sevenn():
    what = "wrap or load SevenNet models"
    keys = optional_import("sevenn._keys", "sevenn", what)
    return keys, optional_import("sevenn.nn.sequential", "sevenn", what).AtomGraphSequential


def supports(obj) -> bool:
    """Whether ``obj`` is a SevenNet ``AtomGraphSequential``."""
    return supported(obj, PACKAGES, lambda o: isinstance(o, _sevenn()[1]))


class SevenNetModel(DistributableModel):
    """A SevenNet ``AtomGraphSequential`` under the distmlip contract.

    Args:
        module: the SevenNet model (held, not copied, and not modified).
        modal: for a multi-fidelity model, the fidelity (one of ``module.modal_map``'s keys, case
            insensitive); must be ``None`` for a single-fidelity model.
        name: a label used in error messages.

    ``cutoff`` is the model's cutoff; ``num_layers`` is its number of convolutions. The model
    runs in the dtype of its parameters (SevenNet's checkpoints are float32; ``.to(torch.float64)``
    or ``DistributedCalculator(dtype="float64")`` casts it).
    """

    def __init__(self, module, *, modal: str | None = None, name: str = "SevenNet"):
        super().__init__()
        keys, sequential = _sevenn()
        if not isinstance(module, sequential):
            raise TypeError(
                f"module: expected a sevenn.nn.sequential.AtomGraphSequential, got "
                f"{type(module).__module__}.{type(module).__name__}"
            )
        from sevenn.nn.convolution import IrrepsConvolution, IrrepsScatterGatterFusedConvolution
        from sevenn.nn.edge_embedding import EdgeEmbedding
        from sevenn.nn.force_output import ForceOutput, ForceStressOutput, ForceStressOutputFromEdge
        from sevenn.nn.linear import AtomReduce
        from sevenn.nn.node_embedding import OnehotEmbedding
        from sevenn.nn.self_connection import SelfConnectionIntro, SelfConnectionLinearIntro

        self.name = name
        if not module.type_map:
            raise ValueError(f"module: {name} has no type_map (atomic number -> type index); "
                             "build it from a checkpoint (sevenn.util.load_checkpoint(...).build_model())")
        cutoff = float(module.cutoff)
        if not cutoff > 0:
            raise ValueError(f"module: {name} has no cutoff (got {module.cutoff!r})")
        self.cutoff = cutoff
        self.type_map = {int(z): int(t) for z, t in module.type_map.items()}
        self.elements = ElementTable(self.type_map, self.name)

        skip = (ForceOutput, ForceStressOutput, ForceStressOutputFromEdge, AtomReduce)
        convolutions = (IrrepsConvolution, IrrepsScatterGatterFusedConvolution)
        self._plan: list[tuple[str, str]] = []  # (module name, role)
        for key, sub in module._modules.items():
            if isinstance(sub, skip):
                continue
            if isinstance(sub, convolutions):
                if getattr(sub, "is_parallel", False):
                    raise ValueError(f"module: {name}'s convolution {key!r} is built for SevenNet's "
                                     "LAMMPS parallel mode (is_parallel=True); pass the serial model")
                role = "conv"
            elif isinstance(sub, OnehotEmbedding):
                role = "onehot"
            elif isinstance(sub, (SelfConnectionIntro, SelfConnectionLinearIntro)):
                role = "intro"  # writes the residual that the self-connection outro adds
            else:
                role = "node"
            self._plan.append((key, role))
        self.num_layers = sum(role == "conv" for _, role in self._plan)
        if self.num_layers < 1:
            raise ValueError(f"module: {name} has no convolution layer")
        # the data-dict keys (strings) this adapter writes and reads
        self._key = {k: getattr(keys, k) for k in ("EDGE_IDX", "EDGE_VEC", "ATOMIC_NUMBERS", "NODE_FEATURE",
                                                   "BATCH", "NUM_ATOMS", "MODAL_TYPE", "ATOMIC_ENERGY",
                                                   "SELF_CONNECTION_TEMP")}
        # the per-atom keys that node-wise modules read after a convolution (sevenn/mliap.py
        # narrows the same ones, plus batch here: the adapter runs the modules in batch mode)
        self._node_keys = tuple({getattr(keys, k) for k in ("NODE_FEATURE", "NODE_ATTR", "ATOM_TYPE",
                                                            "ATOMIC_NUMBERS", "BATCH",
                                                            "SELF_CONNECTION_TEMP")}
                                | {module._modules[k].key_x for k, r in self._plan if r == "conv"})
        self.module = module

        # fidelity of a multi-fidelity model
        if modal is not None and not isinstance(modal, str):
            raise TypeError(f"modal: expected None or a fidelity name (str), got {modal!r}")
        self.modal = None
        self._modal_index = None
        modal_map = module.modal_map or {}
        deployed = module._modules.get("modal_input_prepare")
        if deployed is not None:  # prepare_modal_deploy() already fixed the fidelity
            fixed = [m for m, i in modal_map.items() if i == deployed.modal_idx]
            if modal is not None and (not fixed or modal.lower() != fixed[0].lower()):
                raise ValueError(f"modal: {name} was deployed for modality "
                                 f"{fixed[0] if fixed else deployed.modal_idx!r}; got {modal!r}")
            self.modal = fixed[0] if fixed else None
        elif modal_map:
            if modal is None:
                raise ValueError(f"modal: {name} is multi-fidelity; expected one of "
                                 f"{sorted(modal_map)}, got None")
            match = [m for m in modal_map if m.lower() == modal.lower()]
            if not match:
                raise ValueError(f"modal: expected one of {sorted(modal_map)}, got {modal!r}")
            self.modal = match[0]
            self._modal_index = int(modal_map[match[0]])
        elif modal is not None:
            raise ValueError(f"modal: {name} has a single fidelity; expected None, got {modal!r}")

        # the layer protocol, for the structures it describes (see ``_layer_structure``)
        self._layers = self._layer_structure(deployed is not None, EdgeEmbedding, OnehotEmbedding)
        self.exchanged = None if self._layers is None else (0,)

    def type_indices(self, numbers: torch.Tensor) -> torch.Tensor:
        """SevenNet's type index of each atomic number (ValueError for unknown elements)."""
        return self.elements(numbers)

    def _data(self, graph: LocalGraph) -> dict:
        """SevenNet's input data dict of ``graph`` (every row), in the model's dtype."""
        key = self._key
        edge_vec = graph.edge_vec
        if edge_vec.dtype != self.dtype:
            edge_vec = edge_vec.to(self.dtype)
        n = graph.num_nodes
        device = edge_vec.device
        types = self.type_indices(graph.numbers.to(device))
        data = {
            key["EDGE_IDX"]: graph.edge_index.flip(0),  # SevenNet: [receivers; senders]
            key["EDGE_VEC"]: edge_vec,
            key["ATOMIC_NUMBERS"]: graph.numbers.to(device),
            key["NODE_FEATURE"]: types,
            key["BATCH"]: torch.zeros(n, dtype=torch.long, device=device),
            key["NUM_ATOMS"]: torch.tensor(n, device=device),
        }
        if self._modal_index is not None:
            data[key["MODAL_TYPE"]] = torch.tensor([self._modal_index], dtype=torch.long, device=device)
        return data

    def _call(self, name: str, role: str, data: dict) -> dict:
        """Runs the node-wise (or edge-wise) module ``name`` on ``data``."""
        sub = self.module._modules[name]
        data = sub(data)
        if role == "onehot":  # SevenNet's one-hot is always float32: follow the model dtype
            for out in (sub.key_output, sub.key_additional_output):
                if out is not None and data[out].is_floating_point():
                    data[out] = data[out].to(self.dtype)
        return data

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        key = self._key
        data = self._data(graph)
        n = graph.num_nodes
        # rows whose node-wise work is needed (halo mode: the owned rows, which come first)
        needed = graph.num_needed
        narrow = needed < n
        # a structure the layer protocol describes exchanges the node features h before each
        # block but the first and runs the block's pre-convolution modules on every row (as its
        # steps do, whose state is h alone); any other exchanges the convolution's input
        pre = {} if self._layers is None else {
            b[1][0][0]: b[1] for b in self._layers["blocks"][1:] if b[1]}
        skip = {name for modules in pre.values() for name, _ in modules}
        every_row: dict = {}  # the per-atom keys on every row, kept when they are narrowed
        convolutions, exchanged = 0, False
        for name, role in self._plan:
            if name in skip:
                if name in pre:  # the needed rows in, every row out: then the pre modules
                    rows = dict(data, **every_row)
                    rows[key["NODE_FEATURE"]] = graph.halo_exchange(data[key["NODE_FEATURE"]])
                    data[key["NODE_FEATURE"]] = self._run(pre[name], rows)[key["NODE_FEATURE"]]
                    exchanged = True
                continue
            sub = self.module._modules[name]
            if role == "conv":
                if convolutions > 0 and not exchanged:  # the needed rows in, every row out
                    data[sub.key_x] = graph.halo_exchange(data[sub.key_x])
                convolutions, exchanged = convolutions + 1, False
                data = sub(data)
                if narrow:  # from here on node-wise modules see the needed rows only
                    if not every_row:
                        every_row = {k: data[k] for k in self._node_keys
                                     if isinstance(data.get(k), torch.Tensor) and data[k].ndim
                                     and data[k].shape[0] == n}
                    data = self._narrow(data, n, needed)
                continue
            if role == "intro" and narrow and convolutions == 0:
                # the first self-connection residual, read after the convolution: needed rows
                data[key["SELF_CONNECTION_TEMP"]] = sub(self._narrow(dict(data), n, needed))[
                    key["SELF_CONNECTION_TEMP"]]
                continue
            data = self._call(name, role, data)
        return data[key["ATOMIC_ENERGY"]].reshape(-1)

    def _narrow(self, data: dict, n: int, rows: int) -> dict:
        """``data`` with its per-atom keys that still hold all ``n`` rows cut to the first ``rows``."""
        for k in self._node_keys:
            value = data.get(k)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
                data[k] = value[:rows]
        return data


    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps the runtime calls one at a time (see
    # ``DistributableModel``). SevenNet's interaction block i is ``i_self_connection_intro`` (the
    # residual, from the block's input features h), ``i_self_interaction_1`` (h -> x, what the
    # convolution reads from neighbours), ``i_convolution`` and the node-wise modules after it up
    # to ``i_equivariant_gate``. The state is ``(h,)``: the node features, on every row where a
    # step reads them (the initial features from ``embed``, exact on every row; then the needed
    # rows, the halo rows refreshed by the runtime's exchange between steps, where ``forward``
    # calls the halo exchange). Step i runs the block's ``self_interaction_1`` (its modules
    # between the intro and the convolution) on h of every row to get x, the residual from h of
    # the needed rows, the convolution of x and the node-wise modules after it; bounded memory
    # then stores one row of features per atom and level instead of two (h and x), at the price
    # of ``self_interaction_1`` on the halo rows. The last step's h is what ``energies`` reads:
    # it runs the readout (``reduce_*``, the species-wise shift/scale). Each step (and
    # ``embed``, ``energies``) rebuilds what does not depend on node features: the edge embedding
    # (from ``graph.edge_vec``, so each step's share of the forces is differentiable) and the
    # one-hot attributes.

    def _layer_structure(self, deployed: bool, edge_class, onehot_class):
        """``{"context", "edges", "init", "blocks", "readout"}`` (module names; ``blocks``: per
        convolution ``(intros, pre, conv, post)``), or ``None`` for a structure the steps do not
        describe, which then keeps the generic path (``exchanged = None``):

        - a modality fixed by ``prepare_modal_deploy`` (its ``modal_input_prepare`` module writes
          the modality before the one-hot embeddings; not rebuilt per step here);
        - anything before the first block other than the edge embedding and one-hot embeddings
          followed by node-wise modules of the element alone (the initial features);
        - a block that is not named ``{i}_...`` (SevenNet's builder), lacks a self-connection intro
          or has modules between the intro and the convolution that read other keys than the node
          features, or a convolution that reads other keys than the node features.
        """
        if deployed:
            return None
        modules = self.module._modules
        feature = self._key["NODE_FEATURE"]
        convs = [k for k, (_, role) in enumerate(self._plan) if role == "conv"]
        names = [name for name, _ in self._plan]
        first = next((k for k, (_, role) in enumerate(self._plan) if role in ("intro", "conv")), None)
        if first is None or self._plan[first][1] != "intro":
            return None
        prefix = self._plan[:first]
        context = [(n, r) for n, r in prefix if isinstance(modules[n], (edge_class, onehot_class))]
        if prefix[:len(context)] != context:  # the context first, then the initial features
            return None
        blocks, start = [], first
        for i, c in enumerate(convs):
            tag = f"{i}_"
            if not names[c].startswith(tag) or getattr(modules[names[c]], "key_x", None) != feature:
                return None
            layer = [k for k in range(start, c) if names[k].startswith(tag)]
            if not layer or layer != list(range(layer[0], c)) \
                    or any(not names[k].startswith(f"{i - 1}_") for k in range(start, layer[0])):
                return None
            roles = [self._plan[k][1] for k in layer]
            intros = [names[k] for k in layer if self._plan[k][1] == "intro"]
            pre = [self._plan[k] for k in layer if self._plan[k][1] != "intro"]
            if roles[0] != "intro" or len(intros) != 1 \
                    or getattr(modules[intros[0]], "key_x", feature) != feature \
                    or any(not self._reads_features(modules[n], feature) for n, _ in pre):
                return None
            blocks.append([intros, pre, names[c], []])
            if i > 0:
                blocks[i - 1][3] = self._plan[start:layer[0]]
            start = c + 1
        tail = self._plan[start:]
        post = [e for e in tail if e[0].startswith(f"{len(convs) - 1}_")]
        if tail[:len(post)] != post or not post:
            return None
        blocks[-1][3] = post
        return {"context": [e for e in context if not isinstance(modules[e[0]], edge_class)],
                "edges": [e for e in context if isinstance(modules[e[0]], edge_class)],
                "init": prefix[len(context):], "blocks": [tuple(b) for b in blocks],
                "readout": tail[len(post):]}

    @staticmethod
    def _reads_features(sub, feature: str) -> bool:
        """Whether ``sub`` maps the node features to the node features (``key_x`` of SevenNet's
        node-wise modules, ``key_input``/``key_output`` of its linear layers)."""
        keys = [getattr(sub, k, feature) for k in ("key_x", "key_input", "key_output")]
        return all(k == feature for k in keys)

    def _context(self, graph: LocalGraph, edges: bool = True, narrow: bool = True) -> dict:
        """The data dict with the one-hot attributes (and the edge embedding if ``edges``) of every
        row, narrowed to the needed rows when the node-wise work is (and ``narrow``)."""
        data = self._data(graph)
        for name, role in (self._layers["edges"] if edges else []) + self._layers["context"]:
            data = self._call(name, role, data)
        if narrow and graph.num_needed < graph.num_nodes:
            data = self._narrow(data, graph.num_nodes, graph.num_needed)
        return data

    def _run(self, modules, data: dict) -> dict:
        for name, role in modules:
            data = self._call(name, role, data)
        return data

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The initial node features h (element only), every row (exact on the halo rows too)."""
        data = self._data(graph)
        data = self._run(self._layers["context"] + self._layers["init"], data)
        return (data[self._key["NODE_FEATURE"]],)

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Interaction block ``i``: its pre-convolution modules on h of every row (x), the
        residual, convolution and node-wise modules after it on the needed rows."""
        (h,) = state
        intros, pre, conv, post = self._layers["blocks"][i]
        n, needed, feature = graph.num_nodes, graph.num_needed, self._key["NODE_FEATURE"]
        data = self._context(graph, narrow=False)  # every row: the pre modules read them all
        data[feature] = h
        x = self._run(pre, dict(data))[feature]
        if needed < n:
            data = self._narrow(data, n, needed)
        data[feature] = h[:needed]
        data = self._run([(name, "intro") for name in intros], data)
        data[feature] = x
        data = self.module._modules[conv](data)
        if needed < n:
            data[feature] = data[feature][:needed]
        data = self._run(post, data)
        return (data[feature],)

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout (and the species-wise shift/scale) of the last block's features."""
        data = self._context(graph, edges=False)
        data[self._key["NODE_FEATURE"]] = state[0][: graph.num_needed]
        return self._run(self._layers["readout"], data)[self._key["ATOMIC_ENERGY"]].reshape(-1)


def wrap(obj, **options) -> SevenNetModel:
    """``SevenNetModel(obj, **options)`` (options: ``modal``); ``obj`` is held, not copied, and not
    modified."""
    check_options(options, OPTIONS, _WHAT)
    return SevenNetModel(obj, **options)


def load(name: str, **options) -> SevenNetModel:
    """A pretrained SevenNet model shipped in the ``sevenn`` wheel: one of ``PRETRAINED``.

    ``modal`` selects the fidelity of ``"sevennet-mf-0"`` (``"PBE"`` by default, or ``"R2SCAN"``).
    """
    check_options(options, OPTIONS, _WHAT)
    if not isinstance(name, str) or name.lower() not in _CHECKPOINTS:
        raise ValueError(f"name: expected one of {sorted(_CHECKPOINTS)}, got {name!r}")
    key = name.lower()
    _sevenn()
    import os

    import sevenn.util as util

    path = util.pretrained_name_to_path(_CHECKPOINTS[key][0])
    if not os.path.isfile(path):  # pragma: no cover - the wheel ships these files
        raise FileNotFoundError(f"name: the checkpoint of {key!r} is not in the installed sevenn ({path})")
    checkpoint = util.load_checkpoint(path)
    module = checkpoint.build_model()
    module.eval()
    modal = options.get("modal")
    if modal is None:
        modal = _DEFAULT_MODAL.get(key)
    return SevenNetModel(module, modal=modal, name=key)
