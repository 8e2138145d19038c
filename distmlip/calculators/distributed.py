"""The ASE calculator: Atoms -> graph -> plan -> workers -> gathered results."""

from __future__ import annotations

import time

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..graph import NeighborGraph, as_ase_atoms
from ..models.base import DistributableModel
from ..partition import MODES, PARTITIONERS, PartitionPlan
from ..runtime.local import Evaluation, InProcessRunner

__all__ = ["DistributedCalculator"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected None, torch.float32/torch.float64 or one of {list(_DTYPES)}, got {dtype!r}")


def _parse_devices(device) -> list[torch.device]:
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("device: expected a device or a non-empty list of devices, got []")
    out = []
    for item in items:
        try:
            out.append(torch.device(item))
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {item!r}") from None
    return out


class DistributedCalculator(Calculator):
    """An ASE calculator evaluating a message-passing potential on a partitioned graph.

    Gives the same energy, forces, stress and per-atom energies as the unpartitioned model (up to
    floating-point summation order).

    Args:
        model: a ``DistributableModel`` (see ``distmlip.models``).
        num_partitions: number of parts (>= 1; more parts than atoms is legal).
        partitioner: ``"grid"`` (recursive coordinate bisection, default), ``"slab"`` (1-D cuts
            balanced by atom count) or ``"metis"`` (pymetis graph partitioning).
        mode: ``"halo"`` (one-hop halo, exchange between layers, zero redundancy) or
            ``"extended"`` (halo as deep as the model's layers, no exchange).
        device: a device, or a list of devices the parts are spread over round-robin (one worker
            each).
        dtype: ``None`` (the model's), ``torch.float32``/``torch.float64`` or ``"float32"``/``"float64"``.

    Results: ``energy``/``free_energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress`` (Voigt, eV/Å^3,
    ASE's sign; only for cells of full rank), ``energies`` (N,) eV. After each calculation
    ``last_plan``, ``last_graph`` and ``timings`` (seconds per stage) describe what was done.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: DistributableModel, num_partitions: int = 1, partitioner: str = "grid",
                 mode: str = "halo", device="cpu", dtype=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, DistributableModel):
            raise TypeError(
                f"model: expected a distmlip.models.DistributableModel, got {type(model).__name__}"
            )
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
            raise TypeError(f"num_partitions: expected an integer >= 1, got {num_partitions!r}")
        if num_partitions < 1:
            raise ValueError(f"num_partitions: expected an integer >= 1, got {num_partitions}")
        if partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        self.model = model
        self.num_partitions = int(num_partitions)
        self.partitioner = partitioner
        self.mode = mode
        self.devices = _parse_devices(device)
        self.dtype = _parse_dtype(dtype)
        self.runner = InProcessRunner(model, self.devices, self.dtype)
        self.last_plan: PartitionPlan | None = None
        self.last_graph: NeighborGraph | None = None
        self.timings: dict[str, float] = {}

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if properties is None:
            properties = self.implemented_properties
        if atoms is not None:
            atoms = as_ase_atoms(atoms)
        Calculator.calculate(self, atoms, properties, system_changes)
        t0 = time.perf_counter()
        graph = NeighborGraph.from_atoms(self.atoms, self.model.cutoff)
        t1 = time.perf_counter()
        hops = self.model.num_layers if self.mode == "extended" else self.model.halo_depth
        plan = PartitionPlan.build(graph, self.num_partitions, self.partitioner, self.mode, hops)
        t2 = time.perf_counter()
        result = self.runner.evaluate(graph, plan)
        t3 = time.perf_counter()
        self.last_graph, self.last_plan = graph, plan
        self.timings = {"graph": t1 - t0, "partition": t2 - t1, "evaluate": t3 - t2, "total": t3 - t0}
        self._store(result, graph)

    def _store(self, result: Evaluation, graph: NeighborGraph) -> None:
        self.results = {
            "energy": result.energy,
            "free_energy": result.energy,
            "energies": result.energies,
            "forces": result.forces,
        }
        if self.atoms.cell.rank == 3:
            stress = result.virial / abs(np.linalg.det(graph.cell))
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]].copy()

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name == "stress" and (atoms or self.atoms) is not None and (atoms or self.atoms).cell.rank < 3:
            raise PropertyNotImplementedError(
                "stress: needs a cell with three independent lattice vectors; this system's cell "
                "has rank < 3 (a molecule or a slab without a vacuum vector)"
            )
        return super().get_property(name, atoms, allow_calculation)
