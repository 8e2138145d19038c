"""The periodic neighbour graph of a whole system, built with vesin: its NumPy front-end on the
host (``neighbors="vesin"``) or its torch front-end, vesin-torch, on a device (``"vesin-torch"``;
``"auto"`` takes it on a CUDA device when it is installed). Both give the same graph: the same
edges and shifts, sorted by receiver. On the CPU vesin-torch runs vesin's own code, so the graph
is identical, order included; on another device vesin's kernel appends pairs in no fixed order,
so the edges of each receiver are put in a canonical order there (by sender, then shift).

vesin's CUDA kernel takes fewer systems than its CPU code: it refuses a cutoff above half a
periodic direction's width (a small cell, where an atom meets several images of another) and keeps
a bounded number of pairs per atom. Such a system, or any failure of the device's build, is built
on the host instead (a warning names the reason): the graph is the same either way.
"""

from __future__ import annotations

import ctypes
import inspect
import warnings
from dataclasses import dataclass

import numpy as np

from ..typing import NEIGHBORS

__all__ = ["NeighborGraph", "complete_cell", "index_dtype", "resolve_neighbors", "shift_dtype",
           "validate_system"]


def _fail(arg: str, expected: str, got) -> ValueError:
    return ValueError(f"{arg}: expected {expected}, got {got}")


def validate_system(positions, cell, pbc, numbers=None):
    """Check and normalise a system description.

    Returns ``positions`` (N, 3) float64, ``cell`` (3, 3) float64, ``pbc`` (3,) bool and
    ``numbers`` (N,) int64 (zeros if not given). Raises ``ValueError`` naming the argument, what
    was expected and what was received.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise _fail("positions", "an array of shape (N, 3)", f"shape {positions.shape}")
    if positions.shape[0] == 0:
        raise _fail("atoms", "at least one atom", "an empty system (0 atoms)")
    with np.errstate(over="ignore"):  # one pass (called every step); the rows only if needed
        total = positions.sum()
    if not np.isfinite(total):
        bad = ~np.isfinite(positions).all(axis=1)
        if bad.any():
            first = np.flatnonzero(bad)[:5].tolist()
            raise _fail("positions", "finite coordinates",
                        f"NaN or inf for atoms {first} ({bad.sum()} in all)")
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise _fail("cell", "a (3, 3) matrix", f"shape {cell.shape}")
    if not np.isfinite(cell).all():
        raise _fail("cell", "finite lattice vectors", f"{cell.tolist()}")
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if pbc.any():
        periodic = cell[pbc]
        if np.linalg.matrix_rank(periodic, tol=1e-8 * max(1.0, np.abs(cell).max())) < len(periodic):
            raise _fail(
                "cell",
                f"linearly independent, non-zero lattice vectors along the periodic directions "
                f"(pbc={pbc.tolist()})",
                f"a singular cell {cell.tolist()}; give a proper cell or set pbc=False along "
                f"directions without one",
            )
    if numbers is None:
        numbers = np.zeros(len(positions), dtype=np.int64)
    numbers = np.asarray(numbers, dtype=np.int64)
    if numbers.shape != (len(positions),):
        raise _fail("numbers", f"shape ({len(positions)},)", f"shape {numbers.shape}")
    return positions, cell, pbc, numbers


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """A full-rank (3, 3) cell: periodic vectors kept, non-periodic vectors kept where they are
    independent, the rest replaced by orthonormal vectors spanning the missing directions.
    Gives fractional coordinates to molecules (zero cell) and slabs without a vacuum vector."""
    cell = np.array(cell, dtype=np.float64)
    tol = 1e-8 * max(1.0, np.abs(cell).max())
    kept: list[int] = [a for a in range(3) if pbc[a]]
    for axis in range(3):
        if not pbc[axis] and np.linalg.matrix_rank(cell[kept + [axis]], tol=tol) == len(kept) + 1:
            kept.append(axis)
    missing = [a for a in range(3) if a not in kept]
    if missing:
        if kept:
            null = np.linalg.svd(cell[kept], full_matrices=True)[2][len(kept):]
        else:
            null = np.eye(3)
        for axis, vector in zip(missing, null, strict=True):
            cell[axis] = vector
    return cell


@dataclass(frozen=True, eq=False)
class NeighborGraph:
    """Directed neighbour graph of a whole periodic (or finite) system.

    Edge ``e`` carries a message from ``senders[e]`` to ``receivers[e]``; its vector points from the
    receiver to the sender's periodic image::

        vec[e] = positions[senders[e]] - positions[receivers[e]] + shifts[e] @ cell

    The list is full (both directions of every pair are present), contains every image within
    ``cutoff`` (a cell smaller than the cutoff gives an atom several edges to its own images), and
    is sorted by receiver (stable in vesin's order within a receiver).

    Attributes:
        positions: (N, 3) float64 Cartesian positions, Å.
        cell: (3, 3) float64 lattice vectors as rows, Å.
        pbc: (3,) bool periodicity.
        numbers: (N,) int64 atomic numbers.
        cutoff: the radius the graph was built with, Å.
        senders, receivers: (E,) atom indices, int32 (int64 from 2^31 atoms: ``index_dtype``).
        shifts: (E, 3) integer lattice shifts of the sender image, int8 (int32 if a shift
            exceeds 127 cells: ``shift_dtype``).
        build_edges: the most edges one vesin call listed while the graph was built: all of them
            built at once (``from_arrays``), the largest chunk's built in chunks
            (``graph.chunks.graph_in_chunks``); the build's transient memory scales with it.

    The compact types keep a large system's graph at 11 bytes an edge (40 as int64). Index with
    them as they are (numpy accepts any integer array); convert before arithmetic that could
    exceed their range (``index * num_atoms``) or before handing them to torch as indices.
    """

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray
    cutoff: float
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    build_edges: int = -1  # -1: num_edges (set by __post_init__)

    def __post_init__(self):
        if self.build_edges < 0:
            object.__setattr__(self, "build_edges", len(self.senders))

    @property
    def chunked(self) -> bool:
        """Whether the graph was built in chunks (fewer edges listed at once than it holds)."""
        return self.build_edges < len(self.senders)

    @classmethod
    def from_arrays(cls, positions, cell, pbc, numbers, cutoff: float, neighbors: str = "vesin",
                    device=None) -> NeighborGraph:
        """Build the graph of a system given as arrays (see the class docstring for shapes).

        ``neighbors``: ``"vesin"`` (on the host), ``"vesin-torch"`` (on ``device``, default the
        CPU) or ``"auto"`` (``resolve_neighbors``); the graph is the same (module docstring)."""
        cutoff = _check_cutoff(cutoff)
        positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        # vesin wants a full box; non-periodic directions may hold anything, so give them the
        # completed cell (keeps the periodic vectors untouched).
        box = complete_cell(cell, pbc) if not pbc.all() else cell
        if resolve_neighbors(neighbors, device) == "vesin-torch":
            edges = _device_edges(positions, box, pbc, cutoff, device)
            if edges is not None:
                return cls(positions, cell, pbc, numbers, float(cutoff), *edges)
        import vesin

        _avoid_ctypes_type_cache()
        nl = vesin.NeighborList(cutoff=cutoff, full_list=True, sorted=False)
        i, j, k = nl.compute(points=positions, box=box, periodic=pbc.tolist(), quantities="ijS",
                             copy=False)
        # compact from the start: vesin's output (28 bytes an edge) is read in place and every
        # array made is already in its stored type, so that the build peaks near 55 bytes an edge
        # (it was 90: int64 copies) and the graph keeps 11 (int32 ids, int8 shifts; was 40)
        index = index_dtype(len(positions))
        unsorted = np.asarray(i).astype(index)
        # one stable sort by receiver (vesin's own sorting orders by receiver only and costs more)
        order = np.argsort(unsorted, kind="stable")
        receivers = np.take(unsorted, order)
        del unsorted
        unsorted = np.asarray(j).astype(index)
        senders = np.take(unsorted, order)
        del unsorted
        k = np.asarray(k).reshape(-1, 3)
        unsorted = k.astype(shift_dtype(k))
        shifts = np.take(unsorted, order, axis=0)
        del unsorted, order, i, j, k, nl
        return cls(positions, cell, pbc, numbers, float(cutoff), senders, receivers, shifts)

    @classmethod
    def from_atoms(cls, atoms, cutoff: float) -> NeighborGraph:
        """Build the graph of an ``ase.Atoms`` (or pymatgen ``Structure``/``Molecule``)."""
        atoms = as_ase_atoms(atoms)
        return cls.from_arrays(
            atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers, cutoff
        )

    @property
    def num_atoms(self) -> int:
        return len(self.positions)

    @property
    def num_edges(self) -> int:
        return len(self.senders)

    def edge_vectors(self, edges: np.ndarray | None = None) -> np.ndarray:
        """(E, 3) float64 edge vectors (of the given edge ids, or all edges)."""
        if edges is None:
            s, r, k = self.senders, self.receivers, self.shifts
        else:
            s, r, k = self.senders[edges], self.receivers[edges], self.shifts[edges]
        return self.positions[s] - self.positions[r] + k @ self.cell

    def in_degree(self) -> np.ndarray:
        """(N,) number of incoming edges of each atom."""
        return np.bincount(self.receivers, minlength=self.num_atoms)

    def receiver_offsets(self) -> np.ndarray:
        """(N + 1,) CSR row pointer: edges ``offsets[a]:offsets[a+1]`` are those received by ``a``."""
        out = np.zeros(self.num_atoms + 1, dtype=np.int64)
        np.cumsum(self.in_degree(), out=out[1:])
        return out


def resolve_neighbors(neighbors: str, device=None) -> str:
    """``neighbors`` (an option value) as the builder to use, ``"vesin"`` or ``"vesin-torch"``:
    ``"auto"`` is vesin-torch when ``device`` is a CUDA device and vesin-torch is importable,
    vesin otherwise (the host path stays the default on the CPU)."""
    if not isinstance(neighbors, str) or neighbors not in NEIGHBORS:
        raise _fail("neighbors", f"one of {list(NEIGHBORS)}", repr(neighbors))
    if neighbors != "auto":
        return neighbors
    if device is None or _device_type(device) != "cuda":
        return "vesin"
    try:
        _vesin_torch()
    except ImportError:
        return "vesin"
    return "vesin-torch"


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def _vesin_torch():
    """vesin-torch's module, imported at its first use (``ImportError`` in the house form)."""
    try:
        import vesin_torch
    except ImportError as exc:  # also a build of vesin-torch for another torch (its ABI)
        import torch

        raise ImportError(
            f"neighbors: expected vesin-torch importable for neighbors='vesin-torch', got "
            f"{type(exc).__name__}: {exc}; install with pip install vesin-torch (a build for "
            f"torch {torch.__version__.split('+')[0]}; or pip install 'distmlip[gpu]'), or use "
            f"neighbors='vesin'"
        ) from exc
    return vesin_torch


def device_limit(box: np.ndarray, pbc: np.ndarray, cutoff: float) -> str | None:
    """Why vesin's CUDA kernel cannot build this system (``None``: it can). It takes a cutoff up
    to half the width of every periodic direction (the distance between its lattice planes)."""
    if not pbc.any():
        return None
    width = 1.0 / np.linalg.norm(np.linalg.inv(box).T, axis=1)
    narrow = [int(a) for a in np.flatnonzero(pbc & (2.0 * cutoff > width))]
    if narrow:
        return (f"the cell is narrower than twice the cutoff ({cutoff:g} Å) along periodic "
                f"direction(s) {narrow} (widths {np.round(width[narrow], 3).tolist()} Å)")
    return None


def _device_edges(positions: np.ndarray, box: np.ndarray, pbc: np.ndarray, cutoff: float, device,
                  canonical: bool | None = None):
    """The graph's senders, receivers and shifts (host arrays in their stored types, sorted by
    receiver: ``edge_order``, ``canonical`` off the CPU unless given) built by vesin-torch on
    ``device``; ``None`` when the device's kernel cannot build this system (``device_limit``, or
    it failed): the caller builds it on the host."""
    import torch

    vesin_torch = _vesin_torch()
    device = torch.device("cpu" if device is None else device)
    on_host = device.type == "cpu"  # vesin's own CPU code: any system, vesin's order
    reason = None if on_host else device_limit(box, pbc, cutoff)
    if reason is None:
        try:
            nl = vesin_torch.NeighborList(cutoff=cutoff, full_list=True, sorted=False)
            i, j, k = nl.compute(points=torch.as_tensor(positions, device=device),
                                 box=torch.as_tensor(box, device=device),
                                 periodic=torch.as_tensor(pbc, device=device), quantities="ijS",
                                 copy=True)
            del nl
        except RuntimeError as exc:
            if on_host:
                raise
            reason = f"vesin-torch failed there ({type(exc).__name__}: {exc})"
    if reason is not None:
        warnings.warn(f"neighbors='vesin-torch': the graph is built on the host with vesin, not on "
                      f"{device}: {reason}", RuntimeWarning, stacklevel=3)
        return None
    order = edge_order(i, j, k, canonical=not on_host if canonical is None else canonical)
    index = getattr(torch, index_dtype(len(positions)).name)
    receivers = i.index_select(0, order).to(index).cpu().numpy()
    del i
    senders = j.index_select(0, order).to(index).cpu().numpy()
    del j
    k = k.index_select(0, order).cpu().numpy()
    del order
    return senders, receivers, k.astype(shift_dtype(k), copy=False)  # NeighborGraph's field order


def edge_order(receivers, senders, shifts, canonical: bool):
    """The permutation (torch, on the tensors' device) that sorts edges by receiver: stable
    (the library's order within a receiver, as the host path keeps vesin's), or with
    ``canonical`` by receiver, then sender, then shift (a fixed order whatever order the library
    gave: least significant key first, each sort stable)."""
    import torch

    if not canonical:
        return torch.argsort(receivers, stable=True)
    order = torch.arange(len(receivers), device=receivers.device)
    for key in (shifts[:, 2], shifts[:, 1], shifts[:, 0], senders, receivers):
        order = order.index_select(0, torch.argsort(key.index_select(0, order), stable=True))
    return order


def index_dtype(num_atoms: int) -> np.dtype:
    """The type of atom (or edge) indices below ``num_atoms``: int32, or int64 from 2^31."""
    return np.dtype(np.int32) if num_atoms < 2**31 - 1 else np.dtype(np.int64)


def shift_dtype(shifts: np.ndarray) -> np.dtype:
    """The smallest of int8, int32 and int64 that holds every lattice shift in ``shifts``."""
    if shifts.size == 0:
        return np.dtype(np.int8)
    largest = max(int(shifts.max()), -int(shifts.min()))
    if largest <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int32) if largest < 2**31 - 1 else np.dtype(np.int64)


class _Buffer:
    """A foreign buffer exposed through numpy's array interface."""

    def __init__(self, interface: dict):
        self.__array_interface__ = interface


def _pointer_as_array(ptr, shape, dtype, owner, device):
    """vesin's result buffer as a numpy array (the same view vesin's own helper returns).

    vesin's helper goes through ``numpy.ctypeslib.as_array``, which makes a ctypes array type per
    distinct length, and ctypes keeps every such type for the life of the process: ~4 KB per
    neighbour list of a new size, so a long MD (thousands of rebuilds, each with its own edge count)
    grows its RSS steadily. The array interface makes the same view without creating a type."""
    import vesin._neighbors as vn

    if device.type != vn.VesinCPU:  # only the numpy path is replaced
        raise RuntimeError(f"vesin returned a buffer on device {device.type}, expected the CPU")
    np_dtype = np.dtype(dtype)
    address = ctypes.cast(ptr, ctypes.c_void_p).value
    if not address or 0 in shape:
        return np.empty(shape, dtype=np_dtype)
    return np.asarray(_Buffer({"data": (address, False), "shape": tuple(int(n) for n in shape),
                               "typestr": np_dtype.str, "version": 3}))


def _avoid_ctypes_type_cache() -> None:
    """Route vesin's pointer-to-numpy conversion through ``_pointer_as_array`` (once; only where
    vesin has the helper with the signature this module knows)."""
    import vesin._neighbors as vn

    helper = getattr(vn, "_ptr_to_numpy", None)
    if helper is None or helper is _pointer_as_array or not hasattr(vn, "VesinCPU"):
        return
    if list(inspect.signature(helper).parameters) == ["ptr", "shape", "dtype", "owner", "device"]:
        vn._ptr_to_numpy = _pointer_as_array


def _check_cutoff(cutoff) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise TypeError(f"cutoff: expected a positive number in Å, got {cutoff!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"cutoff: expected a positive finite number in Å, got {cutoff!r}")
    return value


def as_ase_atoms(obj):
    """Return ``obj`` as ``ase.Atoms``; pymatgen ``Structure``/``Molecule`` are converted."""
    from ase import Atoms

    if isinstance(obj, Atoms):
        return obj
    module = type(obj).__module__
    if module.startswith("pymatgen"):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(obj)
    raise TypeError(
        f"atoms: expected ase.Atoms or a pymatgen Structure/Molecule, got {type(obj).__name__}"
    )
