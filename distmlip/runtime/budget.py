"""The memory budget: what one evaluation of a build is predicted to add (``Planner.predict``), the
build with the fewest parts that fits ``max_memory`` (``Planner.build``), and ``estimate_memory``.
The model's own costs come from the calibration (``runtime/memory.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from ..graph.neighbors import as_ase_atoms, validate_system
from ..models.base import DistributableModel, has_steps
from ..options import DEFAULT_SKIN, Options, renamed, unknown_keyword
from .build import Builder, Built
from .comm import LocalComm
from .local import inside_cutoff, replica
from .memory import (
    CALL_BYTES_PER_EDGE,
    GRAPH_BYTES_PER_EDGE,
    LEAN_PLAN_BYTES_PER_EDGE,
    PLAN_BYTES_PER_EDGE,
    MemoryModel,
    calibrate,
    graph_build_bytes,
    release_memory_eagerly,
)

__all__ = ["Planner", "RunInfo", "estimate_memory", "minimum_memory"]

#: Parts evaluated one at a time by steps on CPU are made no bigger than this (predicted bytes
#: of one part's activations), however much room the budget leaves: small parts allocate blocks
#: the heap serves again part after part (``reuse_memory``), large ones fresh mappings faulted
#: in page by page. Measured (SchNet, 23,328 atoms, steps, 0.3x budget, CPU of a call; unbounded
#: 10.2 s): 5 parts (825 MB each) 21.0 s, 16 (265 MB) 11.7 s, 32 (135 MB) 10.1 s, 64 (69 MB) 9.2 s.
PART_BYTES = 64e6
#: ... but parts hold this many atoms on average at least (MACE, 128x0e+128x1o, 500 atoms: one
#: atom a part, 500 parts, took 6.0x the unbounded time; 4 parts 1.18x)
MIN_PART_ATOMS = 50


@dataclass(frozen=True)
class RunInfo:
    """How the last evaluation was split (``DistributedCalculator.last_run``, ``Runner.last_run``).

    Attributes:
        num_parts: the parts the system was split into (over every rank): what ``max_memory``
            chose, which may be more than the ``num_parts`` asked for.
        parts_at_once: how many parts were alive at once (``num_parts`` when all at once; with
            one at a time, one per worker: device or rank).
        sequential: whether each worker evaluated its parts one at a time (bounded memory).
        predicted_peak_bytes: the predicted peak one evaluation adds per device (on CPU: the
            process), as checked against the budget; ``None`` without ``max_memory`` (no
            calibration is made then).
        budget_bytes: ``max_memory`` in bytes (``None``: no bound).
    """

    num_parts: int
    parts_at_once: int
    sequential: bool
    predicted_peak_bytes: float | None
    budget_bytes: int | None

    def describe(self) -> str:
        """One line: ``"12 parts, one at a time, predicted peak 27.9 MB of a 30 MB budget"``."""
        text = f"{self.num_parts} part{'' if self.num_parts == 1 else 's'}"
        if self.sequential:
            text += ", one at a time" if self.parts_at_once == 1 else \
                f", {self.parts_at_once} at a time (one per worker)"
        elif self.num_parts > 1:
            text += ", all at once"
        if self.predicted_peak_bytes is not None:
            text += f", predicted peak {_gb(self.predicted_peak_bytes)}"
            if self.budget_bytes is not None:
                text += f" of a {_gb(self.budget_bytes)} budget"
        return text

    def todict(self) -> dict:
        """The fields, JSON-ready."""
        return {"num_parts": self.num_parts, "parts_at_once": self.parts_at_once,
                "sequential": self.sequential, "predicted_peak_bytes": self.predicted_peak_bytes,
                "budget_bytes": self.budget_bytes}


@dataclass(eq=False)
class Planner:
    """Chooses the build of each rebuild: ``num_parts`` parts all at once without a budget;
    with one (``budget``, bytes per device), the fewest parts, all at once or one at a time, whose
    predicted peak fits. ``sequential``: ``True`` always one at a time, ``False`` never, ``None``
    as the budget needs. ``model``: the replica on the first device (calibrated on ``source``'s
    cache key; ``None``: a replica is made if a calibration must be measured)."""

    builder: Builder
    model: DistributableModel | None
    source: DistributableModel
    dtype: torch.dtype
    budget: int | None
    num_parts: int
    sequential: bool | None = None
    memory_model: MemoryModel | None = None
    any_calibration: bool = False  # reuse any cached calibration (``calibrate(any_room=True)``)
    layer_steps: bool = True  # parts one at a time use the model's steps if it has them

    def __post_init__(self):
        if self.budget is not None:
            release_memory_eagerly()  # the calibration's mode; the steps reuse the heap (allocator_for)

    def build(self, positions, cell, pbc, numbers, times: dict) -> Built:
        """The build for this system (``times``: seconds per stage)."""
        if self.budget is None:
            return self.builder.build(positions, cell, pbc, numbers, times, self.num_parts,
                                      sequential=bool(self.sequential))
        return self._within_budget(positions, cell, pbc, numbers, times)

    def memory(self, positions, cell, pbc, numbers) -> MemoryModel:
        """The model's calibrated memory costs (probes built from this system; cached)."""
        if self.memory_model is None:
            atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
            model = self.model if self.model is not None else \
                (lambda: replica(self.source, self.builder.comm.devices[0], self.dtype))
            self.memory_model = calibrate(model, atoms, self.dtype, self.builder.comm.devices[0],
                                          limit=self.budget, key=self.source,
                                          any_room=self.any_calibration)
        return self.memory_model

    @property
    def by_steps(self) -> bool:
        """Whether parts evaluated one at a time go by the model's layer protocol (halo mode, a
        model with steps, ``layer_steps`` not turned off): it decides what they store."""
        return bool(self.layer_steps) and self.builder.mode == "halo" and has_steps(self.source)

    def needed(self, pred: dict) -> float:
        """The peak of a prediction agreed over the ranks: what a budget is checked against, and
        the least budget an error names (so that a budget of it is met)."""
        return self.builder.comm.maximum(pred["peak"])

    def predict(self, b: Built, memory, inside: np.ndarray | None = None) -> dict:
        """Predicted bytes one evaluation of build ``b`` adds on this process's devices.

        Returns ``peak`` (the largest over devices; on CPU, the process), ``fixed`` (graph, plan,
        stored exchange rows: what does not shrink with more parts), ``largest_part`` (the
        biggest part's activations) and ``floor`` (``fixed`` plus the largest one-atom part on
        every worker: about the peak of the finest partition, the least more parts can reach).
        ``inside``: the graph's edges within the cutoff, if already known (``inside_cutoff``)."""
        graph, n = b.graph, len(b.positions)
        if inside is None:
            inside = inside_cutoff(graph, graph.positions, b.cell, self.builder.cutoff) if graph is not None \
                else np.zeros(0, dtype=bool)
        max_degree = int(np.bincount(graph.receivers[inside], minlength=graph.num_atoms).max()) \
            if len(inside) else 0
        # with the skin: a one-atom part holds up to this many halo rows and edges to filter
        max_listed = int(np.bincount(graph.receivers, minlength=graph.num_atoms).max()) \
            if len(inside) else 0
        num_edges = graph.num_edges if graph is not None else 0
        plan_edges = sum(len(p.edges) for p in b.plan.parts)
        plan_bytes = LEAN_PLAN_BYTES_PER_EDGE if b.sequential else PLAN_BYTES_PER_EDGE
        host = (GRAPH_BYTES_PER_EDGE * num_edges + plan_bytes * plan_edges
                + 8 * (4 * n + 9) + 64 * n)
        stored, acts = [], []  # per worker: exchange rows kept between parts, the largest part
        by_index = {p.index: p for p in b.plan.parts}
        for shard in b.shards:
            parts = [by_index[i] for i in shard.parts]
            halo = self.builder.mode == "halo"
            if b.sequential:
                act = max((memory.part(p.num_owned if halo else p.num_local,
                                       int(inside[p.edges].sum()), p.num_halo if halo else 0)
                           + CALL_BYTES_PER_EDGE * len(p.edges) for p in parts),
                          default=memory.part(0, 0))
                stored.append(memory.stored(shard.num_rows, steps=self.by_steps,
                                            edges=sum(int(inside[p.edges].sum()) for p in parts)))
            else:
                kept = sum(int(inside[p.edges].sum()) for p in parts)
                updated = shard.num_owned if halo else shard.num_rows
                act = memory.part(updated, kept, shard.num_rows - updated) \
                    + (CALL_BYTES_PER_EDGE + PLAN_BYTES_PER_EDGE) * len(shard.edges)
                stored.append(0.0)
            acts.append(float(act))
        # the largest one-atom part (what the most parts reach; at most this): the floor estimates
        # the peak of the finest partition, which the budget search tries last
        smallest = memory.part(1, max_degree, max_listed) + CALL_BYTES_PER_EDGE * max_listed
        build = graph_build_bytes(graph) if graph is not None else 0.0

        def total(workers: list[float]) -> float:
            """The peak from each worker's bytes: on a GPU each device holds its worker alone; on
            CPU the process holds them all, the host arrays, and the graph while it is built."""
            if self.builder.comm.devices[0].type == "cuda":
                return max(workers, default=0.0)
            return max(host + sum(workers), build)

        return {"peak": float(total([s + a for s, a in zip(stored, acts, strict=True)])),
                "fixed": float(total(stored)), "largest_part": max(acts, default=0.0),
                "floor": float(total([s + smallest for s in stored]))}

    def _within_budget(self, positions, cell, pbc, numbers, times: dict) -> Built:
        """The build with the fewest parts (at least ``num_parts``; a multiple of the
        workers) whose predicted peak fits ``max_memory``."""
        memory = self.memory(positions, cell, pbc, numbers)
        build, comm = self.builder.build, self.builder.comm
        workers = comm.num_workers
        n = len(positions)
        parts = -(-max(self.num_parts, workers) // workers) * workers
        graph = inside = None
        hopeless = False  # all at once cannot fit: the model's cost for every atom exceeds the budget
        if self.sequential is None and comm.world_size == 1:
            # the graph first: when all at once cannot fit, its build (145 bytes per edge then: it was
            # the peak of a search under a tight budget, 60 MB where the parts chosen needed 34)
            # is not made; built in chunks, at a peak near its stored size (graph_build_bytes)
            graph = self.builder.graph(positions, cell, pbc, numbers, chunked=True)
            inside = inside_cutoff(graph, graph.positions, cell, self.builder.cutoff)
            hopeless = memory.part(n, int(inside.sum())) > self.budget
        if not self.sequential and not hopeless:
            b = build(positions, cell, pbc, numbers, times, self.num_parts, graph, sequential=False)
            graph = b.graph if comm.world_size == 1 else None
            peak = self.needed(self.predict(b, memory))
            if peak <= self.budget or self.sequential is False:
                b.predicted = peak
                return b
            del b
        finest = self.finest(n)
        # with the layer protocol on CPU, parts small enough for the heap to serve again
        # (PART_BYTES); a GPU's caching allocator reuses blocks of any size, and fewer parts
        # launch fewer kernels; the generic replay pays for every part L + 1 replays (SevenNet-0,
        # 256 atoms: 130 small parts 3.2x the unbounded time, 4 parts 2.8x)
        cap = PART_BYTES if self.by_steps and comm.devices[0].type == "cpu" else np.inf
        # ... but not below MIN_PART_ATOMS atoms a part on average: below it each part's fixed
        # cost (module calls per step) outweighs what the heap saves
        most = max(parts, -(-max(n // MIN_PART_ATOMS, 1) // workers) * workers)
        while True:
            b = build(positions, cell, pbc, numbers, times, parts, graph, sequential=True)
            graph = b.graph if comm.world_size == 1 else None
            if inside is None or graph is None:
                inside = inside_cutoff(b.graph, b.graph.positions, b.cell, self.builder.cutoff) \
                    if b.graph is not None else np.zeros(0, dtype=bool)
            pred = self.predict(b, memory, inside)
            peak = self.needed(pred)
            if peak <= self.budget and (comm.maximum(pred["largest_part"]) <= cap or parts >= most):
                b.predicted = peak
                return b
            if parts >= finest:
                # the smallest budget named is this very prediction (``minimum``): met here
                raise ValueError(
                    f"max_memory: expected at least {_gb(peak, up=True)} for "
                    f"this system ({n} atoms: graph, plan and stored exchange rows "
                    f"{_gb(pred['fixed'])}, plus one atom's neighbourhood), got "
                    f"{_gb(self.budget)}; raise max_memory (distmlip.minimum_memory gives the "
                    f"least) or use more devices or processes"
                )
            if comm.maximum(pred["floor"]) > self.budget:
                parts = finest  # not even one-atom parts would fit: try them once, to name the need
                continue
            fits = peak <= self.budget  # then only the cap asks for more parts, up to ``most``
            room = max(min(self.budget - pred["fixed"], cap) if fits else self.budget - pred["fixed"], 1.0)
            grow = min(max(1.25, 1.15 * pred["largest_part"] / room), 64.0)
            wanted = max(parts + workers, int(np.ceil(parts * grow)))
            parts = min(-(-wanted // workers) * workers, most if fits else finest)

    def finest(self, num_atoms: int) -> int:
        """The most parts a budget search tries: one atom per part on every worker."""
        return num_atoms * self.builder.comm.num_workers

    def minimum(self, positions, cell, pbc, numbers, times: dict) -> float:
        """The smallest budget that works: the predicted peak of the finest build (one atom per
        part, one at a time), agreed over the ranks; the figure a smaller budget is refused with
        (``minimum_memory``)."""
        memory = self.memory(positions, cell, pbc, numbers)
        b = self.builder.build(positions, cell, pbc, numbers, times, self.finest(len(positions)),
                               sequential=True)
        return self.needed(self.predict(b, memory))


def _gb(value: float, up: bool = False) -> str:
    """A size in bytes, readably (three significant digits; ``up``: rounded up, so that the size
    named is never below ``value``)."""
    if value >= 1:
        step = 10.0 ** (int(np.floor(np.log10(value))) - 2)
        value = (np.ceil(value / step) if up else np.round(value / step)) * step
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{np.ceil(value) if up else np.round(value):.0f} B"


def _planner(model, atoms, num_parts, mode, dtype, device, partitioner, skin, max_memory,
             renamed_options: dict, what: str):
    """The planner ``estimate_memory`` and ``minimum_memory`` ask, and the system it plans."""
    if model is None or not hasattr(model, "cutoff"):
        raise TypeError(f"model: expected a DistributableModel (distmlip.load, distmlip.wrap or your "
                        f"own), got {type(model).__name__}")
    renamed_options = renamed(renamed_options)
    if renamed_options:
        if set(renamed_options) - {"num_parts"}:
            raise unknown_keyword(next(iter(set(renamed_options) - {"num_parts"})),
                                  ("num_parts", "mode", "dtype", "device", "partitioner", "skin")
                                  + (("max_memory",) if what == "estimate" else ()))
        num_parts = renamed_options["num_parts"]
    atoms = as_ase_atoms(atoms)
    options = Options.from_kwargs(num_parts=int(num_parts), mode=mode, dtype=dtype,
                                  device=device, partitioner=partitioner, skin=skin,
                                  max_memory=max_memory)
    # estimate_memory: one device's share of num_parts; minimum_memory: every device, as the
    # calculator splits the system over them
    devices = options.devices if what == "minimum" else options.devices[:1]
    dtype = options.torch_dtype or model.dtype
    num_hops = int(model.num_layers) if mode == "extended" else 1
    builder = Builder(LocalComm(devices), partitioner, mode, num_hops, float(model.cutoff), options.skin,
                      options.neighbors)
    planner = Planner(builder, None, model, dtype, options.budget_bytes, options.num_parts)
    return planner, validate_system(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)


def estimate_memory(model: DistributableModel, atoms, num_parts: int = 1, mode: str = "halo",
                    dtype=None, device="cpu", *, partitioner: str = "grid", skin: float = DEFAULT_SKIN,
                    max_memory=None, **renamed_options) -> int:
    """Predicted peak bytes one evaluation of ``atoms`` adds on each device (on CPU: the process's
    resident memory above what it was before the call), without evaluating it.

    ``num_parts`` parts on one device (the first of ``device``), all alive at once
    (``max_memory=None``), or evaluated one at a time within ``max_memory`` (then the number of
    parts is the one the calculator would choose). The model's own cost comes from
    ``calibrate`` (probes of a few hundred atoms, cached); distmlip's graph, plan and stored
    exchange rows are counted from their sizes.
    """
    planner, system = _planner(model, atoms, num_parts, mode, dtype, device, partitioner, skin,
                               max_memory, renamed_options, "estimate")
    built = planner.build(*system, {})
    return int(planner.predict(built, planner.memory(*system))["peak"])


def minimum_memory(model: DistributableModel, atoms, mode: str = "halo", dtype=None, device="cpu",
                   *, partitioner: str = "grid", skin: float = DEFAULT_SKIN) -> int:
    """The smallest ``max_memory`` (bytes per device; on CPU, the process) with which ``atoms``
    can be evaluated: the predicted peak of the finest split, one atom per part evaluated one at
    a time, which holds distmlip's graph and plan, the exchange rows kept between parts and one
    atom's neighbourhood. A smaller budget is refused with this figure (rounded up); a budget of
    it or more works (``DistributedCalculator(model, max_memory=...)``), with fewer parts and
    less time the more room it leaves. ``device``: one device or a list (each holds its share).
    """
    planner, system = _planner(model, atoms, 1, mode, dtype, device, partitioner, skin, None, {},
                               "minimum")
    planner.any_calibration = True  # the calibration a budgeted calculator made, if any
    return int(np.ceil(planner.minimum(*system, {})))
