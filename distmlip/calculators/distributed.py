"""The ASE calculator: Atoms -> graph -> plan -> workers -> gathered results."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes, equal

from ..graph import NeighborGraph
from ..graph.neighbors import as_ase_atoms
from ..models.base import DistributableModel, check_model
from ..partition import PartitionPlan
from ..runtime import Evaluation, Runner
from ..runtime.launch import detect_launch, init_distributed
from ..typing import BACKENDS, DTYPE_NAMES, MODES, PARTITIONERS, Backend, DTypeLike, Mode, Partitioner

__all__ = ["DistributedCalculator"]

_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

#: Default Verlet skin, Å: the graph is built with cutoff + skin and reused until an atom has moved
#: more than skin / 2. 0.5 Å keeps the graph ~1.3x the edges of a 5 Å cutoff and, at room
#: temperature with 1-2 fs steps, rebuilds it every few tens of steps.
DEFAULT_SKIN = 0.5

#: Keywords of ASE's ``Calculator`` accepted besides the options.
_ASE_KEYWORDS = ("atoms", "directory", "label")

_warned_local_under_launch = False


def _unknown_keyword(name: str, known) -> TypeError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{name}: expected a keyword of DistributedCalculator (one of {sorted(known)}), "
                     f"got the unknown keyword {name!r}{hint}")


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected None, torch.float32/torch.float64 or one of {list(_DTYPES)}, "
                     f"got {dtype!r}")


def _parse_devices(device) -> list[torch.device]:
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("device: expected a device or a non-empty list of devices, got []")
    out = []
    for item in items:
        try:
            dev = torch.device(item)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', "
                             f"got {item!r}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"device: expected a device this torch can use, got {item!r}, but "
                    f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                    f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                    f"use device='cpu' or install a CUDA build of torch"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device: expected a GPU index below {torch.cuda.device_count()} "
                                 f"(the GPUs visible), got {item!r}")
        elif dev.type != "cpu":
            try:
                torch.empty(0, device=dev)
            except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable
                raise ValueError(f"device: expected a device this torch can use, got {item!r} "
                                 f"({type(exc).__name__}: {exc}); use device='cpu'") from None
        out.append(dev)
    return out


def _check_options(options: dict) -> dict:
    """Check every option; return them normalised (``parameters``: plain values, as stored in
    ``calc.parameters``) with the parsed values the calculator runs with."""
    num_partitions = options["num_partitions"]
    auto = isinstance(num_partitions, str) and num_partitions == "auto"
    if not auto and num_partitions is not None:
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
            raise TypeError(f"num_partitions: expected an integer >= 1 or 'auto', got {num_partitions!r}")
        if num_partitions < 1:
            raise ValueError(f"num_partitions: expected an integer >= 1, got {num_partitions}")
        num_partitions = int(num_partitions)
    partitioner, mode, backend = options["partitioner"], options["mode"], options["backend"]
    if not isinstance(partitioner, str) or partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    timeout = options["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) \
            or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout: expected a positive, finite number of seconds, got {timeout!r}")
    skin = options["skin"]
    if isinstance(skin, bool) or not isinstance(skin, (int, float, np.integer, np.floating)) \
            or not 0 <= skin < float("inf"):
        raise ValueError(f"skin: expected a finite number of Å >= 0 (default {DEFAULT_SKIN}), got {skin!r}")
    num_threads = options["num_threads"]
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, (int, np.integer))):
        raise TypeError(f"num_threads: expected None or an integer >= 1 (torch threads per "
                        f"process), got {num_threads!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads: expected None or an integer >= 1 (torch threads per "
                         f"process), got {num_threads}; omit it to keep torch's setting")
    progress = options["progress"]
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress: expected True or False, got {progress!r}")
    dtype = _parse_dtype(options["dtype"])
    devices = _parse_devices(options["device"])
    from ..runtime.memory import parse_budget

    budget = parse_budget(options["max_memory"], devices[0])
    device = options["device"]
    device = [str(d) for d in device] if isinstance(device, (list, tuple)) else str(device)
    parameters = {
        "num_partitions": num_partitions if not auto else "auto", "partitioner": partitioner,
        "mode": mode, "device": device,
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""), "backend": backend,
        "timeout": float(timeout), "num_threads": None if num_threads is None else int(num_threads),
        "skin": float(skin), "max_memory": options["max_memory"], "progress": bool(progress),
    }
    return {"parameters": parameters, "auto": auto, "num_partitions": None if auto else num_partitions,
            "devices": devices, "dtype": dtype, "budget": budget}


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

    Structures may be ``ase.Atoms`` or pymatgen ``Structure``/``Molecule`` (converted once per
    call) in every entry point (``calculate``, ``get_potential_energy``, ``get_forces``, ...).

    Results: ``energy``/``free_energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress`` (Voigt, eV/Å^3,
    ASE's sign; only for cells of full rank), ``energies`` (N,) eV. After each calculation
    ``last_plan``, ``last_graph``, ``timings`` (seconds per stage) and ``graph_builds`` (how many
    times graph and plan were built) describe what was done; under a launcher ``last_plan`` holds
    this rank's parts and ``last_graph`` its region. ``rank`` and ``world_size`` say which process
    this is (0 and 1 in one process).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]
    default_parameters = {
        "num_partitions": None, "partitioner": "grid", "mode": "halo", "device": "cpu",
        "dtype": None, "backend": "auto", "timeout": 30.0, "num_threads": None,
        "skin": DEFAULT_SKIN, "max_memory": None, "progress": False,
    }

    def __init__(self, model: DistributableModel, num_partitions: int | Literal["auto"] | None = None,
                 partitioner: Partitioner = "grid", mode: Mode = "halo",
                 device: str | torch.device | Sequence[str | torch.device] = "cpu",
                 dtype: DTypeLike = None, backend: Backend = "auto", timeout: float = 30.0,
                 num_threads: int | None = None, skin: float = DEFAULT_SKIN,
                 max_memory: int | float | str | None = None, progress: bool = False, **kwargs):
        for key in kwargs:
            if key not in _ASE_KEYWORDS:
                raise _unknown_keyword(key, [*self.default_parameters, *_ASE_KEYWORDS])
        check_model(model)
        options = {"num_partitions": num_partitions, "partitioner": partitioner, "mode": mode,
                   "device": device, "dtype": dtype, "backend": backend, "timeout": timeout,
                   "num_threads": num_threads, "skin": skin, "max_memory": max_memory,
                   "progress": progress}
        config = _check_options(options)
        self.model = model
        self.timings: dict[str, float] = {}
        self._warned = False
        super().__init__(**kwargs)
        self._configure(config)
        self.parameters.update(config["parameters"])

    def set(self, **kwargs) -> dict:
        """Change options (ASE's contract): returns the ones that changed; they take effect at the
        next calculation (results are discarded, the runner rebuilt). Unknown keywords raise
        ``TypeError``; a value that is not allowed, or an option that cannot change under a
        launcher, ``ValueError``, and then nothing changes."""
        for key in kwargs:
            if key not in self.default_parameters:
                raise _unknown_keyword(key, self.default_parameters)
        if not kwargs or not hasattr(self, "runner"):  # ASE's __init__ calls set() with nothing
            return Calculator.set(self, **kwargs)
        config = _check_options({**self.parameters, **kwargs})
        new = config["parameters"]
        changed = {k: new[k] for k in kwargs if not equal(new[k], self.parameters.get(k))}
        if changed:
            self._configure(config, changed)
            self.parameters.update(new)
            self.reset()
        return changed

    def _configure(self, config: dict, changed: dict | None = None) -> None:
        """Build (or, for ``set``, rebuild) the runner for ``config``."""
        global _warned_local_under_launch
        params = config["parameters"]
        backend, timeout, num_threads = params["backend"], params["timeout"], params["num_threads"]
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
        devices, dtype, num_partitions = config["devices"], config["dtype"], config["num_partitions"]
        budget = config["budget"]
        if config["auto"] and budget is None:
            from ..runtime.memory import device_free_memory

            budget = int(0.8 * device_free_memory(devices[0]))
        if effective == "torch":
            world = launch.world_size
            if num_partitions is not None and num_partitions % world:
                raise ValueError(
                    f"num_partitions: expected a multiple of the number of processes ({world}) "
                    f"under a multi-process launch (each rank evaluates the same number of parts), "
                    f"got {num_partitions}; omit it for one part per rank"
                )
            if changed is None:
                self.distributed = _setup_distributed(launch, devices, timeout, num_threads)
            elif "num_threads" in changed and num_threads is not None:
                torch.set_num_threads(num_threads)
            parts = world if num_partitions is None else num_partitions
            runner = Runner(self.model, [self.distributed], dtype, params["partitioner"],
                            params["mode"], parts, params["skin"], timeout=timeout, comm="torch",
                            max_memory=budget, progress=params["progress"])
        else:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            default = len(devices) if config["auto"] else 1
            parts = default if num_partitions is None else num_partitions
            runner = Runner(self.model, devices, dtype, params["partitioner"], params["mode"],
                            parts, params["skin"], timeout=max(timeout, 600.0), max_memory=budget,
                            progress=params["progress"])
        self.runner = runner
        self.backend = effective
        self.num_partitions = parts
        self.partitioner, self.mode = params["partitioner"], params["mode"]
        self.devices, self.dtype, self.skin, self.max_memory = devices, dtype, params["skin"], budget
        self._warned = False

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
