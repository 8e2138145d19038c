"""The periodic neighbour graph of a whole system, built with vesin."""

from __future__ import annotations

import ctypes
import inspect
from dataclasses import dataclass

import numpy as np

__all__ = ["NeighborGraph", "complete_cell", "index_dtype", "shift_dtype", "validate_system"]


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
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise _fail("positions", "finite coordinates", f"NaN or inf for atoms {first} ({bad.sum()} in all)")
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

    @classmethod
    def from_arrays(cls, positions, cell, pbc, numbers, cutoff: float) -> NeighborGraph:
        """Build the graph of a system given as arrays (see the class docstring for shapes)."""
        cutoff = _check_cutoff(cutoff)
        positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        import vesin

        _avoid_ctypes_type_cache()
        # vesin wants a full box; non-periodic directions may hold anything, so give them the
        # completed cell (keeps the periodic vectors untouched).
        box = complete_cell(cell, pbc) if not pbc.all() else cell
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
