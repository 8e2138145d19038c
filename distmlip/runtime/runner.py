"""The one runner: positions, cell, pbc, numbers -> ``Evaluation``, in one process or on every rank.

Each call:

1. the system (under a launcher: rank 0's, broadcast to every rank);
2. if it is stale (first call, an atom moved more than ``skin / 2`` since the last build, or the
   cell, periodicity or atomic numbers changed; under a launcher every rank agrees), a rebuild:
   owners (partitioner), the neighbour graph of this process's region with cutoff + skin (the
   whole system in one process; under a launcher the atoms near the rank's parts), the parts, the
   shards (one per worker: a device in this process, or this rank) and their exchange maps;
3. edge vectors from the current positions, keeping only edges shorter than the model's cutoff
   (so every call gives exactly what a fresh build would);
4. the model on every shard, ``halo_exchange`` between its layers, one backward pass;
5. energies, forces (from d E / d edge_vec) and virial gathered; under a launcher one all-reduce
   gives every rank the same full results.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CommunicationError
from ..graph import NeighborGraph
from ..models.base import DistributableModel
from ..options import NAMES, Options
from ..partition import PartitionPlan
from .budget import Planner, RunInfo
from .build import Builder, Built
from .comm import make_comm
from .launch import is_comm_failure, peer_status, report_failure
from .local import replica
from .memory import allocator_for, release_memory_eagerly
from .parallel import evaluate_all
from .resident import StepState
from .results import gather_results, results_plan
from .sequential import evaluate_sequential
from .shards import Shard
from .steps import check_steps_early, evaluate_steps, uses_steps

__all__ = ["Evaluation", "Runner", "TIMING_KEYS"]

#: ``Runner.timings`` keys (seconds), the same on both backends: ``broadcast`` (rank 0's system to
#: every rank), ``partition`` (owners, parts, shards), ``graph`` (neighbour list), ``handshake``
#: (exchange maps between ranks), ``edges`` (edge vectors of the call), ``evaluate`` (model,
#: exchanges and backward pass), ``exchange`` (time inside point-to-point halo exchanges),
#: ``reduce`` (the all-reduce of the results), ``total``, and ``communication`` (the sum of the
#: communicating stages under a launcher; 0 in one process). Graph, partition and handshake are 0
#: on calls that reuse the last build.
TIMING_KEYS = ("broadcast", "partition", "graph", "handshake", "edges", "evaluate", "exchange",
               "reduce", "total", "communication")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Results of one evaluation, float64, in the system's atom order.

    Attributes:
        energy: total energy, eV.
        energies: (N,) per-atom energies, eV.
        forces: (N, 3) forces, eV/Å.
        virial: (3, 3) ``dE/d(strain)`` (symmetrised), eV; stress is ``virial / volume``.
    """

    energy: float
    energies: np.ndarray
    forces: np.ndarray
    virial: np.ndarray



class Runner:
    """Evaluates a system split into parts: in this process (``comm=None``) or, one shard per
    rank, on torch.distributed's default process group (``comm="torch"``, already initialised).

    It orchestrates: the build (``runtime/build.py``) and its reuse, the memory budget
    (``runtime/budget.py``), the evaluation all at once (``runtime/parallel.py``) or one part at a
    time (``runtime/sequential.py``), and the communication (``runtime/comm.py``).

    Args:
        model: the model; copied once per device (the caller's module is not modified).
        options: the checked ``distmlip.options.Options``. In one process, one worker per entry of
            ``device`` (a thread each when there are several); part blocks go to workers in order.
            Under a launcher ``device`` is this rank's device. ``num_parts``: parts in all
            (``None``: one per worker; ``"auto"``: one per worker, more if the budget needs; under
            a launcher a multiple of the ranks, each evaluating a contiguous block as one shard).
            ``max_memory`` (``options.budget_bytes``): bytes one evaluation may add on each device;
            if the parts all at once are predicted to fit, they run so, otherwise one at a time,
            as few parts as fit (at least ``num_parts``). ``timeout``: seconds to wait for
            peers. ``skin``: the graph holds pairs within ``cutoff + skin`` and is reused until
            some atom has moved more than ``skin / 2`` (or the cell, periodicity or numbers change).
        comm: ``None`` (this process) or ``"torch"`` (torch.distributed).
        sequential: ``True``: evaluate each worker's parts one at a time (bounded memory, exact);
            ``False``: all at once as one union graph; ``None`` (default): all at once unless
            ``max_memory`` needs otherwise.

    ``Runner(model, devices, dtype, partitioner, mode, num_parts, skin, **options)`` (the
    form before ``Options``) reads those through ``Options.from_kwargs`` (``devices`` is
    ``device``).

    After each call: ``last_plan`` (the parts this process evaluates), ``last_graph`` (the graph
    they index: the whole system's in one process, this rank's region under a launcher),
    ``timings`` (seconds per stage; the same keys on both backends), ``graph_builds`` (rebuilds so
    far), ``last_exchange_calls``, ``last_run`` (a ``RunInfo``: parts used, at once, predicted
    peak), ``rank`` and ``world_size``.
    """

    def __init__(self, model: DistributableModel, options, *legacy, comm: str | None = None,
                 sequential: bool | None = None, **legacy_options):
        if not isinstance(options, Options):
            named = dict(zip(_LEGACY_POSITIONS, (options, *legacy), strict=False))
            options = Options.from_kwargs(**_legacy_keywords(named, legacy_options))
        self.options = options
        self.devices = options.devices
        self.dtype = options.torch_dtype or model.dtype
        self.partitioner, self.mode = options.partitioner, options.mode
        self.skin, self.timeout, self.progress = options.skin, options.timeout, options.progress
        self.cutoff = float(model.cutoff)
        self.num_hops = int(model.num_layers) if self.mode == "extended" else 1
        self.comm = make_comm(comm, self.devices, self.timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        parts = options.num_parts
        if not isinstance(parts, int):  # None or "auto": one part per worker
            parts = self.comm.num_workers if parts == "auto" or self.world_size > 1 else 1
        self.num_parts = parts
        self.budget = options.budget_bytes
        self._source = model  # the caller's module: memory calibrations are cached per it
        self.replicas: dict[torch.device, DistributableModel] = {}
        for device in self.devices:
            if device not in self.replicas:
                self.replicas[device] = replica(model, device, self.dtype)
        self.builder = Builder(self.comm, self.partitioner, self.mode, self.num_hops, self.cutoff, self.skin,
                               options.neighbors)
        self.planner = Planner(self.builder, self.replicas[self.devices[0]], model, self.dtype, self.budget,
                               parts, sequential)
        # per forward, the kinds of its communicating calls, "halo_exchange" (halo mode) or
        # "global_sum", in order (bounded memory; found on the first call)
        self._levels: tuple[str, ...] | None = None
        self.graph_builds = 0
        self.last_exchange_calls = 0
        self.result_bytes_sent = 0  # float64 bytes of results this rank sent in the last step
        self.stage = "starting"  # what the evaluation under way is doing (named in errors)
        self.timings: dict[str, float] = {}
        self._built: Built | None = None
        check_steps_early(self)

    @property
    def _sequential(self) -> bool | None:
        """``sequential`` as given (``True``/``False``/``None``: as the budget needs)."""
        return self.planner.sequential

    @_sequential.setter
    def _sequential(self, value: bool | None) -> None:
        self.planner.sequential = value

    @property
    def memory_model(self):
        """The model's calibrated memory costs (``runtime/memory.py``), once a budget needed them."""
        return self.planner.memory_model

    def _memory(self, positions, cell, pbc, numbers):
        """The model's calibrated memory costs (probes built from this system; cached)."""
        return self.planner.memory(positions, cell, pbc, numbers)

    def predict(self, b: Built, memory, inside: np.ndarray | None = None) -> dict:
        """Predicted bytes one evaluation of build ``b`` adds (``Planner.predict``)."""
        return self.planner.predict(b, memory, inside)

    def _build(self, positions, cell, pbc, numbers, times: dict) -> Built:
        return self.planner.build(positions, cell, pbc, numbers, times)

    # ------------------------------------------------------------------ public
    @property
    def sequential(self) -> bool:
        """Whether the last build evaluates each worker's parts one at a time."""
        if self._built is not None:
            return self._built.sequential
        return bool(self._sequential)

    @property
    def layer_steps(self) -> bool:
        """Whether parts evaluated one at a time use the model's layer protocol when it has one
        (``False``: the generic replay, kept for comparison; set before the first call)."""
        return self.planner.layer_steps

    @layer_steps.setter
    def layer_steps(self, value: bool) -> None:
        self.planner.layer_steps = bool(value)

    @property
    def predicted_peak(self) -> float:
        """Bytes the current build is predicted to add per evaluation (set when ``max_memory``
        chose it; 0.0 otherwise)."""
        return 0.0 if self._built is None else float(self._built.predicted)

    @property
    def last_run(self) -> RunInfo | None:
        """How the current build splits the system (parts used, at once, predicted peak);
        ``None`` before the first evaluation."""
        b = self._built
        if b is None:
            return None
        parts = int(b.plan.num_parts)
        at_once = min(self.comm.num_workers, parts) if b.sequential else parts
        return RunInfo(parts, max(at_once, 1), bool(b.sequential),
                       float(b.predicted) if self.budget is not None else None,
                       None if self.budget is None else int(self.budget))

    @property
    def last_shards(self) -> list[Shard]:
        """The shards (one per worker of this process: its parts' rows, edges, halo blocks) of the
        current build."""
        return [] if self._built is None else list(self._built.shards)

    @property
    def last_plan(self) -> PartitionPlan | None:
        return None if self._built is None else self._built.plan

    @property
    def last_graph(self) -> NeighborGraph | None:
        return None if self._built is None else self._built.graph

    def build_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The positions and cell the current build (graph, plan, shards) was made from (``None``
        before the first call): with ``rebuild_at`` a restart makes the same build, and so sums in
        the same order, as the run it continues."""
        b = self._built
        return None if b is None else (b.positions.copy(), b.cell.copy())

    def rebuild_at(self, positions, cell, pbc, numbers) -> None:
        """Build now from this system (a ``build_reference``; under a launcher, rank 0's); the
        next calls reuse the build while the system stays within the skin."""
        positions, cell, pbc, numbers = self.comm.system(positions, cell, pbc, numbers)
        self._built = None
        self._built = self.planner.build(positions, cell, pbc, numbers,
                                         {"partition": 0.0, "graph": 0.0, "handshake": 0.0})
        self.graph_builds += 1

    def evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        """Evaluate the system (under a launcher: rank 0's); every rank returns the same results.
        A device out of memory raises ``MemoryError`` naming the device, the stage and torch's
        message, with the advice (under a launcher the other ranks stop too, as for any failure)."""
        if self.world_size == 1:
            return self._evaluate_named(positions, cell, pbc, numbers)
        try:
            return self._evaluate_named(positions, cell, pbc, numbers)
        except CommunicationError as exc:
            raise self._peer_failure(exc, peer_status(self.rank, exc.peers or None)) from exc
        except RuntimeError as exc:
            if not is_comm_failure(exc):
                report_failure(self.rank, exc)
                raise
            raise self._peer_failure(exc, peer_status(self.rank)) from exc
        except BaseException as exc:
            report_failure(self.rank, exc)
            raise

    def _evaluate_named(self, positions, cell, pbc, numbers) -> Evaluation:
        """``_evaluate``, a device out of memory raised as the clear ``MemoryError``."""
        try:
            return self._evaluate(positions, cell, pbc, numbers)
        except (RuntimeError, MemoryError) as exc:
            clear = None if is_comm_failure(exc) else self._out_of_memory(exc)
            if clear is None:
                raise
            raise clear from exc

    def _out_of_memory(self, exc: BaseException) -> MemoryError | None:
        """The clear error of a device out of memory during the step (``None``: ``exc`` is not
        one): torch's ``OutOfMemoryError``, its CPU allocator's failure, NumPy's ``MemoryError``."""
        text = str(exc)
        # torch's CPU allocator raises a plain RuntimeError: known by its own name in the message
        # (an error of the model's that merely says "out of memory" is not relabelled)
        if not (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "DefaultCPUAllocator" in text
                or "backend out of memory" in text):
            return None
        lines = [line for line in text.splitlines() if line.strip()]
        said = lines[0].strip() if lines else type(exc).__name__
        devices = ", ".join(str(d) for d in self.comm.devices)
        budget = (f"a smaller max_memory than {self.budget:,} bytes" if self.budget is not None
                  else "max_memory= (e.g. max_memory=0.8: the parts are sized to fit and run "
                       "one at a time)")
        return MemoryError(
            f"device {devices}: out of memory while {self.stage} ({said}); expected the step to "
            f"fit on the device: give the run {budget}, more parts (num_parts=) or more devices, "
            f"or use a device with more free memory")

    def _peer_failure(self, exc: BaseException, status: str) -> CommunicationError:
        """The error of a rank whose collective failed, naming what is known of the peers; said at
        once on stderr too (the launcher may kill this process before Python prints the error)."""
        message = (f"rank {self.rank} stopped: a collective with the other ranks failed or timed "
                   f"out (timeout {self.timeout:g} s) because "
                   + (status or "a peer has failed, died or hung") + f". {exc}")
        print(f"distmlip: {message}", file=sys.stderr, flush=True)
        return CommunicationError(message, printed=True)

    def _evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        t0 = time.perf_counter()
        self.stage = "receiving the system"
        positions, cell, pbc, numbers = self.comm.system(positions, cell, pbc, numbers)
        t1 = time.perf_counter()
        times = {"partition": 0.0, "graph": 0.0, "handshake": 0.0}
        if self.budget is not None:
            release_memory_eagerly()  # the build, measured in the calibration's mode
        if self.comm.agree(self.builder.stale(self._built, positions, cell, pbc, numbers)):
            self._built = None  # the old build is freed before the new one is made (the peak)
            self.stage = "building the neighbour graph and the parts"
            self._built = self.planner.build(positions, cell, pbc, numbers, times)
            self.graph_builds += 1
        self.stage = "evaluating the model"
        b = self._built
        b.now_cell = cell
        b.step = StepState(b, positions, cell)  # positions go to each device once this step
        n = len(positions)
        t2 = time.perf_counter()
        steps = bool(b.sequential) and uses_steps(self)
        if self.budget is not None:  # the mode the prediction was made for
            allocator_for(steps)
        if b.sequential:
            if steps:
                self._levels, exchange_s = evaluate_steps(self, b, positions)
            else:
                self._levels, exchange_s = evaluate_sequential(self, b, positions, self._levels)
            self.last_exchange_calls = self._levels.count("halo_exchange")
            t3 = t2
        else:
            edges_s, self.last_exchange_calls, exchange_s = evaluate_all(self, b, positions)
            t3 = t2 + edges_s
        t4 = time.perf_counter()
        self.stage = "gathering the results"
        if self.world_size > 1:  # halo forces home, owned rows gathered: no O(N) all-reduce
            total = gather_results(self.comm, b, b.step)
            self.result_bytes_sent = results_plan(self.comm, b).bytes_sent()
        else:  # energies (N), forces (N, 3), virial (3, 3): one copy back per device
            total = np.zeros(4 * n + 9)
            b.step.flush(total)
        b.step = None
        t5 = time.perf_counter()
        self.timings = {
            "broadcast": t1 - t0, **times, "edges": t3 - t2, "evaluate": t4 - t3,
            "exchange": exchange_s, "reduce": t5 - t4, "total": t5 - t0,
        }
        self.timings["communication"] = (self.timings["broadcast"] + times["handshake"] + exchange_s
                                         + self.timings["reduce"]) if self.world_size > 1 else 0.0
        if not np.isfinite(total).all():  # every rank holds the same sums: they all raise
            self._refuse_non_finite(total, n)
        energies = total[:n]
        virial = total[4 * n :].reshape(3, 3)
        return Evaluation(float(energies.sum()), energies.copy(), total[n : 4 * n].reshape(n, 3).copy(),
                          0.5 * (virial + virial.T))

    def _refuse_non_finite(self, total: np.ndarray, n: int) -> None:
        name = type(self._source).__name__
        energies, forces = total[:n], total[n : 4 * n].reshape(n, 3)
        bad = np.flatnonzero(~np.isfinite(energies))
        if len(bad):
            raise ValueError(
                f"model: {name} returned NaN or inf energies for atoms {bad[:5].tolist()} "
                f"({len(bad)} in all); expected finite per-atom energies (check the structure "
                f"and the model's inputs)"
            )
        bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
        raise ValueError(
            f"model: {name} gave NaN or inf " + (f"forces on atoms {bad[:5].tolist()} ({len(bad)} in all)"
                                                 if len(bad) else "stress")
            + "; expected finite gradients with respect to the edge vectors (a non-smooth or "
              "singular function of distances?)"
        )


#: ``Runner(model, devices, dtype, partitioner, mode, num_parts, skin, ...)``: the positions
#: of the form before ``Options``.
_LEGACY_POSITIONS = ("device", "dtype", "partitioner", "mode", "num_parts", "skin")


def _legacy_keywords(named: dict, keywords: dict) -> dict:
    """The options of the form before ``Options`` (``max_memory`` was bytes, ``devices`` a list)."""
    out = {**named, **keywords}
    if "devices" in out:
        out["device"] = out.pop("devices")
    unknown = set(out) - set(NAMES)
    if unknown:
        raise TypeError(f"Runner: unexpected keyword(s) {sorted(unknown)}; the options are {list(NAMES)}")
    return out
