"""The ASE calculator: Atoms -> graph -> plan -> workers -> gathered results."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes, equal

from ..graph import NeighborGraph
from ..graph.neighbors import as_ase_atoms
from ..models.base import DistributableModel, check_model
from ..options import NAMES, Options, options_doc, renamed, signature, unknown_keyword
from ..partition import PartitionPlan
from ..runtime import Evaluation, RunInfo, Runner
from ..runtime.launch import detect_launch, init_distributed

__all__ = ["DistributedCalculator"]

#: Keywords of ASE's ``Calculator`` accepted besides the options.
_ASE_KEYWORDS = ("atoms", "directory", "label")

_warned_local_under_launch = False


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
    worker thread each). Under ``mpirun``/``mpiexec``/``torchrun``/``srun`` every rank runs the
    same script and evaluates a block of parts; communication goes through torch.distributed (NCCL
    for CUDA, gloo on CPU), and every rank ends each call holding the full, identical results.

    The neighbour graph and the partition are reused across calls (MD steps) until some atom has
    moved more than ``skin / 2`` or the cell, periodicity or atomic numbers change; between
    rebuilds only the edge vectors are recomputed. Every call gives what a fresh build would.

    The options below follow ASE's calculator contract: they live in ``calc.parameters``
    (``default_parameters`` holds the defaults), ``calc.todict()`` gives those that differ from the
    defaults, and ``calc.set(mode="extended")`` changes one for the next calculation (the runner is
    rebuilt). Under a launcher ``backend``, ``device`` and ``timeout`` are fixed once the process
    group exists: changing them raises ``ValueError``. A keyword that is not an option raises
    ``TypeError``, here and in ``set``. The string options' values are the ``Literal`` aliases of
    ``distmlip.typing`` (``Mode``, ``Partitioner``, ``Backend``, ``DTypeName``).

    Args:
        model: a ``DistributableModel`` (see ``distmlip.models``), checked here: ``cutoff``,
            ``num_layers`` and ``forward`` must be declared.
{options}

    Structures may be ``ase.Atoms`` or pymatgen ``Structure``/``Molecule`` (converted once per
    call) in every entry point (``calculate``, ``get_potential_energy``, ``get_forces``, ...).

    Results: ``energy``/``free_energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress`` (Voigt, eV/Å^3,
    ASE's sign; only for cells of full rank), ``energies`` (N,) eV. After each calculation
    ``last_run`` (parts used, how many at once, the predicted peak: a ``RunInfo``), ``last_plan``,
    ``last_graph``, ``timings`` (seconds per stage) and ``graph_builds`` (how many
    times graph and plan were built) describe what was done; under a launcher ``last_plan`` holds
    this rank's parts and ``last_graph`` its region. ``rank`` and ``world_size`` say which process
    this is (0 and 1 in one process).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]
    default_parameters = Options().todict()

    def __init__(self, model: DistributableModel, num_parts: int | Literal["auto"] | None = None,
                 **kwargs):
        kwargs = renamed(kwargs)
        if "num_parts" in kwargs:  # given by its old name
            if num_parts is not None:
                raise TypeError("num_partitions: expected only num_parts= (its new name), got both; "
                                "drop num_partitions=")
            num_parts = kwargs.pop("num_parts")
        for key in kwargs:
            if key not in NAMES and key not in _ASE_KEYWORDS:
                raise unknown_keyword(key, [*NAMES, *_ASE_KEYWORDS])
        check_model(model)
        options = Options.from_kwargs(num_parts=num_parts,
                                      **{k: v for k, v in kwargs.items() if k in NAMES})
        self.model = model
        self.timings: dict[str, float] = {}
        self._warned = False
        super().__init__(**{k: v for k, v in kwargs.items() if k in _ASE_KEYWORDS})
        self._configure(options)
        self.parameters.update(options.todict())

    def set(self, **kwargs) -> dict:
        """Change options (ASE's contract): returns the ones that changed; they take effect at the
        next calculation (results are discarded, the runner rebuilt). Unknown keywords raise
        ``TypeError``; a value that is not allowed, or an option that cannot change under a
        launcher, ``ValueError``, and then nothing changes."""
        kwargs = renamed(kwargs)
        for key in kwargs:
            if key not in NAMES:
                raise unknown_keyword(key, NAMES)
        if not kwargs or not hasattr(self, "runner"):  # ASE's __init__ calls set() with nothing
            return Calculator.set(self, **kwargs)
        options = self.options.replace(**kwargs)
        new = options.todict()
        changed = {k: new[k] for k in kwargs if not equal(new[k], self.parameters.get(k))}
        if changed:
            self._configure(options, changed)
            self.parameters.update(new)
            self.reset()
        return changed

    def _configure(self, options: Options, changed: dict | None = None) -> None:
        """Build (or, for ``set``, rebuild) the runner for ``options``."""
        global _warned_local_under_launch
        backend, timeout, num_threads = options.backend, options.timeout, options.num_threads
        launch = detect_launch()
        if backend == "torch" and launch is None:
            raise ValueError(
                "backend: 'torch' needs a multi-process launch (mpirun/mpiexec, torchrun, srun, or "
                "an initialised torch.distributed process group); got none. Use backend='local' or "
                "'auto' to run in this process"
            )
        effective = "torch" if backend != "local" and launch is not None and launch.world_size > 1 \
            else "local"
        if changed is not None:
            if effective != self.backend:
                raise ValueError(
                    f"backend: expected a value keeping this calculator's {self.backend!r} backend "
                    f"(the process group is set up once), got {backend!r}; build a new "
                    f"DistributedCalculator instead"
                )
            if effective == "torch":
                for key in ("device", "timeout"):
                    if key in changed:
                        raise ValueError(
                            f"{key}: cannot change under a multi-process launch (the process "
                            f"group was set up with {key}={self.parameters[key]!r}), got "
                            f"{changed[key]!r}; start the job with the new value"
                        )
        elif backend == "local" and launch is not None and launch.world_size > 1 \
                and not _warned_local_under_launch:
            _warned_local_under_launch = True
            warnings.warn(
                f"backend='local' under a multi-process launch ({launch.launcher}, "
                f"{launch.world_size} processes): every rank evaluates the whole system by itself "
                f"(rank {launch.rank} too), repeating the others' work without communicating; use "
                f"backend='auto' (the default) for one part per rank",
                stacklevel=3,
            )
        num_parts = options.num_parts
        if effective == "torch":
            world = launch.world_size
            if isinstance(num_parts, int) and num_parts % world:
                raise ValueError(
                    f"num_parts: expected a multiple of the number of processes ({world}) "
                    f"under a multi-process launch (each rank evaluates the same number of parts), "
                    f"got {num_parts}; omit it for one part per rank"
                )
            if changed is None:
                self.distributed = _setup_distributed(launch, options.devices, timeout, num_threads)
            elif "num_threads" in changed and num_threads is not None:
                torch.set_num_threads(num_threads)
            runner = Runner(self.model, options.replace(device=str(self.distributed)), comm="torch")
        else:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            runner = Runner(self.model, options)
        self.runner = runner
        self.options = options
        self.backend = effective
        self._warned = False

    __doc__ = __doc__.format(options=options_doc(8))
    __init__.__signature__ = signature(("self", "model"), ("num_parts",), _ASE_KEYWORDS)
    __init__.__annotations__ = {"model": DistributableModel, **{
        p.name: p.annotation for p in __init__.__signature__.parameters.values() if p.name in NAMES}}

    # derived values (read-only; the options themselves are ``calc.parameters``)
    @property
    def num_parts(self) -> int:
        """The number of parts of the last calculation (what ``max_memory`` chose, over every
        rank); before the first, ``num_parts`` resolved (the least a budget may split into)."""
        run = self.runner.last_run
        return self.runner.num_parts if run is None else run.num_parts

    @property
    def last_run(self) -> RunInfo | None:
        """How the last calculation was split: a ``distmlip.runtime.RunInfo`` with ``num_parts``
        (parts used), ``parts_at_once``, ``sequential`` (one at a time), ``predicted_peak_bytes``
        (with ``max_memory``) and ``budget_bytes``; ``None`` before the first calculation."""
        return self.runner.last_run

    devices = property(lambda self: self.options.devices, doc="``device`` as a list of torch devices.")
    dtype = property(lambda self: self.options.torch_dtype,
                     doc="``dtype`` as a torch dtype (None: the model's).")
    partitioner = property(lambda self: self.options.partitioner, doc="The ``partitioner`` option.")
    mode = property(lambda self: self.options.mode, doc="The ``mode`` option.")
    skin = property(lambda self: self.options.skin, doc="The ``skin`` option, Å.")
    budget_bytes = property(lambda self: self.runner.budget,
                            doc="The memory budget in bytes (``max_memory`` on the device, or "
                                "``num_parts='auto'``'s), None: no bound; ``calc.parameters"
                                "['max_memory']`` keeps the value as given.")

    @property
    def rank(self) -> int:
        """This process's rank (0 in one process)."""
        return self.runner.rank

    @property
    def world_size(self) -> int:
        """The number of processes evaluating together (1 in one process)."""
        return self.runner.world_size

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

    def build_reference(self) -> dict | None:
        """The positions and cell the current neighbour graph and partition were built from
        (``None`` before the first calculation): what a restart needs to rebuild the same graph
        and so sum in the same order (``restore_build``). Used by ``distmlip.md`` checkpoints."""
        reference = self.runner.build_reference()
        return None if reference is None else dict(zip(("positions", "cell"), reference, strict=True))

    def restore_build(self, positions, cell, pbc, numbers) -> None:
        """Build the graph and partition from ``positions`` and ``cell`` (a ``build_reference``)
        now, so the next calculations reuse it while the system stays within the skin, exactly as
        the run that saved the reference did. Every rank of a launch calls it alike."""
        self.runner.rebuild_at(np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64),
                               np.asarray(pbc), np.asarray(numbers))
        self.reset()

    def check_state(self, atoms, tol=1e-15):
        return super().check_state(as_ase_atoms(atoms), tol)

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
                or self.backend == "torch" or not plan.parts:  # under a launcher a rank sees its parts only
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
        if atoms is not None:
            atoms = as_ase_atoms(atoms)  # pymatgen in: ASE's check_state and cache see ase.Atoms
        if name == "stress" and (atoms or self.atoms) is not None and (atoms or self.atoms).cell.rank < 3:
            raise PropertyNotImplementedError(
                "stress: needs a cell with three independent lattice vectors; this system's cell "
                "has rank < 3 (a molecule or a slab without a vacuum vector)"
            )
        return super().get_property(name, atoms, allow_calculation)
