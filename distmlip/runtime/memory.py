"""Memory: what one evaluation adds on a device, measured and predicted, and a budget parser.

The model's own cost is calibrated, not guessed: forward and backward passes on small probe
systems (periodic repeats of the system being evaluated, at its density and compressed, so that
edges per atom vary) measure the peak added memory, and a least-squares fit gives bytes per local
row, per edge and a constant. distmlip's own arrays (graph, plan, shards, stored exchange rows) are
counted from their sizes.

Calibrations are cached in the process per model object, dtype and device, and on disk, so that a
model is calibrated once per machine rather than once per process (``calibrate``; ``cache_dir``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ..graph import NeighborGraph
from ..graph.neighbors import complete_cell
from ..models.base import DistributableModel, HaloExchange, edge_entries, has_steps
from ..options import device_free_memory, device_total_memory, parse_budget
from .cache import cache_dir, cache_file, calibration_key, model_fingerprint, write_json
from .local import local_graph, run_model

__all__ = ["MemoryModel", "PeakMeter", "allocator_for", "cache_dir", "calibrate", "reuse_memory",
           "device_free_memory", "device_total_memory", "model_fingerprint", "parse_budget"]
# cache_dir, model_fingerprint: from runtime/cache.py; the device and budget functions: from distmlip.options

log = logging.getLogger("distmlip")

# bytes per edge held by distmlip's own arrays (int32 ids, int8 shifts; float64 vectors)
GRAPH_BYTES_PER_EDGE = 11  # NeighborGraph: senders, receivers (4 + 4), shifts (3 x 1)
# while building: vesin's output (28), the sort order (8) and the compact copies (measured 52.6
# on 108,000 Al atoms, 4.5 M edges; 90.7 when the copies were int64)
GRAPH_BUILD_BYTES_PER_EDGE = 56
# built in chunks (bounded memory): the kept pieces (11), one whole array while they are
# scattered into it (4) with their places, the heap's holes between pieces (~3); per atom the
# chunking's own arrays (fractional coordinates, grid cells, chunk ids, degrees, offsets: ~100);
# on top of one chunk's build (GRAPH_BUILD_BYTES_PER_EDGE of its edges). Measured on Al at 5.5 Å
# (fresh processes, both allocator modes): 32,000 atoms 22.6-28.7 bytes an edge in all (predicted
# 24.3), 108,000 atoms 21.2-21.8 (predicted 24.0)
GRAPH_CHUNKED_BYTES_PER_EDGE = 18
GRAPH_CHUNKED_BYTES_PER_ATOM = 100
PLAN_BYTES_PER_EDGE = 12  # per part: edge ids (4) and local edge_index (2 x 4)
LEAN_PLAN_BYTES_PER_EDGE = 4  # parts one at a time: edge ids only (partition.plan.part_edge_index)
CALL_BYTES_PER_EDGE = 64  # per call, numpy: vectors (24), kept copies, gradients (24), masks
PROBE_TARGET_BYTES = 150e6  # the first calibration probe grows until it adds about this much
# ... but a budget limits it to a sixth of the budget, never below this: smaller probes are
# measured in the allocator's granularity (pages, arenas) and their fit is noise
MIN_PROBE_BYTES = 4e6
DENSE_PROBE_WEIGHT = 0.1  # weight of the compressed probes in the calibration fit
OUTLIER = 0.08  # a probe this far (relative) from the fit is measured again


def graph_build_bytes(graph: NeighborGraph) -> float:
    """The predicted peak of building ``graph`` (bytes): vesin's output and the compact copies
    for every edge built at once; in chunks, the largest chunk's, the pieces kept and the
    chunking's per-atom arrays."""
    if graph.chunked:
        return float(GRAPH_BUILD_BYTES_PER_EDGE * graph.build_edges
                     + GRAPH_CHUNKED_BYTES_PER_EDGE * graph.num_edges
                     + GRAPH_CHUNKED_BYTES_PER_ATOM * graph.num_atoms)
    return float(GRAPH_BUILD_BYTES_PER_EDGE * graph.num_edges)


class PeakMeter:
    """Peak memory added on a device while the ``with`` block runs, in bytes (``.peak``).

    CPU: the process's resident set (Linux's peak, reset through /proc/self/clear_refs) above what
    it was on entry. CUDA: ``torch.cuda.max_memory_allocated`` above the allocation on entry."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            self.base = self._status("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:  # pragma: no cover - not Linux, or not allowed
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self.base)
        else:
            self.peak = max(0, self._status("VmHWM") - self.base)
        return False


def reuse_memory() -> None:
    """How a bounded evaluation by steps allocates (process-wide, glibc): blocks below 32 MiB
    (glibc's largest mmap threshold) from the heap, where the next part reuses what the last one
    freed, and the heap trimmed when 64 MiB are free at its top. Evaluating parts one at a time
    allocates the same tensors again and again: served by fresh mappings (``release_memory_eagerly``)
    each one is faulted in page by page, which took half of the CPU time (SchNet, 13,824 atoms,
    0.3x budget: 5.2 s against 3.0 s this way; SevenNet-0: 7-8 s of kernel time in a 17.7 s call).

    Only for the steps (``allocator_for``): their parts are small (``budget.PART_BYTES``) and
    trimmed between steps; their peaks measured 0.79-0.83 of the prediction this way (SchNet 864
    atoms, 0.35x, 3 parts: 62-66 MB measured, 52 predicted, a 69 MB budget; 42 MB in the
    calibration's mode, at 0.6 s of CPU against 0.4 s). A part evaluated
    whole (all at once, the generic replay) holds saved activations for its backward between
    short-lived tensors, and the holes these leave in the heap are resident but too small for the
    next tensors: under this mode such peaks measured 20-50% above the calibration's (SchNet 864
    atoms all at once: 208 MB against 139 MB in the calibration's mode, 137 predicted; the
    generic replay at 0.35x: 79 MB for a 69 MB budget)."""
    _mallopt(32 << 20)


def release_memory_eagerly() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the
    system when freed (by default the threshold rises after the first large free, and freed
    tensors then stay in the heap: resident memory would keep the high-water mark of every part
    evaluated so far). The mode the calibration measures in, which it leaves the process in, and
    the mode of every evaluation under a budget but the steps' (``allocator_for``); process-wide."""
    _mallopt(1 << 20)


def allocator_for(steps: bool) -> None:
    """Put the process in the allocator mode an evaluation under a budget was predicted for:
    ``reuse_memory`` for parts evaluated by steps (``steps``), else the calibration's own
    ``release_memory_eagerly``. Each evaluation under a budget sets it (runtime/runner.py)."""
    (reuse_memory if steps else release_memory_eagerly)()


def _mallopt(mmap_threshold: int) -> None:
    """glibc: allocations of ``mmap_threshold`` bytes or more get their own mapping; the heap is
    trimmed when 64 MiB are free at its top."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _trim() -> None:
    """Give freed heap memory back to the system (glibc), so RSS measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


@dataclass(frozen=True)
class MemoryModel:
    """Calibrated memory cost of one model on one device and dtype.

    Attributes:
        per_row: bytes per local row whose node updates are computed (owned rows in halo mode,
            every row otherwise), for an evaluation with forces (forward + backward).
        per_halo_row: bytes per halo row that is only read (halo mode).
        per_edge: bytes per edge (within the cutoff).
        constant: bytes of a part of any size.
        widths: bytes per row of the features given to each ``halo_exchange`` call, in order.
        probes: ``(updated rows, halo rows, edges, measured bytes)`` of the calibration runs.
        state_widths: for a model with the layer protocol, bytes per row of the state each step
            but the last returns (every entry but the edge entries, levels 0 .. L-2): what a
            bounded evaluation by steps stores; empty otherwise.
        edge_state_widths: the same for the edge entries (``DistributableModel.edge_entries``),
            bytes per edge of the part (their rows summed over the probe's edges: an angle entry
            is priced per edge at the probe's angles per edge); empty without edge entries.
    """

    per_row: float
    per_halo_row: float
    per_edge: float
    constant: float
    widths: tuple[int, ...]
    probes: tuple[tuple[int, int, int, int], ...] = ()
    state_widths: tuple[int, ...] = ()
    edge_state_widths: tuple[int, ...] = ()

    def part(self, rows, edges, halo_rows=0) -> float:
        """Peak bytes while a part is evaluated: ``rows`` updated rows, ``halo_rows`` read-only
        rows, ``edges`` edges."""
        return float(self.constant + self.per_row * rows + self.per_halo_row * halo_rows
                     + self.per_edge * edges)

    def stored(self, rows: int, steps: bool = False, edges: int = 0) -> float:
        """Bytes of the rows kept when parts are evaluated one at a time (``rows``: the worker's
        local rows, ``edges``: its parts' edges). The generic replay: the exchanged rows Z and
        their gradients G of every level, plus one level being posted. By steps (``steps`` and
        ``state_widths`` known): the largest of the forward (every level's state, plus one being
        posted; edge entries are stored as returned, nothing posted) and each backward step j
        (the states of levels below j, the gradient of level j - 1 being summed and that of level
        j being read; see runtime/steps.py), edge entries priced per edge."""
        w = self.state_widths
        if not (steps and w):
            return float((2 * sum(self.widths) + max(self.widths, default=0)) * rows)
        we = tuple(self.edge_state_widths) or (0,) * len(w)
        peak = (sum(w) + max(w)) * rows + sum(we) * edges
        for j in range(1, len(w) + 1):
            held = [(sum(v[:j]) + v[j - 1] + (v[j] if j < len(v) else 0)) for v in (w, we)]
            peak = max(peak, held[0] * rows + held[1] * edges)
        return float(peak)


class _PadExchange(HaloExchange):
    """A probe's exchange: the owned rows, then zeros for the halo rows; records the widths."""

    def __init__(self, num_owned: int, num_rows: int):
        super().__init__(num_owned, num_rows)
        self.widths: list[int] = []

    def __call__(self, x):
        self.calls += 1
        owned = x[: self.num_owned]
        self.widths.append(int(owned[0].numel() * owned.element_size()) if len(owned) else 0)
        if self.num_owned == self.num_rows:
            return x
        pad = owned.new_zeros((self.num_rows - self.num_owned, *owned.shape[1:]))
        return torch.cat([owned, pad])


_CACHE: weakref.WeakKeyDictionary[DistributableModel, dict] = weakref.WeakKeyDictionary()


def _probe_graph(atoms, cutoff: float, target_atoms: int, scale: float):
    """A probe of about ``target_atoms`` atoms like ``atoms``, lengths scaled by ``scale`` (density
    changes edges per atom): a periodic repeat of a small system, a cluster cut out of a large
    one (its surface gives it fewer edges per atom), or the system itself."""
    base = atoms.copy()
    periodic = [bool(p) for p in base.pbc]
    if any(periodic) and len(base) < target_atoms:
        # at least the target: repeat the periodic direction that is shortest so far, one cell at
        # a time (a rounded cube root left a small cell unrepeated, every probe the same 100-atom
        # system measured at a few MB, where the allocator's granularity spread predictions by 12%)
        lengths = base.cell.lengths()
        reps = [1, 1, 1]
        while len(base) * reps[0] * reps[1] * reps[2] < target_atoms:
            axis = min((k for k in range(3) if periodic[k]), key=lambda k: reps[k] * lengths[k])
            reps[axis] += 1
        base = base.repeat(tuple(reps))
    elif len(base) > 2 * target_atoms:
        # a sphere around the middle atom, periodic images unfolded (minimum image)
        cell = complete_cell(base.cell.array, np.asarray(base.pbc))
        frac = (base.positions - base.positions[len(base) // 2]) @ np.linalg.inv(cell)
        frac[:, periodic] -= np.round(frac[:, periodic])
        d = frac @ cell
        r2 = np.einsum("ij,ij->i", d, d)
        keep = np.argsort(r2)[:target_atoms]
        base = Atoms(base.numbers[keep], d[keep], pbc=False)
    if scale != 1.0:
        if base.pbc.any():
            base.set_cell(base.cell.array * scale, scale_atoms=True)
        else:
            base.positions = base.positions * scale
    return NeighborGraph.from_atoms(base, cutoff)


def _state_widths(model: DistributableModel, graph, dtype: torch.dtype,
                  device: torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bytes per row of each level's state (every step's output but the last's) of a model with
    the layer protocol, run on a probe graph, and bytes per edge of its edge entries (their bytes
    over the probe's edges, rounded up); empty without steps, or if they fail here (the runtime's
    own check names the failure when it first uses them)."""
    if not has_steps(model):
        return (), ()
    local = probe_local(graph, dtype, device)
    num_edges = local.num_edges
    widths, edge_widths = [], []
    try:
        edges = edge_entries(model)
        with torch.no_grad():
            state = model.embed(local)
            for i in range(int(model.num_steps) - 1):
                state = model.step(i, local, state)
                widths.append(sum(t[:1].numel() * t.element_size() for e, t in enumerate(state)
                                  if isinstance(t, torch.Tensor) and t.ndim and len(t) and e not in edges))
                edge_widths.append(math.ceil(sum(t.numel() * t.element_size() for e, t in enumerate(state)
                                                 if e in edges) / max(num_edges, 1)))
    except Exception:  # noqa: BLE001 - the steps' own check (runtime/steps.py) reports it
        return (), ()
    return tuple(int(w) for w in widths), (tuple(int(w) for w in edge_widths) if edges else ())


def probe_local(graph, dtype: torch.dtype, device: torch.device):
    """A probe graph as one unsplit ``LocalGraph`` (every row owned), as the runtime makes them."""
    numbers, edge_index, vec, _ = _part_of(graph, 1.0)
    n = len(numbers)
    return local_graph(numbers, edge_index, vec, _PadExchange(n, n), np.arange(n), graph.cell, n, n,
                       dtype, device, requires_grad=False)


def _part_of(graph, fraction: float):
    """A halo-mode part of a probe graph: the ``fraction`` of atoms lowest along the first
    Cartesian axis owned, the atoms sending to them as halo. Returns
    (numbers, edge_index (local), edge vectors (float64), num_owned)."""
    n = graph.num_atoms
    owned_mask = np.zeros(n, dtype=bool)
    if fraction >= 1.0:
        owned_mask[:] = True
    else:
        owned_mask[np.argsort(graph.positions[:, 0], kind="stable")[: max(1, int(fraction * n))]] = True
    edges = np.flatnonzero(owned_mask[graph.receivers])
    needed = owned_mask.copy()
    needed[graph.senders[edges]] = True
    order = np.concatenate([np.flatnonzero(owned_mask), np.flatnonzero(needed & ~owned_mask)])
    row = np.full(n, -1, dtype=np.int64)
    row[order] = np.arange(len(order))
    edge_index = np.stack([row[graph.senders[edges]], row[graph.receivers[edges]]])
    return graph.numbers[order], edge_index, graph.edge_vectors(edges), int(owned_mask.sum())

# ---------------------------------------------------------------------- the calibration cache on disk
#: the on-disk format; a file of another schema is ignored (warned once) and rewritten
CACHE_SCHEMA = 1
_warned_files: set[str] = set()


def _to_json(room: float, m: MemoryModel) -> dict:
    return {"room": None if math.isinf(room) else float(room), "per_row": m.per_row,
            "per_halo_row": m.per_halo_row, "per_edge": m.per_edge, "constant": m.constant,
            "widths": list(m.widths), "probes": [list(p) for p in m.probes],
            "state_widths": list(m.state_widths), "edge_state_widths": list(m.edge_state_widths)}


def _from_json(entry: dict) -> tuple[float, MemoryModel]:
    room = math.inf if entry["room"] is None else float(entry["room"])
    values = [float(entry[k]) for k in ("per_row", "per_halo_row", "per_edge", "constant")]
    if not all(math.isfinite(v) and v >= 0 for v in values) or not room > 0:
        raise ValueError("a negative or non-finite coefficient")
    return room, MemoryModel(*values, widths=tuple(int(w) for w in entry["widths"]),
                             probes=tuple(tuple(int(x) for x in p) for p in entry["probes"]),
                             state_widths=tuple(int(w) for w in entry.get("state_widths", ())),
                             edge_state_widths=tuple(int(w) for w in entry["edge_state_widths"]))


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned_files:
        _warned_files.add(str(path))
        warnings.warn(f"distmlip: ignoring the memory calibration cache {path} ({why}); it will be "
                      f"recalibrated and rewritten", RuntimeWarning, stacklevel=4)


def _read_cache(path: Path | None, key: dict) -> list[tuple[float, MemoryModel]] | None:
    """The calibrations stored for ``key`` (``None``: no file, or one not to trust: warned once)."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("distmlip: cannot read the calibration cache %s: %s", path, exc)
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
            raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                             f"expected {CACHE_SCHEMA}")
        if data.get("key") != key:
            raise ValueError("written for another model, version or device")
        # an entry written before edge entries were priced is dropped (recalibrated, silently)
        return [_from_json(e) for e in data["calibrations"] if "edge_state_widths" in e]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        _warn_once(path, f"{type(exc).__name__}: {exc}")
        return None


def _write_cache(path: Path | None, key: dict, entries: list[tuple[float, MemoryModel]]) -> None:
    """Write the calibrations of ``key`` (``cache.write_json``)."""
    write_json(path, {"schema": CACHE_SCHEMA, "key": key,
                       "calibrations": [_to_json(r, m) for r, m in entries]})


def calibrate(model: DistributableModel, atoms, dtype: torch.dtype, device: torch.device,
              limit: float | None = None, key: DistributableModel | None = None,
              any_room: bool = False) -> MemoryModel:
    """Measure ``model``'s memory per updated row, per halo row and per edge on probes built from
    ``atoms`` (cached per ``key`` model (default ``model``), dtype and device). ``model`` must
    already be on ``device`` in ``dtype``; it may be a function returning such a model, called only
    when nothing cached fits (a copy of a large model costs more than reading the cache).
    ``limit``: the budget (bytes); the first probe grows to a sixth of it at most (never below
    ``MIN_PROBE_BYTES``). ``any_room``: reuse any calibration
    cached for this model, whatever its room (else calibrate without a limit): the floor
    (``minimum_memory``) then names the figure the calculator's error names, in either order.

    Probes: whole periodic repeats (every row updated) at two sizes and two densities, and
    halo-mode parts of them (owned rows updated, halo rows only read), so that the three costs
    separate; a non-negative least-squares fit gives them.

    Disk cache: a calibration is also kept in ``cache_dir()/memory/<hash>.json`` (JSON: ``schema``,
    ``key``, ``calibrations``, each with its ``room`` and coefficients), keyed by the model's
    ``model_fingerprint`` (type and weights), its type name, the dtype, the device type, the
    distmlip and torch versions and the system's elements and periodic directions; another process
    calibrating the same model reads it instead of measuring (milliseconds instead of seconds).
    Written atomically (safe when ranks calibrate at once; the last writer wins); an unwritable
    directory is a debug note (logger ``distmlip``); a file that does not parse or holds another
    key or schema is ignored with one warning and rewritten.

    Run-to-run spread (measured on the project's shared 2-core machine, fresh processes, no disk
    cache). Without a budget the probes grow to ~150 MB and predictions agree within 0.6%
    (SchNet, 64 channels, 6,912 Cu atoms: 2.381-2.396 GB over 4 processes; 32 channels, 864
    atoms: 160.30-160.63 MB over 5). Under a budget the probes take a sixth of it and two things
    spread the predicted peak (``max_memory="300MB"``, the same system: 254-277 MB over 9
    processes, 9%): (1) the fit: the per-edge cost is stable within 2%, but per row, per halo row
    and the constant trade off against each other (rows and edges grow together in the probes), so
    one part's prediction moves by about 2%; (2) the budget search, which amplifies (1): the peak
    predicted is that of the fewest parts that fit, and a small change of the coefficients may
    change the number of parts, and with it the peak, anywhere below the budget (a step, not a
    calibration error; the budget is met either way). The largest spread came from small periodic
    cells: a 108-atom cell was not repeated (a rounded cube root), so every probe was that cell at
    ~16 MB, where the allocator's granularity shows: 994-1121 MB (12%) predicted over 4 processes
    for 6,912 atoms (SchNet, 16 channels; 731 MB measured). Probes now reach their target size:
    887-889 MB (0.2%). Repeating probes does not help: one probe's
    measurement repeats within 0.7% at ~150 MB. The disk cache removes the spread between processes: every
    process on a machine uses the first calibration, and the same system gets the same parts and
    prediction each run."""
    source = key if key is not None else model
    cache = _CACHE.setdefault(source, {})
    # the room the probes may take; a calibration made with at least as much room is reused (its
    # larger probes are the better measurement), so every budget below 6 x MIN_PROBE_BYTES shares
    # one calibration and the smallest budget an error names is the one the next call checks
    room = np.inf if limit is None else max(float(limit), 6 * MIN_PROBE_BYTES)
    least = 0.0 if any_room else room  # the least room of a calibration to reuse
    usable = [(r, m) for (d, dev, r), m in cache.items() if (d, dev) == (str(dtype), str(device))
              and r >= least]
    if usable:
        return max(usable, key=lambda item: item[0])[1]
    disk_key = calibration_key(source, atoms, dtype, device)
    path = cache_file("memory", disk_key)
    stored = _read_cache(path, disk_key)
    usable = [(r, m) for r, m in stored or () if r >= least]
    if usable:
        r, result = max(usable, key=lambda item: item[0])
        cache[(str(dtype), str(device), r)] = result
        return result
    key = (str(dtype), str(device), room)
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    release_memory_eagerly()
    def measure(graph, fraction: float = 1.0) -> tuple[int, int, int, int, list[int]]:
        numbers, edge_index, vec, num_owned = _part_of(graph, fraction)
        n = len(numbers)
        exchange = _PadExchange(num_owned, n)
        with PeakMeter(device) as meter:
            local = local_graph(numbers, edge_index, vec, exchange, np.arange(n), graph.cell, num_owned,
                                num_owned, dtype, device)
            energy = run_model(model, local).sum()
            if energy.requires_grad:
                torch.autograd.grad(energy, [local.edge_vec])
            del energy, local
        return num_owned, n - num_owned, edge_index.shape[1], meter.peak, exchange.widths

    tiny_graph = _probe_graph(atoms, model.cutoff, 16, 1.0)
    measure(tiny_graph)  # warm-up: one-time allocations
    # a part of any size costs at least the constant: a small part measured after the warm-up
    # bounds it (the fit extrapolates the constant from probes of hundreds of MB, where a few
    # percent of one probe move it by tens of MB: a floor of 106 MB named for a 93 MB system)
    tiny = measure(tiny_graph)
    # size the probes so that the model's activations dominate the allocator's granularity: grow
    # a first probe until it adds ~150 MB (or reaches 4096 atoms), within a sixth of the limit
    target = min(PROBE_TARGET_BYTES, room / 6)
    size = 64
    first = measure(_probe_graph(atoms, model.cutoff, size, 1.0))
    while first[3] > 2 * target and size > 8 and first[0] > 8:  # a heavy model: shrink
        size //= 2
        first = measure(_probe_graph(atoms, model.cutoff, size, 1.0))
    while first[3] < target and size < 4096 and first[0] >= size // 2:  # grow (monotonic)
        size = min(4096, int(size * min(4.0, max(1.5, target / max(first[3], 1)))))
        first = measure(_probe_graph(atoms, model.cutoff, size, 1.0))
    ratio = min(3.0, max(1.5, room / (3 * max(first[3], 1))))
    big_graph = _probe_graph(atoms, model.cutoff, int(ratio * first[0]), 1.0)
    dense_graph = _probe_graph(atoms, model.cutoff, int(ratio * first[0]), 0.85)
    # the state a bounded run by steps stores, measured on the largest probe: edge entries of a
    # model that caps its neighbours (Orb) scale with atoms, not edges, and a tiny cluster's few
    # edges per atom priced them 4x too high (Orb, 6,144 atoms: 1,455 parts chosen instead of 7)
    state_widths, edge_state_widths = _state_widths(model, big_graph, dtype, device)
    runs = [lambda: measure(_probe_graph(atoms, model.cutoff, size, 1.0)), lambda: measure(big_graph),
            lambda: measure(_probe_graph(atoms, model.cutoff, first[0], 0.85)),
            lambda: measure(dense_graph), lambda: measure(big_graph, 0.35),
            lambda: measure(dense_graph, 0.35)]
    probes = [first] + [run() for run in runs[1:4]]
    try:
        probes += [run() for run in runs[4:]]
    except Exception:  # noqa: BLE001 - a model that cannot run a part with a zero-filled halo
        # (CHGNet checks its exchanged bond slots): halo rows priced as updated rows (an upper bound)
        pass
    def fitted() -> MemoryModel:
        coef = _fit(probes, tiny[3])
        return MemoryModel(per_row=coef[1], per_halo_row=coef[2], per_edge=coef[3], constant=coef[0],
                           widths=tuple(first[4]), probes=tuple(p[:4] for p in probes),
                           state_widths=state_widths, edge_state_widths=edge_state_widths)

    result = fitted()
    # one measurement off by more than OUTLIER (a page-fault burst, another thread's allocation)
    # tilts the whole fit: such a probe is measured again and its smaller value kept
    remeasured = False
    for k, p in enumerate(probes):
        if abs(result.part(p[0], p[2], p[1]) - p[3]) > OUTLIER * p[3]:
            repeat = runs[k]()
            if repeat[3] < p[3]:
                probes[k], remeasured = repeat, True
    if remeasured:
        result = fitted()
    # the process stays in the mode measured in: an evaluation all at once predicted from it (no
    # budget: ``estimate_memory``) is then measured alike; a budgeted one sets its own (``allocator_for``)
    cache[key] = result
    # the file again: another process may have added a calibration meanwhile
    again = _read_cache(path, disk_key)
    _write_cache(path, disk_key, [*[(r, m) for r, m in again or () if r != room], (room, result)])
    return result


def _fit(probes, cap: float) -> np.ndarray:
    """(constant, per row, per halo row, per edge) from probes ``(rows, halo rows, edges, bytes,
    ...)``: a non-negative least-squares fit, the compressed probes weighted less, and the
    constant at most ``cap`` (a small part's measured bytes; refitted with the constant fixed
    there when the free fit exceeds it)."""
    a = np.array([[1.0, p[0], p[1], p[2]] for p in probes])
    b = np.array([float(p[3]) for p in probes])
    # the compressed probes only separate the per-edge from the per-row cost; a model whose memory
    # is not linear in edges (CHGNet's angles grow faster than its edges) would let them pull the
    # fit away from the system's own density: they count for less
    weight = np.sqrt(np.array([1.0, 1.0, DENSE_PROBE_WEIGHT, DENSE_PROBE_WEIGHT]
                              + [1.0, DENSE_PROBE_WEIGHT][: len(probes) - 4]))
    a, b = a * weight[:, None], b * weight
    halo = any(p[1] for p in probes)
    if not halo:
        a[:, 2] = 0.0
    coef = _nonnegative_lstsq(a, b)
    cap = max(float(cap), 0.0)
    if coef[0] > cap:
        coef = np.concatenate([[cap], _nonnegative_lstsq(a[:, 1:], b - cap * a[:, 0])])
    if not halo:
        coef[2] = coef[1]
    return coef


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0 (active-set search over the few coefficients)."""
    best, best_err = np.zeros(a.shape[1]), np.inf
    cols = range(a.shape[1])
    for mask in range(1, 2 ** a.shape[1]):
        use = [c for c in cols if mask >> c & 1]
        x_sub, *_ = np.linalg.lstsq(a[:, use], b, rcond=None)
        if (x_sub < 0).any():
            continue
        x = np.zeros(a.shape[1])
        x[use] = x_sub
        err = float(np.sum((a @ x - b) ** 2))
        if err < best_err:
            best, best_err = x, err
    return best
