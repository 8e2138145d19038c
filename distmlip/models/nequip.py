"""NequIP and Allegro (``nequip``, ``nequip-allegro``): ``distmlip.wrap(model)`` for their models.

The adapter calls the model's energy network (the ``func`` inside ``ForceStressOutput``) on a
data dict built from the ``LocalGraph``; NequIP's ``with_edge_vectors_`` uses given
``edge_vectors`` as they are, so the energy depends on positions only through
``graph.edge_vec``. Conventions: NequIP's ``edge_index`` is ``[center; neighbour]`` (messages
flow from row 1 to row 0) and its edge vector points from the center to the neighbour's image;
distmlip's ``edge_index`` is ``[sender; receiver]`` with the vector from the receiver to the
sender's image. So NequIP gets ``edge_index.flip(0)`` and ``edge_vec`` unchanged.

- NequIP: every ``InteractionBlock`` but the first calls its ``ghost_exchange`` submodule (a
  no-op, meant for LAMMPS) on the node features it is about to convolve. The adapter adds a
  forward hook to those submodules that calls ``graph.halo_exchange`` on that field. The
  receptive field (``num_layers``) is the number of interaction blocks.
- Zero redundant node work (halo mode, where ``graph.num_needed`` is the number of owned rows):
  NequIP's interaction blocks already know local and ghost atoms (for LAMMPS ML-IAP): given
  ``data["lmp_mliap_data"].nlocal``, every block but the first computes its self-connection and
  first linear map on the local rows only, its ghost exchange then fills the ghost rows (here
  ``halo_exchange``, which takes the owned rows and returns every row), and every block keeps
  only the local rows of the aggregated messages: the second linear map, the nonlinearity, the
  readout and the per-type scale and shift run on the owned rows. The adapter passes a stand-in
  with ``nlocal = num_needed`` under that key. Two spots NequIP's path leaves to the caller are
  covered by hooks: a first block with a self-connection (``learnable_shift``; its input is the
  embedding on every row) gets its inputs sliced to the needed rows, and a first layer that
  adds a residual (the embedding) gets its block's output padded back to every row for the sum
  and its own output cut back to the needed rows. In extended mode or unsplit (``num_needed`` =
  every row) nothing is truncated.
- Allegro is strictly local: every scatter in its layers goes to the edge's center atom, so an
  atom's energy depends only on the atoms within one cutoff of it, whatever its number of
  layers. ``num_layers`` is 1 and no exchange is needed. Its layers are edge-wise; the only
  node-wise work on halo rows is the scatter of edge features onto them (zeros in halo mode,
  where no edge is centred on a halo atom), its normalisation and the per-type scale and shift
  of a zero energy: left as is.
- The layer protocol (``embed``/``step``/``energies``, ``exchanged = (1,)``; see the section
  of ``NequIPModel`` below): one step per ``ConvNetLayer``, the state ``(h, x)`` with x each
  block's normalised ``linear_1`` output, what its ghost exchange completes. Decided per wrapped
  instance (``_layer_structure``): Allegro (nothing exchanged) and layouts the steps do not
  describe (a pair potential, other convolution classes) keep ``exchanged = None``, as do
  models with float32 layers (``model_dtype``; their steps' edge gradient differs from forward's by
  float32 rounding, more than the probe of float64 edge vectors allows).

The hooks are registered on the adapter's own deep copy of the model (``NequIPModel.module``),
never on the caller's; they also do nothing outside ``NequIPModel.forward`` (a context variable
carries the exchange and row counts of the running worker).

Per-atom energies are the model's ``atomic_energy`` (after the per-type scale and shift and any
pair potential); they sum to the model's total energy.

Precision: NequIP models are mixed-precision by construction. Whatever their ``model_dtype``,
geometry (edge vectors and lengths, the Bessel embedding) and the per-type scale and shift are in
NequIP's global dtype (float64), the layers in ``model_dtype``. The adapter keeps that: it asks for
float64 edge vectors, ignores casts to float64 and refuses casts to another dtype (a
``DistributedCalculator(..., dtype="float32")`` would otherwise turn NequIP's float64 parts into
float32 or fail inside the model). A float32 NequIP model is built with ``model_dtype="float32"``.
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

__all__ = ["NequIPModel", "OPTIONS", "PACKAGES", "PRETRAINED", "load", "supports", "wrap"]

PACKAGES = ("nequip", "allegro")
PRETRAINED: dict[str, str] = {}  # NequIP / Allegro weights download at run time (nequip.net)
OPTIONS = ("chemical_species_to_atom_type_map", "num_layers")
_WHAT = "NequIP / Allegro models"

# the running worker's ``_Run`` (None outside NequIPModel.forward)
_RUN = HookState("distmlip_nequip_run")
_HOOK_FLAG = "_distmlip_exchange_hooked"
_FEATURES_KEY = "node_features"  # AtomicDataDict.NODE_FEATURES_KEY (checked on install)

class _LocalRows:
    """Stands in for LAMMPS ML-IAP's data object: NequIP's interaction blocks read ``nlocal``."""

    __slots__ = ("nlocal",)

    def __init__(self, nlocal: int):
        self.nlocal = nlocal


def _import_nequip():
    what = "wrap NequIP / Allegro models"
    data = optional_import("nequip.data", "nequip", what)
    nn = optional_import("nequip.nn", "nequip", what)
    ghost = optional_import("nequip.nn._ghost_exchange_base", "nequip", what)
    GhostExchangeModule, NoOpGhostExchangeModule = ghost.GhostExchangeModule, ghost.NoOpGhostExchangeModule
    ForceStressOutput = optional_import("nequip.nn.grad_output", "nequip", what).ForceStressOutput
    GraphModel = optional_import("nequip.nn.graph_model", "nequip", what).GraphModel
    InteractionBlock = optional_import("nequip.nn.interaction_block", "nequip", what).InteractionBlock
    ConvNetLayer = optional_import("nequip.nn.convnetlayer", "nequip", what).ConvNetLayer
    atomwise = optional_import("nequip.nn.atomwise", "nequip", what)
    ScalarMLP = optional_import("nequip.nn.mlp", "nequip", what).ScalarMLP
    ApplyFactor = optional_import("nequip.nn.misc", "nequip", what).ApplyFactor
    AtomicDataDict, GraphModuleMixin = data.AtomicDataDict, nn.GraphModuleMixin
    return {
        "AtomicDataDict": AtomicDataDict,
        "GraphModuleMixin": GraphModuleMixin,
        "GhostExchangeModule": GhostExchangeModule,
        "NoOpGhostExchangeModule": NoOpGhostExchangeModule,
        "ForceStressOutput": ForceStressOutput,
        "GraphModel": GraphModel,
        "InteractionBlock": InteractionBlock,
        "ConvNetLayer": ConvNetLayer,
        # node-wise modules after the last layer that the steps' readout may hold
        "readout": (ScalarMLP, atomwise.PerTypeScaleShift, atomwise.AtomwiseReduce),
        "ApplyFactor": ApplyFactor,
    }


def _energy_network(obj, nq):
    """The module mapping a data dict to per-atom energies, or None."""
    if isinstance(obj, nq["GraphModel"]):
        obj = obj.model
    if isinstance(obj, nq["ForceStressOutput"]):
        obj = obj.func
    if not isinstance(obj, nq["GraphModuleMixin"]):
        return None
    if nq["AtomicDataDict"].PER_ATOM_ENERGY_KEY not in getattr(obj, "irreps_out", {}):
        return None
    return obj


def _input_dtype() -> torch.dtype:
    try:
        from nequip.utils.global_dtype import _GLOBAL_DTYPE
    except ImportError:  # pragma: no cover - older nequip
        return torch.float64
    return _GLOBAL_DTYPE


def supports(obj) -> bool:
    """True for NequIP-framework energy models (``GraphModel`` as built by ``NequIPGNNModel``,
    ``AllegroModel`` or loaded from a checkpoint; or its ``ForceStressOutput``)."""
    return supported(obj, PACKAGES, lambda o: _energy_network(o, _import_nequip()) is not None)


def _exchange_hook(module, args, output):
    """Forward hook of a ``ghost_exchange``: the halo rows of its field filled from their owners
    (given every row, or only the owned rows when the block truncated them)."""
    run = _RUN.get()
    if run is None:
        return None
    output[module.field] = run.exchange(output[module.field])
    return output


def _slice_hook(module, args, kwargs):
    """Forward pre-hook of the first block's self-connection: inputs cut to the needed rows."""
    run = _RUN.get()
    if run is None or run.needed == run.rows:
        return None

    def trim(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == run.rows:
            return x[: run.needed]
        return x

    return tuple(trim(a) for a in args), {k: trim(v) for k, v in kwargs.items()}


def _pad_hook(module, args, output):
    """Forward hook of a first block whose layer adds a residual (the embedding, on every row):
    its needed-row features padded back to every row (zeros; the next exchange fills them)."""
    run = _RUN.get()
    if run is None or run.needed == run.rows:
        return None
    x = output[_FEATURES_KEY]
    if x.shape[0] == run.needed:
        output[_FEATURES_KEY] = torch.cat([x, x.new_zeros((run.rows - run.needed, *x.shape[1:]))])
    return output


def _trim_hook(module, args, output):
    """Forward hook of that layer: its output cut back to the needed rows (as NequIP's later
    layers, whose residual reads it, expect)."""
    run = _RUN.get()
    if run is None or run.needed == run.rows:
        return None
    x = output[_FEATURES_KEY]
    if x.shape[0] == run.rows:
        output[_FEATURES_KEY] = x[: run.needed]
    return output


def _install_hooks(energy, nq) -> bool:
    """Hook the halo exchange into the blocks' ghost exchanges, and the first block's self-
    connection and residual, once per module. Returns whether the blocks truncate to local
    rows (NequIP's local/ghost path is there)."""
    keys = nq["AtomicDataDict"]
    block_cls = nq["InteractionBlock"]
    truncates = (getattr(keys, "LMP_MLIAP_DATA_KEY", None) is not None
                 and hasattr(block_cls, "_get_mliap_num_local")
                 and keys.NODE_FEATURES_KEY == _FEATURES_KEY)
    if getattr(energy, _HOOK_FLAG, False):
        return truncates
    for sub in energy.modules():
        if isinstance(sub, block_cls):
            ghost = getattr(sub, "ghost_exchange", None)
            if ghost is not None:
                ghost.register_forward_hook(_exchange_hook)
            if getattr(sub, "is_first_layer", False) and isinstance(getattr(sub, "sc", None),
                                                                    torch.nn.Module):
                sub.sc.register_forward_pre_hook(_slice_hook, with_kwargs=True)
        conv = getattr(sub, "conv", None)
        if (isinstance(conv, block_cls) and getattr(conv, "is_first_layer", False)
                and getattr(sub, "resnet", False)):
            conv.register_forward_hook(_pad_hook)
            sub.register_forward_hook(_trim_hook)
    setattr(energy, _HOOK_FLAG, True)
    return truncates


def _layer_structure(energy, nq):
    """``{"prefix", "layers", "readout"}`` (module lists) of a NequIP energy network whose forward
    the layer-protocol steps describe, or ``None`` (the generic path, ``exchanged = None``). It
    must be nequip's module sequence (``SequentialGraphNetwork``: its forward calls its modules in
    order) of exactly: modules before the first layer from ``nequip.nn.embedding`` (the type
    embedding, edge length normalisation and encodings, spherical harmonics: per row or per edge)
    or ``ApplyFactor``; one or more ``ConvNetLayer`` whose convolution is an ``InteractionBlock``
    (not a subclass), the first and only the first marked ``is_first_layer``, its ghost exchange
    on the node features; then only the readout MLP, the per-type scale and shift and the sum
    (no pair potential, whose edge terms the steps do not rebuild)."""
    if type(energy).__name__ != "SequentialGraphNetwork" or not isinstance(energy, torch.nn.Sequential):
        return None
    modules = list(energy._modules.values())
    kinds = [isinstance(m, nq["ConvNetLayer"]) for m in modules]
    if not any(kinds):
        return None
    first = kinds.index(True)
    last = len(kinds) - 1 - kinds[::-1].index(True)
    layers = modules[first:last + 1]
    for i, layer in enumerate(layers):
        block = getattr(layer, "conv", None)
        if type(layer) is not nq["ConvNetLayer"] or type(block) is not nq["InteractionBlock"]:
            return None
        if bool(getattr(block, "is_first_layer", False)) != (i == 0):
            return None
        if getattr(getattr(block, "ghost_exchange", None), "field", None) != _FEATURES_KEY:
            return None
    for m in modules[:first]:
        if not (type(m).__module__.startswith("nequip.nn.embedding") or type(m) is nq["ApplyFactor"]):
            return None
    readout = modules[last + 1:]
    if not readout or any(type(m) not in nq["readout"] for m in readout):
        return None
    return {"prefix": modules[:first], "layers": layers, "readout": readout}


def _element_numbers(type_names, species_map):
    from ase.data import atomic_numbers

    if species_map is None:
        species_map = {t: t for t in type_names}
    if not isinstance(species_map, dict):
        raise TypeError(
            "chemical_species_to_atom_type_map: expected a dict {chemical symbol: type name}, got "
            f"{type(species_map).__name__}"
        )
    out = {}
    for symbol, type_name in species_map.items():
        if symbol not in atomic_numbers:
            raise ValueError(
                "chemical_species_to_atom_type_map: expected chemical symbols as keys (the model's "
                f"type names are {list(type_names)}), got {symbol!r}"
            )
        if type_name not in type_names:
            raise ValueError(
                f"chemical_species_to_atom_type_map: expected type names among {list(type_names)}, "
                f"got {type_name!r} (for {symbol})"
            )
        out[atomic_numbers[symbol]] = type_names.index(type_name)
    return out


class NequIPModel(DistributableModel):
    """A NequIP or Allegro model as a ``DistributableModel``.

    Args:
        module: a NequIP-framework ``GraphModel`` (e.g. from ``nequip.model.NequIPGNNModel`` or
            ``allegro.model.AllegroModel``), or the ``ForceStressOutput`` inside one. It is not
            modified: the adapter deep-copies it (``.module``) and adds hooks, inert outside
            distmlip, to the copy's ``ghost_exchange`` submodules (and first interaction block).
        chemical_species_to_atom_type_map: ``{chemical symbol: model type name}``; by default the
            model's type names are taken to be chemical symbols (as NequIP's calculator does).
        num_layers: override the receptive field (in hops) the adapter infers.
    """

    def __init__(self, module, *, chemical_species_to_atom_type_map: dict | None = None,
                 num_layers: int | None = None):
        super().__init__()
        nq = _import_nequip()
        energy = _energy_network(module, nq)
        if energy is None:
            raise TypeError(
                "module: expected a NequIP-framework GraphModel predicting per-atom energies, got "
                f"{type(module).__module__}.{type(module).__name__}"
            )
        for sub in energy.modules():
            if isinstance(sub, nq["GhostExchangeModule"]) and not isinstance(
                    sub, nq["NoOpGhostExchangeModule"]):
                raise ValueError(
                    f"module: its ghost exchange was replaced by {type(sub).__name__} (a LAMMPS "
                    "build); wrap the model as built or loaded from a checkpoint"
                )
            if len(getattr(sub, "categorical_graph_field_embed_modules", ())) > 0:
                raise ValueError(
                    "module: NequIP models with categorical graph-field embeddings (charge, spin) "
                    "are not supported by the distmlip adapter"
                )
        type_names = self._type_names(module, energy)
        self.type_names = tuple(type_names)
        self.cutoff = self._r_max(module, energy)
        blocks = [m for m in energy.modules() if isinstance(m, nq["InteractionBlock"])]
        inferred = max(1, len(blocks))
        if num_layers is None:
            if not blocks and not self._is_allegro(energy):
                raise ValueError(
                    "num_layers: could not infer the receptive field of this "
                    f"{type(energy).__name__} (no NequIP interaction block, not Allegro); pass "
                    "num_layers=<message-passing layers> to wrap()"
                )
            num_layers = inferred
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
        self.num_layers = num_layers
        self.module = private_copy(module)  # hooked below: the caller's module is not modified
        self.energy = _energy_network(self.module, nq)
        energy = self.energy
        keys = nq["AtomicDataDict"]
        self._keys = (keys.POSITIONS_KEY, keys.ATOM_TYPE_KEY, keys.EDGE_INDEX_KEY,
                      keys.EDGE_VECTORS_KEY, keys.PER_ATOM_ENERGY_KEY)
        self.elements = ElementTable(_element_numbers(list(type_names), chemical_species_to_atom_type_map),
                                     "this NequIP model")
        truncates = _install_hooks(energy, nq)
        # the key NequIP's blocks read the local row count from (None: no truncation)
        self._local_key = keys.LMP_MLIAP_DATA_KEY if truncates and blocks else None
        # the layer protocol, for a NequIP layout the steps describe (checked on this instance).
        # Allegro exchanges nothing (strictly local, num_layers 1): no steps, exchanged stays None.
        self._layers = None if self._is_allegro(energy) else _layer_structure(energy, nq)
        if self._layers is not None and any(
                p.is_floating_point() and p.dtype != torch.float64
                for layer in self._layers["layers"] for p in layer.parameters()):
            # float32 layers (model_dtype): the steps sum each layer's share of the edge gradient
            # in float64 where forward sums them in float32 (~1e-7 apart), beyond the 1e-10 the
            # runtime's probe asks of float64 edge vectors: the generic path
            self._layers = None
        self.exchanged = None if self._layers is None else (1,)
        self._field_keys = (keys.NODE_FEATURES_KEY, keys.NODE_ATTRS_KEY, keys.EDGE_ATTRS_KEY,
                            keys.EDGE_EMBEDDING_KEY)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the edge vectors the model reads: NequIP's global dtype (float64)."""
        return _input_dtype()

    def to(self, *args, **kwargs):
        """``Module.to`` moving devices only: NequIP models keep the precision they were built
        with (see the module docstring); a cast to another dtype than float64 is refused."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != _input_dtype():
            raise ValueError(
                f"dtype: a NequIP/Allegro model runs in the precision it was built with (its "
                f"model_dtype for the layers, {_input_dtype()} for geometry); pass dtype=None or "
                f"float64, got {dtype} (build the model with model_dtype='float32' for float32 "
                "layers)"
            )
        if device is None:
            return self
        return super().to(device=device, non_blocking=non_blocking)

    @staticmethod
    def _is_allegro(energy) -> bool:
        return any(type(m).__module__.split(".")[0] == "allegro" for m in energy.modules())

    @staticmethod
    def _type_names(model, energy) -> list:
        names = list(getattr(model, "type_names", None) or [])
        if not names:
            for sub in energy.modules():
                if getattr(sub, "type_names", None):
                    names = list(sub.type_names)
                    break
        if not names:
            raise ValueError("model: could not find the model's type_names")
        return names

    @staticmethod
    def _r_max(model, energy) -> float:
        metadata = {}
        try:
            metadata = model.metadata if hasattr(model, "metadata") else {}
        except Exception:  # noqa: BLE001 - metadata is optional
            metadata = {}
        if "r_max" in metadata:
            return float(metadata["r_max"])
        values = [float(m.r_max) for m in energy.modules()
                  if isinstance(getattr(m, "r_max", None), (int, float))]
        if not values:
            raise ValueError("model: could not find the model's cutoff (r_max)")
        return max(values)

    def _atom_types(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.elements(numbers)

    def _data(self, graph: LocalGraph, run: _Run | None = None) -> dict:
        """NequIP's input data dict of ``graph`` (every row), with the local row count NequIP's
        blocks truncate to when the node-wise work is narrowed (``run.needed``)."""
        pos_key, type_key, index_key, vec_key, _ = self._keys
        n = graph.num_nodes
        vec = graph.edge_vec
        data = {
            pos_key: torch.zeros(n, 3, dtype=vec.dtype, device=vec.device),
            type_key: self._atom_types(graph.numbers),
            index_key: graph.edge_index.flip(0),
            vec_key: vec,
        }
        run = _Run(graph) if run is None else run
        if self._local_key is not None and run.needed < run.rows:
            data[self._local_key] = _LocalRows(run.needed)
        return data

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        run = _Run(graph)
        data = self._data(graph, run)
        with _RUN.active(run):
            out = self.energy(data)
        return out[self._keys[4]].reshape(-1)

    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps the runtime calls one at a time (see
    # ``DistributableModel``), for the layouts ``_layer_structure`` accepts. Layer i is a
    # ``ConvNetLayer``: its ``InteractionBlock`` computes the self-connection ``sc`` of its input
    # features h (needed rows), ``x = norm(linear_1(h))`` (what the ghost exchange, here
    # ``halo_exchange``, completes on every row), the tensor-product scatter of x over the edges
    # (needed rows), ``linear_2`` and ``+ sc``; the layer then applies its nonlinearity and its
    # residual ``+ h``. The state is ``(h, x)``: h on the needed rows, x on every row (exchanged).
    # ``embed`` is the modules before the first layer (type embedding, edge encodings: exact on
    # every row) and the first block's x of the embedding, on every row as forward computes it;
    # step i is layer i and the next block's x of its output; the last step returns ``(h,)`` and
    # ``energies`` runs the readout, the per-type scale and shift. Every step rebuilds the modules
    # before the first layer (edge attributes and embedding from ``graph.edge_vec``: each step's
    # share of the forces stays differentiable).

    @property
    def num_steps(self) -> int:
        """Layer protocol: one step per ``ConvNetLayer`` (``num_layers`` if there are no steps)."""
        return int(self.num_layers) if self._layers is None else len(self._layers["layers"])

    def _context(self, graph: LocalGraph) -> dict:
        """The data dict after the modules before the first layer (every row)."""
        data = self._data(graph)
        for module in self._layers["prefix"]:
            data = module(data)
        return data

    def _exchanged(self, layer, h: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """What ``layer``'s block convolves: ``linear_1`` of h, normalised by the average number
        of neighbours (per type of h's rows)."""
        feature = self._field_keys[0]
        block = layer.conv
        data = {feature: block.linear_1(h), self._keys[1]: types}
        return block.avg_num_neighbors_norm(data)[feature]

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The embedded node features h and the first block's x of them, every row."""
        data = self._context(graph)
        h = data[self._field_keys[0]]
        return h, self._exchanged(self._layers["layers"][0], h, data[self._keys[1]])

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Layer ``i`` on the needed rows, and the next block's x of its output."""
        _, attrs_key, edge_attrs_key, edge_embedding_key = self._field_keys
        h, x = state
        needed = graph.num_needed
        h = h[:needed]
        layers = self._layers["layers"]
        layer = layers[i]
        block = layer.conv
        data = self._context(graph)
        index = data[self._keys[2]]
        if block.sc is not None:
            sc = block.sc(h, data[attrs_key][:needed])
        y = block.tp_scatter(x=x, edge_attr=data[edge_attrs_key],
                             edge_weight=block.edge_mlp(data[edge_embedding_key]),
                             edge_dst=index[0], edge_src=index[1])[:needed]
        y = block.linear_2(y)
        if block.sc is not None:
            y = y + sc
        y = layer.equivariant_nonlin(y)
        if layer.resnet:
            y = h + y
        if i + 1 < len(layers):
            return y, self._exchanged(layers[i + 1], y, data[self._keys[1]][:needed])
        return (y,)

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout and the per-type scale and shift of the last layer's features."""
        data = self._context(graph)
        data[self._field_keys[0]] = state[0][: graph.num_needed]
        for module in self._layers["readout"]:
            data = module(data)
        return data[self._keys[4]].reshape(-1)


#: ``NequIPModel(obj, **options)``; ``obj`` is deep-copied, not modified
wrap = wrap_with(NequIPModel, OPTIONS, _WHAT)
load = no_pretrained_load("NequIP", OPTIONS, _WHAT)
