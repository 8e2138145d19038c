"""The ASE calculator: Atoms -> graph -> plan -> workers -> gathered results."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..graph import NeighborGraph, as_ase_atoms
from ..models.base import DistributableModel
from ..partition import MODES, PARTITIONERS, PartitionPlan
from ..runtime import Evaluation, Runner, detect_launch, init_distributed

__all__ = ["DistributedCalculator"]

BACKENDS = ("auto", "local", "torch")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Default Verlet skin, Å: the graph is built with cutoff + skin and reused until an atom has moved
#: more than skin / 2. 0.5 Å keeps the graph ~1.3x the edges of a 5 Å cutoff and, at room
#: temperature with 1-2 fs steps, rebuilds it every few tens of steps.
DEFAULT_SKIN = 0.5


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


def _setup_distributed(launch, devices: list[torch.device], timeout: float, num_threads) -> torch.device:
    """Initialise torch.distributed for this rank; returns the rank's device."""
    device = devices[launch.local_rank % len(devices)]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", launch.local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if num_threads is None else int(num_threads))
    init_distributed(launch, "nccl" if device.type == "cuda" else "gloo", timeout)
    return device


class DistributedCalculator(Calculator):
    """An ASE calculator evaluating a message-passing potential on a partitioned graph.

    Gives the same energy, forces, stress and per-atom energies as the unpartitioned model (up to
    floating-point summation order).

    In one process the parts run on ``device`` (a list spreads them over several devices, one
    worker thread each). Under ``mpirun``/``mpiexec``/``torchrun`` every rank runs the same script
    and evaluates a block of parts; communication goes through torch.distributed (NCCL for CUDA,
    gloo on CPU), and every rank ends each call holding the full, identical results.

    The neighbour graph and the partition are reused across calls (MD steps) until some atom has
    moved more than ``skin / 2`` or the cell, periodicity or atomic numbers change; between
    rebuilds only the edge vectors are recomputed. Every call gives what a fresh build would.

    Args:
        model: a ``DistributableModel`` (see ``distmlip.models``).
        num_partitions: number of parts (>= 1; more parts than atoms is legal). Default: 1 in one
            process, the number of processes under a launcher (where it must be a multiple of
            the number of processes: each rank evaluates ``num_partitions / ranks`` parts).
            ``"auto"``: one part per device (or rank) if the evaluation is predicted to fit
            ``max_memory`` (default: 80% of the device's free memory), else as many parts,
            evaluated one at a time, as fit.
        partitioner: ``"grid"`` (recursive coordinate bisection, default), ``"slab"`` (1-D cuts
            balanced by atom count) or ``"metis"`` (pymetis graph partitioning).
        mode: ``"halo"`` (one-hop halo, exchange between layers, zero redundancy) or
            ``"extended"`` (halo as deep as the model's layers, no exchange).
        device: a device, or a list of devices the parts are spread over round-robin (one worker
            each).
        dtype: ``None`` (the model's), ``torch.float32``/``torch.float64`` or ``"float32"``/``"float64"``.
        backend: ``"auto"`` (torch.distributed when launched with several processes, else in this
            process), ``"local"`` or ``"torch"``.
        timeout: seconds a rank waits for its peers in any collective before failing (multi-process).
        num_threads: torch threads per process (default: 1 per rank under a launcher; unchanged
            in one process).
        skin: Verlet skin in Å (default 0.5; 0 rebuilds whenever an atom moves).
        max_memory: the memory one evaluation may add on each device: ``None`` (default: every
            part of a device alive at once, fastest), bytes (int), a size (``"6GB"``, ``"500MB"``)
            or a fraction in (0, 1] of the device's total memory. distmlip then splits the
            system into as many parts as the budget needs (at least ``num_partitions``) and
            evaluates each device's parts one at a time, recomputing what it must; results stay
            exactly those of the unbounded evaluation. A budget below one atom's neighbourhood
            plus the graph is a ``ValueError`` naming the smallest that would work.
        progress: show a progress bar (tqdm, rank 0) over the parts of an evaluation that runs
            them one at a time (``max_memory``): a single point on a large system can take minutes.

    Results: ``energy``/``free_energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress`` (Voigt, eV/Å^3,
    ASE's sign; only for cells of full rank), ``energies`` (N,) eV. After each calculation
    ``last_plan``, ``last_graph``, ``timings`` (seconds per stage) and ``graph_builds`` (how many
    times graph and plan were built) describe what was done; under a launcher ``last_plan`` holds
    this rank's parts and ``last_graph`` its region.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: DistributableModel, num_partitions: int | None = None,
                 partitioner: str = "grid", mode: str = "halo", device="cpu", dtype=None,
                 backend: str = "auto", timeout: float = 30.0, num_threads: int | None = None,
                 skin: float = DEFAULT_SKIN, max_memory=None, progress: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, DistributableModel):
            raise TypeError(
                f"model: expected a distmlip.models.DistributableModel, got {type(model).__name__}"
            )
        auto = num_partitions == "auto"
        if auto:
            num_partitions = None
        if num_partitions is not None:
            if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
                raise TypeError(f"num_partitions: expected an integer >= 1 or 'auto', got {num_partitions!r}")
            if num_partitions < 1:
                raise ValueError(f"num_partitions: expected an integer >= 1, got {num_partitions}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        if partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if isinstance(skin, bool) or not isinstance(skin, (int, float, np.floating)) or not skin >= 0:
            raise ValueError(f"skin: expected a number of Å >= 0 (default {DEFAULT_SKIN}), got {skin!r}")
        self.skin = float(skin)
        self.model = model
        self.partitioner = partitioner
        self.mode = mode
        self.devices = _parse_devices(device)
        from ..runtime.memory import parse_budget

        self.max_memory = parse_budget(max_memory, self.devices[0])
        if auto and self.max_memory is None:
            from ..runtime.memory import device_free_memory

            self.max_memory = int(0.8 * device_free_memory(self.devices[0]))
        self.dtype = _parse_dtype(dtype)
        launch = detect_launch() if backend != "local" else None
        if backend == "torch" and launch is None:
            raise ValueError(
                "backend: 'torch' needs a multi-process launch (mpirun/mpiexec, torchrun, or an "
                "initialised torch.distributed process group); got none. Use backend='local' or "
                "'auto' to run in this process"
            )
        self.backend = "torch" if launch is not None and launch.world_size > 1 else "local"
        if self.backend == "torch":
            world = launch.world_size
            if num_partitions is not None and num_partitions % world:
                raise ValueError(
                    f"num_partitions: expected a multiple of the number of processes ({world}) "
                    f"under a multi-process launch (each rank evaluates the same number of parts), "
                    f"got {num_partitions}; omit it for one part per rank"
                )
            self.distributed = _setup_distributed(launch, self.devices, timeout, num_threads)
            self.num_partitions = world if num_partitions is None else int(num_partitions)
            self.runner = Runner(model, [self.distributed], self.dtype, partitioner, mode,
                                 self.num_partitions, self.skin, comm="torch",
                                 max_memory=self.max_memory, progress=progress)
        else:
            if num_threads is not None:
                torch.set_num_threads(int(num_threads))
            default = len(self.devices) if auto else 1
            self.num_partitions = default if num_partitions is None else int(num_partitions)
            self.runner = Runner(model, self.devices, self.dtype, partitioner, mode,
                                 self.num_partitions, self.skin, timeout=max(timeout, 600.0),
                                 max_memory=self.max_memory, progress=progress)
        self.timings: dict[str, float] = {}
        self._warned = False

    @property
    def last_plan(self) -> PartitionPlan | None:
        """The partition of the last calculation (under a launcher: this rank's parts)."""
        return self.runner.last_plan

    @property
    def last_graph(self) -> NeighborGraph | None:
        """The neighbour graph (cutoff + skin) of the last calculation (under a launcher: this
        rank's region)."""
        return self.runner.last_graph

    @property
    def graph_builds(self) -> int:
        """How many times the neighbour graph and the partition were built."""
        return self.runner.graph_builds

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if properties is None:
            properties = self.implemented_properties
        if atoms is not None:
            atoms = as_ase_atoms(atoms)
        Calculator.calculate(self, atoms, properties, system_changes)
        a = self.atoms
        result = self.runner.evaluate(a.positions, a.cell.array, a.pbc, a.numbers)
        self.timings = dict(self.runner.timings)
        self._warn_if_pointless(self.runner.last_plan)
        self._store(result, a.cell.array)

    def _warn_if_pointless(self, plan: PartitionPlan) -> None:
        """Say once when every part holds (nearly) the whole system: an extended halo as deep as
        the model's receptive field covers a small cell, and splitting only multiplies the work."""
        if self._warned or plan is None or plan.num_parts < 2 or plan.mode != "extended" \
                or len(plan.parts) != plan.num_parts:  # under a launcher a rank sees its parts only
            return
        largest = max(p.num_local for p in plan.parts)
        if largest >= 0.9 * plan.num_atoms:
            self._warned = True
            warnings.warn(
                f"mode='extended': the {plan.num_hops}-hop halo covers the whole system "
                f"(largest part holds {largest} of {plan.num_atoms} atoms), so each of the "
                f"{plan.num_parts} parts does about the work of the whole and edges are evaluated "
                f"{plan.redundancy():.1f} times over; mode='halo' evaluates every edge once",
                stacklevel=3,
            )

    def _store(self, result: Evaluation, cell: np.ndarray) -> None:
        self.results = {
            "energy": result.energy,
            "free_energy": result.energy,
            "energies": result.energies,
            "forces": result.forces,
        }
        if self.atoms.cell.rank == 3:
            stress = result.virial / abs(np.linalg.det(cell))
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]].copy()

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name == "stress" and (atoms or self.atoms) is not None and (atoms or self.atoms).cell.rank < 3:
            raise PropertyNotImplementedError(
                "stress: needs a cell with three independent lattice vectors; this system's cell "
                "has rank < 3 (a molecule or a slab without a vacuum vector)"
            )
        return super().get_property(name, atoms, allow_calculation)
