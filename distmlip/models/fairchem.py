"""fairchem's eSCN-MD (UMA) models as a ``DistributableModel``.

``distmlip.wrap(obj, task="omat")`` accepts

- a ``fairchem.core.models.base.HydraModelV2`` or ``HydraModel`` whose backbone is an
  ``eSCNMDBackbone`` or the mixture-of-experts ``eSCNMDMoeBackbone`` (UMA's architecture, experts
  merged or not) and whose heads include one energy (or energy/forces/stress) head
  (``MLP_EFS_Head`` / ``MLP_Energy_Head`` with ``reduce="sum"``, possibly inside UMA's
  ``DatasetSpecificSingleHeadWrapper`` or ``DatasetSpecificMoEWrapper``): the model's own output;
- what a ``FAIRChemCalculator`` holds: an ``MLIPPredictUnit`` (what
  ``pretrained_mlip.get_predict_unit`` returns for a checkpoint), or the calculator itself (its
  task is the default). The predict unit's energy is the model's, denormalised by the task's
  normaliser, plus its element references: distmlip's energy includes both, as the calculator's
  does.

The adapter runs the backbone's own modules in the backbone's order (each block composed from its
own submodules, see below); only the halo exchanges are added.

Mixture of experts (``eSCNMDMoeBackbone`` with ``num_experts > 0``): fairchem mixes each expert
layer's weights with coefficients from a routing MLP of the system's embedding (its task, charge
and spin) and of the mean composition embedding over the *whole* system's atoms. A part computes
that mean from ``LocalGraph.composition`` (the whole system's element counts, on every part:
sum over elements of count x embedding / N), so every part mixes the experts exactly as fairchem
does for the whole system; the coefficients do not depend on positions. The mixed weights are set
on the model's shared expert state for each evaluation (every part of one system sets the same).
A predict unit whose experts were already merged for one composition (fairchem's ``merge_mole``
after a first prediction) is accepted too; a system of another reduced composition, task, charge
or spin is then refused, as fairchem refuses it (or merges again).

Conventions (fairchem → distmlip): fairchem's ``edge_index`` is ``[source; target]``, messages are
summed onto the target (``edge_index[1]``) and its edge vector is ``pos[source] - pos[target] +
offsets @ cell``: exactly distmlip's ``edge_index`` and ``edge_vec``.

Halo exchanges and zero redundant node work: the edge-degree embedding already sums over each
atom's edges (``num_layers`` = blocks + 1 hops). fairchem's ``eSCNMD_Block`` is ``x + edge_wise(y)``
then ``x + atom_wise(norm_2(x))`` with ``y = norm_1(x)`` plus the system embedding on the scalar
channel: the messages read ``y`` only. The adapter composes each block from those submodules (same
weights, same operations in the same order) so that node-wise work runs on the first
``graph.num_needed`` rows only (the owned rows in halo mode): the embedding's sum over edges,
``norm_1``, the residuals, ``norm_2``, the atom-wise feed-forward, the final norm and the energy
head; ``y`` (``(rows, (lmax+1)^2, C)``, the volume of ``x``) is what is exchanged before every
block, and the messages of every edge (read from every row) are summed onto the needed rows.
The same computation is the layer protocol's steps (``embed``/``step``/``energies``, state
``(x, y)``, ``exchanged = (1,)``; see the section "the layer protocol" below).

The task (``task=``: the dataset embedding, e.g. ``"omat"``, ``"omol"``), total ``charge`` and
``spin`` are options of ``wrap``: they are per system, the same for every part.

Not supported (``ValueError``): charge/spin-balanced channels, direct force heads,
``reduce="mean"`` energy heads, a predict unit whose force or stress normaliser is not the
energy's (forces would then not be the energy's gradient). The predict unit's lookup table for
single isolated atoms is not used (the model is evaluated on them).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ._adapter import ElementTable, no_pretrained_load, optional_import, private_copy, supported, wrap_with
from .base import DistributableModel, LocalGraph

__all__ = ["OPTIONS", "PACKAGES", "PRETRAINED", "UMAModel", "load", "supports", "wrap"]

PACKAGES = ("fairchem",)
PRETRAINED: dict[str, str] = {}  # UMA's weights download at run time (and are gated)
OPTIONS = ("charge", "spin", "task")
_WHAT = "fairchem models"


#: Experts' rows processed per call: larger than any part (fairchem's per-system segment sizes).
_ONE_SYSTEM = 1 << 62


def _fairchem():
    what = "wrap fairchem UMA models"
    base = optional_import("fairchem.core.models.base", "fairchem", what)
    escn = optional_import("fairchem.core.models.uma.escn_md", "fairchem", what)
    return (base.HydraModelV2, base.HydraModel), escn.eSCNMDBackbone


def _unwrap(obj):
    """(hydra model, tasks or None, default task or None) of a model, a predict unit or a
    ``FAIRChemCalculator``."""
    task = None
    if hasattr(obj, "predictor") and hasattr(obj, "task_name"):  # a FAIRChemCalculator
        task, obj = obj.task_name, obj.predictor
    if hasattr(obj, "model") and hasattr(obj, "dataset_to_tasks"):  # an MLIPPredictUnit
        model = obj.model
        model = getattr(model, "module", model)  # fairchem's AveragedModel / _ModelWrapper
        return model, dict(obj.tasks), task
    return obj, None, task


def supports(obj) -> bool:
    """Whether ``obj`` is a fairchem Hydra model with an eSCN-MD backbone, an ``MLIPPredictUnit``
    holding one, or a ``FAIRChemCalculator``."""
    return supported(obj, PACKAGES, _is_uma, errors=(ImportError, AttributeError))


def _is_uma(obj) -> bool:
    hydras, backbone = _fairchem()
    model = _unwrap(obj)[0]
    return isinstance(model, hydras) and isinstance(getattr(model, "backbone", None), backbone)


def _energy_head(module):
    """The one energy head (``energy_block``) of the Hydra model, unwrapped from UMA's
    dataset-specific wrappers."""
    heads = []
    for h in module.output_heads.values():
        inner = getattr(h, "head", h)
        if hasattr(inner, "energy_block"):
            heads.append((h, inner))
    if len(heads) != 1:
        raise ValueError(f"module: expected one energy head (MLP_EFS_Head / MLP_Energy_Head), "
                         f"got {len(heads)} among {list(module.output_heads)}")
    return heads[0]


class UMAModel(DistributableModel):
    """A fairchem ``HydraModelV2`` with an eSCN-MD backbone, split exactly.

    Args:
        module: the ``HydraModelV2`` / ``HydraModel``, an ``MLIPPredictUnit`` or a
            ``FAIRChemCalculator``.
        task: the dataset (task) embedding to use, e.g. ``"omat"`` (default: the calculator's, or
            the only one if the model has one).
        charge, spin: the system's total charge and spin multiplicity (default: the
            ``FAIRChemCalculator``'s, charge 0 and spin 1 for the "omol" task, 0 otherwise).

    Attributes:
        module: a copy of the Hydra model; ``cutoff``: the backbone's; ``num_layers``: blocks + 1
        (also the layer protocol's ``num_steps``);
        ``num_experts``: unmerged experts (0: none); ``energy_scale``, ``energy_shift`` (eV, per
        system) and ``references`` (per element, eV): the predict unit's denormalisation and
        element references (1, 0 and ``None`` for a bare model).
    """

    def __init__(self, module, *, task: str | None = None, charge: int = 0,
                 spin: int | None = None):
        super().__init__()
        hydra_cls, backbone_cls = _fairchem()
        source = module
        module, tasks, default_task = _unwrap(module)
        if task is None:
            task = default_task
        if not (isinstance(module, hydra_cls) and isinstance(getattr(module, "backbone", None),
                                                             backbone_cls)):
            raise TypeError(f"module: expected a fairchem HydraModelV2/HydraModel with an eSCN-MD "
                            f"backbone, an MLIPPredictUnit or a FAIRChemCalculator, got "
                            f"{type(source).__module__}.{type(source).__name__}")
        bb = module.backbone
        if bb.charge_channel_end > bb.charge_channel_start or bb.spin_channel_end > bb.spin_channel_start:
            raise ValueError("module: expected no charge/spin-balanced channels, got some "
                             "(a system-wide balance, not supported yet)")
        if bb.regress_config.direct_forces:
            raise ValueError("module: expected forces from the energy's gradient, got "
                             "direct_forces=True (a direct force head)")
        wrapper, head = _energy_head(module)
        if head.reduce != "sum":
            raise ValueError(f"module: expected an energy head with reduce='sum', got "
                             f"{head.reduce!r}")
        names = sorted(getattr(bb, "dataset_mapping", None) or {})
        if tasks is not None:
            names = sorted({d for t in tasks.values() for d in t.datasets}) or names
        if bb.use_dataset_embedding or tasks is not None:
            if task is None and len(names) == 1:
                task = names[0]
            if task not in names:
                raise ValueError(f"task: expected one of {names}, got {task!r}")
        self.task = task
        if spin is None:  # fairchem's calculator: multiplicity 1 for molecules (omol), else 0
            spin = 1 if task == "omol" else 0
        self.charge, self.spin = int(charge), int(spin)
        self.energy_scale, self.energy_shift = 1.0, 0.0
        self.register_buffer("references", None)
        if tasks is not None:
            self._predict_unit_outputs(tasks, task)
        self.merged = getattr(bb, "_merged_composition", None)
        if self.merged is not None:
            self._check_merged_conditions()
        # a copy: the adapter merges the energy head's experts and sets the expert coefficients
        # on the model's shared state; the caller's module is not modified
        self.module = private_copy(module)
        wrapper = next(h for h in self.module.output_heads.values()
                       if hasattr(getattr(h, "head", h), "energy_block"))
        if type(wrapper).__name__ == "DatasetSpecificMoEWrapper" and wrapper.merged_on_dataset is None:
            if task not in wrapper.dataset_name_to_exp:
                raise ValueError(f"task: expected one of {sorted(wrapper.dataset_name_to_exp)} "
                                 f"(the energy head's experts), got {task!r}")
            dtype = next(self.module.parameters()).dtype
            wrapper.merge_MOLE_model(SimpleNamespace(dataset=[task], pos=torch.zeros(1, dtype=dtype)))
        if type(wrapper).__name__.startswith("DatasetSpecific") and \
                wrapper.merged_on_dataset not in (None, task):
            raise ValueError(f"task: expected {wrapper.merged_on_dataset!r} (the energy head was "
                             f"merged for it), got {task!r}")
        self.head = getattr(wrapper, "head", wrapper)
        bb = self.module.backbone
        self.num_experts = int(getattr(bb, "num_experts", 0) or 0)
        self.cutoff = float(bb.cutoff)
        self.num_layers = len(bb.blocks) + 1
        # the embedding row of atomic number z is z
        self.elements = ElementTable({z: z for z in range(1, bb.sphere_embedding.num_embeddings)},
                                     "this UMA model")

    def _predict_unit_outputs(self, tasks: dict, task: str) -> None:
        """The predict unit's energy = scale * model energy + shift + sum of element references,
        from the task's normalisers; its forces and stress must use the same scale (then they are
        the gradient of that energy)."""
        by_property = {}
        for t in tasks.values():
            if task in t.datasets:
                by_property.setdefault(t.property, t)
        if "energy" not in by_property:
            raise ValueError(f"task: expected a task with an energy output, got none for {task!r} "
                             f"among {sorted(tasks)}")
        energy = by_property["energy"]
        scale = float(energy.normalizer.rmsd)
        for name in ("forces", "stress"):
            other = by_property.get(name)
            if other is None:
                continue
            if float(other.normalizer.rmsd) != scale or float(other.normalizer.mean) != 0.0:
                raise ValueError(
                    f"module: expected the {name} normaliser of task {task!r} to scale like the "
                    f"energy's (rmsd {scale:g}, mean 0), got rmsd "
                    f"{float(other.normalizer.rmsd):g}, mean {float(other.normalizer.mean):g}: "
                    f"its {name} would not be the energy's gradient")
        self.energy_scale, self.energy_shift = scale, float(energy.normalizer.mean)
        refs = energy.element_references
        if refs is not None:
            self.register_buffer("references", refs.element_references.detach().clone().double())

    def _check_merged_conditions(self) -> None:
        """A backbone merged for one system by fairchem: the task, charge and spin must be those
        it was merged with (the composition is checked per call)."""
        _, charge, spin, dataset = self.merged
        def value(v):
            return v.reshape(-1)[0].item() if isinstance(v, torch.Tensor) else v
        got = {"task": self.task, "charge": self.charge, "spin": self.spin}
        want = {"task": list(dataset)[0] if dataset is not None else self.task,
                "charge": value(charge) if charge is not None else self.charge,
                "spin": value(spin) if spin is not None else self.spin}
        for key in got:
            if got[key] != want[key]:
                raise ValueError(
                    f"{key}: expected {want[key]!r} (the experts of this predict unit were merged "
                    f"for it), got {got[key]!r}; pass a predict unit that has not predicted yet, "
                    f"or one loaded with inference_settings merge_mole=False")

    def _set_experts(self, graph: LocalGraph, csd: torch.Tensor) -> None:
        """The expert coefficients of the whole system (fairchem's ``set_MOLE_coefficients``
        with the mean composition embedding over every atom computed from ``graph.composition``),
        set on the shared expert state, with one segment covering any part's edges."""
        bb = self.module.backbone
        embeddings = []
        if bb.use_composition_embedding:
            table = bb.composition_embedding.weight
            counts = graph.composition[: table.shape[0]].to(table.dtype)
            n = max(graph.num_system_atoms, 1)
            if getattr(bb, "model_id", None) == "UMA-S-1.2":  # fairchem: the zero self value counts
                n = graph.num_system_atoms + 1
            embeddings.append((counts @ table / n).unsqueeze(0))
        embeddings.append(csd)
        with torch.autocast(device_type=csd.device.type, enabled=False):
            logits = bb.routing_mlp(torch.cat(embeddings, dim=1))
            coefficients = bb.mole_expert_coefficient_norm(bb.mole_dropout(logits))
        state = bb.global_mole_tensors
        state.expert_mixing_coefficients = coefficients.detach()
        state.mole_sizes = torch.tensor([_ONE_SYSTEM])
        state.ac_start_idx = 0

    def _check_merged_composition(self, graph: LocalGraph) -> None:
        merged = self.merged[0].to("cpu").double()
        counts = graph.composition.to("cpu").double()
        size = max(len(merged), len(counts))
        merged = torch.nn.functional.pad(merged, (0, size - len(merged)))
        counts = torch.nn.functional.pad(counts, (0, size - len(counts)))
        if not torch.allclose(merged / merged.sum(), counts / max(counts.sum(), 1.0), rtol=1e-5, atol=0):
            raise ValueError(
                "numbers: expected the reduced composition the experts of this predict unit were "
                "merged for (fairchem's merge_mole after its first prediction), got another; pass "
                "a predict unit that has not predicted yet, or one loaded with inference_settings "
                "merge_mole=False")

    # ------------------------------------------------------------------ the pieces
    def _system(self, graph: LocalGraph) -> torch.Tensor:
        """The system embedding ``csd`` ``(1, C)`` (task, charge, spin); the experts' coefficients
        set for the whole system (or, experts merged by fairchem, its composition checked)."""
        bb = self.module.backbone
        device = graph.edge_vec.device
        charge = torch.tensor([self.charge], device=device, dtype=torch.long)
        spin = torch.tensor([self.spin], device=device, dtype=torch.long)
        csd = bb.csd_embedding(charge=charge, spin=spin, dataset=[self.task])
        if self.num_experts > 0:
            self._set_experts(graph, csd)
        elif self.merged is not None:
            self._check_merged_composition(graph)
        return csd

    def _edges(self, graph: LocalGraph, numbers: torch.Tensor) -> SimpleNamespace:
        """What the blocks read of the edges, from ``graph.edge_vec`` (differentiable):
        ``edge_index``, ``x_edge`` (distance expansion, source and target element embeddings),
        ``per_layer`` (the backend's radial input of each block), ``wigner`` and
        ``wigner_inv_envelope`` (the backend's rotations, the envelope fused into the inverse)."""
        bb = self.module.backbone
        vec, edge_index = graph.edge_vec, graph.edge_index
        if edge_index.shape[1] == 0:  # fairchem's own fix-up: one self-loop beyond the cutoff
            edge_index = torch.zeros((2, 1), dtype=torch.long, device=vec.device)
            vec = vec.new_tensor([[bb.cutoff + 1.0, 0.0, 0.0]]) + 0.0 * vec.sum()
        dist = torch.linalg.norm(vec, dim=-1)
        wigner, wigner_inv = bb._get_rotmat_and_wigner(vec)
        coefficient_index = bb.coefficient_index if bb.mmax != bb.lmax else None
        wigner, wigner_inv = bb.backend.prepare_wigner(wigner, wigner_inv, bb.mappingReduced,
                                                       coefficient_index)
        envelope = bb.envelope(dist / bb.cutoff).reshape(-1, 1)
        x_edge = torch.cat((bb.distance_expansion(dist), bb.source_embedding(numbers[edge_index[0]]),
                            bb.target_embedding(numbers[edge_index[1]])), dim=1)
        if wigner_inv.ndim == 3:
            envelope = envelope.unsqueeze(-1)
        return SimpleNamespace(edge_index=edge_index, x_edge=x_edge, wigner=wigner,
                               wigner_inv_envelope=wigner_inv * envelope,
                               per_layer=bb.backend.get_layer_radial_emb(x_edge, bb))

    def _width(self) -> tuple[int, int]:
        bb = self.module.backbone
        return bb.sph_feature_size, bb.sphere_channels

    def _start(self, block, x: torch.Tensor, csd: torch.Tensor) -> torch.Tensor:
        """The node-wise start of ``block`` on the rows of ``x``: ``norm_1(x)`` plus the system
        embedding on the scalar channel (what the block's messages read: exchanged)."""
        y = block.norm_1(x)
        y[:, 0, :] = y[:, 0, :] + csd
        return y

    @staticmethod
    def _edge_wise(edge_wise, y: torch.Tensor, rows: int, x_edge, edges) -> torch.Tensor:
        """fairchem's ``Edgewise.forward`` (no graph parallelism) with the messages of every edge
        read from ``y`` (every local row) and summed onto the first ``rows`` rows (every edge's
        receiver is among them), in fairchem's edge chunks when it checkpoints them."""
        args = (edges.wigner, edges.wigner_inv_envelope)
        chunk = edge_wise.activation_checkpoint_chunk_size
        if chunk is None:
            return edge_wise.forward_chunk(y, rows, x_edge, edges.edge_index, *args, edges.edge_index[1])
        pieces = zip(edges.edge_index.split(chunk, dim=1), edges.wigner.split(chunk, dim=0),
                     edges.wigner_inv_envelope.split(chunk, dim=0), x_edge.split(chunk, dim=0),
                     strict=True)
        out, start = [], 0
        for edge_index, wigner, wigner_inv, x_e in pieces:
            out.append(torch.utils.checkpoint.checkpoint(
                edge_wise.forward_chunk, y, rows, x_e, edge_index, wigner, wigner_inv,
                edge_index[1], start, use_reentrant=False))
            start += edge_index.shape[1]
            if len(out) > 8:
                out = [torch.stack(out).sum(axis=0)]
        return torch.stack(out).sum(axis=0)

    def _step(self, i: int, graph: LocalGraph, state, csd: torch.Tensor, edges) -> tuple[torch.Tensor, ...]:
        bb = self.module.backbone
        needed, blocks = graph.num_needed, bb.blocks
        if i == 0:  # the edge-degree embedding: the element embedding plus a sum over edges
            x = torch.zeros((needed, *self._width()), dtype=state[0].dtype, device=state[0].device)
            x[:, 0, :] = state[0][:needed]
            x = bb.edge_degree_embedding(x, edges.x_edge, edges.edge_index[1],
                                         edges.wigner_inv_envelope)
        else:  # the rest of block i - 1 (fairchem's eSCNMD_Block.forward) on the needed rows
            block = blocks[i - 1]
            x = self._edge_wise(block.edge_wise, state[1], needed, edges.per_layer[i - 1], edges)
            x = x + state[0][:needed]
            x = x + block.atom_wise(block.norm_2(x))
        if i < len(blocks):
            return x, self._start(blocks[i], x, csd)
        return (x,)

    def _readout(self, graph: LocalGraph, x: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """The final norm and the energy head on the needed rows, denormalised, with the
        element references."""
        needed = graph.num_needed
        x = self.module.backbone.norm(x[:needed])
        energies = self.head.energy_block(x[:, 0, :]).view(-1)
        if self.energy_scale != 1.0 or self.energy_shift != 0.0:
            energies = self.energy_scale * energies + self.energy_shift / max(graph.num_system_atoms, 1)
        if self.references is not None:
            energies = energies + self.references.to(energies.dtype)[numbers[:needed]]
        return energies

    def _empty(self, graph: LocalGraph, *shape: int) -> torch.Tensor:
        return torch.zeros((0, *shape), dtype=graph.edge_vec.dtype, device=graph.edge_vec.device)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        csd = self._system(graph)
        if graph.num_nodes == 0:  # an empty part: fairchem's layers need an edge; just meet the others
            for _ in self.module.backbone.blocks:
                graph.halo_exchange(self._empty(graph, *self._width()))
            return self._empty(graph)
        numbers = self.elements(graph.numbers)
        edges = self._edges(graph, numbers)  # once for every step (the steps recompute their own)
        state = (self.module.backbone.sphere_embedding(numbers) + csd,)
        for i in range(self.num_steps):
            if i > 0:  # the block about to run reads its neighbours' normalised features
                state = (state[0], graph.halo_exchange(state[1]))
            state = self._step(i, graph, state, csd, edges)
        return self._readout(graph, state[0], numbers)

    # ------------------------------------------------------------------ the layer protocol
    # ``forward`` is these steps with an exchange between them (see ``DistributableModel``):
    # ``embed`` gives the element embedding plus the system embedding of every row (a lookup:
    # exact on the halo); step 0 is the edge-degree embedding (a sum over each atom's edges) and
    # the first block's ``norm_1``; step i (1 .. blocks) the rest of block i - 1 (messages from
    # every row, summed onto the needed rows; residual, ``norm_2``, atom-wise feed-forward,
    # residual) and the next block's ``norm_1``. The state is ``(x, y)``: the node features on the
    # needed rows and the next block's normalised features (plus the system embedding) on every
    # row (exchanged: what its messages read); the last step returns ``(x,)``. Every step (and
    # ``embed``) sets the experts' coefficients of the whole system (from ``graph.composition``,
    # the same for every part) and rebuilds the edge quantities from ``graph.edge_vec``.

    #: Layer protocol: state entry 1 (the next block's normalised features) is read on halo rows.
    exchanged = (1,)

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The element embedding plus the system embedding of every row, ``(n, C)``."""
        csd = self._system(graph)
        if graph.num_nodes == 0:
            return (self._empty(graph, self._width()[1]),)
        return (self.module.backbone.sphere_embedding(self.elements(graph.numbers)) + csd,)

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Step ``i`` (see above) on the needed rows."""
        csd = self._system(graph)
        if graph.num_nodes == 0:
            empty = self._empty(graph, *self._width())
            return (empty, empty) if i < len(self.module.backbone.blocks) else (empty,)
        return self._step(i, graph, state, csd, self._edges(graph, self.elements(graph.numbers)))

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The final norm and the energy head of the last block's features."""
        if graph.num_nodes == 0:
            return self._empty(graph)
        return self._readout(graph, state[0], self.elements(graph.numbers))


#: ``UMAModel(obj, **options)``; ``obj`` is copied, not modified
wrap = wrap_with(UMAModel, OPTIONS, _WHAT)
load = no_pretrained_load("UMA", OPTIONS, _WHAT)
