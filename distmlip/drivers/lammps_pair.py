"""The Python side of LAMMPS's ``pair_style distmlip`` (the plugin built from ``lammps/`` by
``make lammps``; docs/lammps.md).

Each LAMMPS rank embeds a Python that holds one ``PairDriver``: it loads the model
(``registry.load_spec``: a name, a reference model or a saved file), maps LAMMPS's atom types to
elements (``pair_coeff * * Cu O``), and at every force evaluation builds the ``LocalGraph`` of
the rank's atoms from the edges the plugin found in LAMMPS's full neighbour list: the local atoms
are the owned rows, LAMMPS's ghost atoms the halo rows, the edge vectors ``x[ghost] - x[local]``
(the ghosts are periodic images already, so there are no shifts). The model's
``halo_exchange`` is ``LammpsExchange``: LAMMPS's forward communication (owners to ghosts) and,
in the backward pass, its reverse communication (ghosts to owners, summed); ``global_sum`` is an
MPI all-reduce over LAMMPS's ranks. Forces on ghost rows go home through LAMMPS's own reverse
communication (``newton on``) or through the pair's (``newton off``).

The plugin hands over its buffers as addresses (numpy views, no copies of LAMMPS's arrays) and
its communication as C functions (``ctypes``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
import traceback

import numpy as np
import torch
from ase.data import atomic_numbers

from ..models.base import NUM_ELEMENTS, HaloExchange, check_model
from ..models.registry import load_spec
from ..options import parse_devices
from ..runtime.local import check_distances, local_graph, replica, run_model
from ..runtime.resident import add_edge_gradients

__all__ = ["LammpsComm", "LammpsExchange", "PairDriver", "describe", "fold"]

_EXCHANGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int)
_ALLREDUCE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)

#: what ``pair_style distmlip`` accepts, for error messages
USAGE = "pair_style distmlip MODEL [dtype float32|float64] [device cpu|cuda|cuda:N]"


def describe(exc: BaseException) -> str:
    """``exc`` as the one line of LAMMPS's ``ERROR:``: distmlip's refusals (``ValueError``,
    ``TypeError``, ``ImportError``) by their message, which names the problem and the fix; anything
    else with its type, and its traceback on stderr."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, ImportError)):
        return text
    traceback.print_exception(exc, file=sys.stderr)
    return f"{type(exc).__name__}: {text}"


def _array(address: int, dtype, shape) -> np.ndarray:
    """A numpy view of the plugin's memory at ``address`` (an empty array for no rows)."""
    count = int(np.prod(shape))
    if count == 0 or not address:
        return np.zeros(shape, dtype=dtype)
    pointer = ctypes.cast(address, ctypes.POINTER(np.ctypeslib.as_ctypes_type(np.dtype(dtype))))
    return np.ctypeslib.as_array(pointer, shape=tuple(shape))


class LammpsComm:
    """LAMMPS's communication as the plugin exposes it: ``exchange`` (forward or reverse, in place,
    on rows of every local and ghost atom) and ``allreduce`` (a sum over LAMMPS's ranks)."""

    def __init__(self, pair: int, exchange: int, allreduce: int, max_width: int):
        self.pair = ctypes.c_void_p(pair)
        self._exchange = _EXCHANGE(exchange)
        self._allreduce = _ALLREDUCE(allreduce)
        self.max_width = int(max_width)

    def exchange(self, rows: np.ndarray, reverse: bool) -> None:
        """``rows``: (local + ghost atoms, w) float64, C-contiguous, changed in place. Forward:
        each ghost row gets its owner's row; reverse: each ghost row is added to its owner's.
        Columns go in blocks of at most ``max_width`` (LAMMPS's buffers are sized for that width
        once, in ``init_style``), each read and written in place (the plugin is given the row
        stride: no copy of a block)."""
        if not rows.flags.c_contiguous or rows.dtype != np.float64:
            raise ValueError("exchange: expected C-contiguous float64 rows")
        width = rows.shape[1]
        for start in range(0, width, self.max_width):
            self._exchange(self.pair, rows.ctypes.data + 8 * start, min(self.max_width, width - start),
                           width, int(reverse))

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        """The sum over ranks of ``values`` (float64), a new array."""
        out = np.ascontiguousarray(values, dtype=np.float64).copy()
        if out.size:
            self._allreduce(self.pair, out.ctypes.data, out.size)
        return out


class _Exchange(torch.autograd.Function):
    """Forward: owned rows -> every row (ghosts from their owners). Backward: every row's gradient
    -> the owned rows' (ghosts' added home). The token chains the calls so that every rank runs
    the backward passes in the same order (as ``runtime.exchange.P2PExchange``)."""

    @staticmethod
    def forward(ctx, owned, token, exchange):
        ctx.exchange = exchange
        return token.clone(), exchange.transfer(owned, reverse=False)

    @staticmethod
    def backward(ctx, grad_token, grad):
        return ctx.exchange.transfer(grad, reverse=True), grad_token, None


class _AllReduce(torch.autograd.Function):
    """``global_sum`` across LAMMPS's ranks; its backward is an all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, partial, token, exchange):
        ctx.exchange = exchange
        return exchange.total(partial), token.clone()

    @staticmethod
    def backward(ctx, grad, grad_token):
        return ctx.exchange.total(grad), grad_token, None


class LammpsExchange(HaloExchange):
    """The halo exchange of one LAMMPS rank: the graph's rows are its ``num_owned`` local atoms,
    then one ghost atom of each other rank's atom the edges read (``halo``: those ghosts' LAMMPS
    rows), refreshed by LAMMPS's forward communication into a buffer of all ``num_atoms`` local
    and ghost atoms. Every rank communicates at every call, even one with no halo (its
    neighbours may read its rows)."""

    def __init__(self, comm: LammpsComm, num_owned: int, halo: np.ndarray, num_atoms: int):
        super().__init__(num_owned, num_owned + len(halo))
        self.comm = comm
        self.num_atoms = num_atoms
        self.ghosts = torch.as_tensor(halo, dtype=torch.int64)
        self.rows = torch.cat([torch.arange(num_owned), self.ghosts])  # graph row -> LAMMPS row
        # a leaf: asking autograd for its gradient runs every exchange's backward on every rank
        self.first_token = torch.zeros((), dtype=torch.float64, requires_grad=True)
        self.token = self.first_token

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in (self.num_rows, self.num_owned):
            raise ValueError(
                f"halo_exchange: expected node features with {self.num_rows} rows (all local "
                f"atoms) or {self.num_owned} (the owned atoms, which come first), got {x.shape[0]}"
            )
        self.calls += 1
        self.token, out = _Exchange.apply(x[: self.num_owned], self.token, self)
        return out

    def _global_sum(self, partial: torch.Tensor) -> torch.Tensor:
        total, self.token = _AllReduce.apply(partial, self.token, self)
        return total

    def transfer(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        """Forward: ``x`` the owned rows -> every row. Reverse: ``x`` every row -> the owned
        rows, each plus its halo rows' (through their LAMMPS ghost rows). Features travel as
        float64 (exact for float32 too)."""
        t0 = time.perf_counter()
        tail = tuple(x.shape[1:])
        flat = x.detach().reshape(x.shape[0], int(np.prod(tail)))
        n = self.num_owned
        if reverse:  # each halo row's gradient at its ghost row (other ghost rows: zero)
            rows = torch.zeros((self.num_atoms, flat.shape[1]), dtype=torch.float64)
            rows[:n] = flat[:n]
            rows.index_copy_(0, self.ghosts, flat[n:].to("cpu", torch.float64))
        else:  # every ghost row is written by LAMMPS's forward communication
            rows = torch.empty((self.num_atoms, flat.shape[1]), dtype=torch.float64)
            rows[:n] = flat
        self.comm.exchange(rows.numpy(), reverse)
        out = rows[:n] if reverse else rows.index_select(0, self.rows)
        out = out.to(device=x.device, dtype=x.dtype).reshape(len(out), *tail)
        self.seconds += time.perf_counter() - t0
        return out

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value``."""
        t0 = time.perf_counter()
        summed = self.comm.allreduce(value.detach().to("cpu", torch.float64).numpy())
        self.seconds += time.perf_counter() - t0
        return torch.from_numpy(summed).to(device=value.device, dtype=value.dtype)


def _device(device: str, rank: int) -> torch.device:
    """``device`` of ``pair_style distmlip`` (``""``: the CPU); a bare ``cuda`` is the GPU of
    this rank's node-local index."""
    if not device:
        return torch.device("cpu")
    dev = parse_devices(device)[0]
    if dev.type == "cuda" and dev.index is None:
        local = next((int(os.environ[k]) for k in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                                   "SLURM_LOCALID") if k in os.environ), rank)
        dev = torch.device("cuda", local % torch.cuda.device_count())
    return dev


class PairDriver:
    """One LAMMPS rank's model (``pair_style distmlip MODEL [dtype ...] [device ...]``).

    Args:
        spec: the model: a name ``distmlip.load`` accepts, ``lj``/``schnet[:key=value,...]``, or
            a saved model file.
        dtype: ``"float32"``, ``"float64"`` or ``""`` (the model's own).
        device: a torch device or ``""`` (the CPU).
        pair, exchange, allreduce: addresses of the plugin's pair and of its C functions.
        max_width: the widest exchange, in doubles per atom.
        rank, size: this rank and LAMMPS's number of ranks.
    """

    def __init__(self, spec: str, dtype: str, device: str, pair: int, exchange: int, allreduce: int,
                 max_width: int, rank: int = 0, size: int = 1):
        if dtype not in ("", "float32", "float64"):
            raise ValueError(f"dtype: expected float32 or float64 ({USAGE}), got {dtype!r}")
        self.comm = LammpsComm(pair, exchange, allreduce, max_width)
        self.rank, self.size = rank, size
        model = load_spec(spec, option="model")
        check_model(model)
        self.dtype = getattr(torch, dtype) if dtype else model.dtype
        self.device = _device(device, rank)
        self.model = replica(model, self.device, self.dtype)
        self.cutoff = float(model.cutoff)
        self.table: np.ndarray | None = None  # LAMMPS type -> atomic number (index 0 unused)
        self._checked: tuple[int, ...] | None = None
        self._pending: tuple | None = None  # prepare()'s, for compute()

    def set_elements(self, elements: list[str]) -> None:
        """``pair_coeff * * El1 El2 ...``: the element of each LAMMPS atom type, type 1 first."""
        table = [0]
        for i, element in enumerate(elements, start=1):
            z = int(element) if element.isdigit() else atomic_numbers.get(element, 0)
            if not 0 < z < NUM_ELEMENTS:
                raise ValueError(f"pair_coeff: expected a chemical symbol for each atom type, got "
                                 f"{element!r} for type {i}; write e.g. pair_coeff * * Cu O")
            table.append(z)
        self.table = np.asarray(table, dtype=np.int64)

    def check(self) -> None:
        """Before a run: the model evaluates every mapped element (a short chain of them, in this
        process), so that an element it lacks stops LAMMPS at once, on every rank alike."""
        if self.table is None:
            raise ValueError("pair_coeff: expected `pair_coeff * * El1 El2 ...` before the run")
        elements = tuple(sorted(set(self.table[1:].tolist())))
        if elements == self._checked:
            return
        n = len(elements)
        spacing = min(2.0, 0.45 * self.cutoff)
        pos = np.zeros((n, 3))
        pos[:, 0] = spacing * np.arange(n)
        s, r = np.nonzero((np.abs(pos[:, None, 0] - pos[None, :, 0]) < self.cutoff)
                          & ~np.eye(n, dtype=bool))
        graph = local_graph(np.asarray(elements), np.stack([s, r]), pos[s] - pos[r], HaloExchange(),
                            np.arange(n), np.zeros((3, 3)), n, n, self.dtype, self.device)
        energies = run_model(self.model, graph)
        if energies.requires_grad:
            torch.autograd.grad(energies.sum(), graph.edge_vec, allow_unused=True)
        self._checked = elements

    def prepare(self, nlocal: int, nall: int, types: int, tags: int, tag_bytes: int, nedges: int,
                senders: int, receivers: int, vectors: int, box: tuple) -> None:
        """The first half of a force evaluation, with no communication (so that the plugin can
        stop every rank alike on an error here): this rank's atoms and the edges the plugin found
        (counts and addresses of LAMMPS's arrays, the box ``(a, b, c)`` row by row), checked, and
        the graph's rows (``fold``)."""
        ids = _array(tags, np.int64 if tag_bytes == 8 else np.int32, (nall,)).astype(np.int64) - 1
        if nall and ids.min() < 0:
            raise ValueError("atom IDs: expected atoms with IDs (the ghosts are matched to their "
                             "atoms by ID), got atoms without; remove `atom_modify id no`")
        s = _array(senders, np.int32, (nedges,)).astype(np.int64)
        r = _array(receivers, np.int32, (nedges,)).astype(np.int64)
        vec = _array(vectors, np.float64, (nedges, 3)).copy()
        check_distances(np.einsum("ij,ij->i", vec, vec), s, r, ids)
        row, ghosts = fold(ids, nlocal, s)
        numbers = self.table[_array(types, np.int32, (nall,))]
        rows = np.concatenate([np.arange(nlocal), ghosts])
        self._pending = (nlocal, nall, numbers[rows], ids[rows], ghosts, row[s], r, vec,
                         np.reshape(box, (3, 3)))

    def compute(self, newton: int, forces: int, eatom: int, vatom: int) -> tuple[float, ...]:
        """The second half: runs the model on what ``prepare`` was given (every rank together:
        LAMMPS's communication is the halo exchange).

        Adds the forces to LAMMPS's ``f`` (the halo rows' on their ghost rows with ``newton on``;
        folded home here with ``newton off``), the owned atoms' energies to ``eatom`` and per-atom
        virials to ``vatom`` (when their addresses are not 0: LAMMPS asked for them), and returns
        this rank's energy and virial ``(E, xx, yy, zz, xy, xz, yz)`` (eV)."""
        nlocal, nall, numbers, ids, ghosts, s, r, vec, cell = self._pending
        self._pending = None
        counts = np.bincount(numbers[:nlocal], minlength=NUM_ELEMENTS)[:NUM_ELEMENTS]
        composition = torch.as_tensor(self.comm.allreduce(counts).round().astype(np.int64),
                                      device=self.device)
        if self.size == 1:  # no halo: every edge reads a local atom, nothing to exchange
            exchange = HaloExchange(nlocal, nlocal)
        else:
            exchange = LammpsExchange(self.comm, nlocal, ghosts, nall)
        graph = local_graph(numbers, np.stack([s, r]), vec, exchange, ids, cell, nlocal, nlocal,
                            self.dtype, self.device, composition=composition)
        energies = run_model(self.model, graph)
        token = getattr(exchange, "token", None)
        loss = energies.sum() if token is None else (
            energies.sum() + 0.0 * token.to(energies.device, energies.dtype))
        inputs = [graph.edge_vec] if token is None else [graph.edge_vec, exchange.first_token]
        grad = torch.autograd.grad(loss, inputs, allow_unused=True)[0]
        e = energies.detach().to("cpu", torch.float64).numpy()

        vec_t = torch.as_tensor(vec, device=self.device)
        g = torch.zeros_like(vec_t) if grad is None else grad.detach().to(torch.float64)
        f_rows = torch.zeros((len(numbers), 3), dtype=torch.float64, device=self.device)
        w = torch.zeros((3, 3), dtype=torch.float64, device=self.device)
        add_edge_gradients(f_rows, w, graph.edge_index[1], graph.edge_index[0], vec_t, g)
        f_rows = f_rows.cpu().numpy()
        out = _array(forces, np.float64, (nall, 3))
        if newton:
            out[:nlocal] += f_rows[:nlocal]
            out[ghosts] += f_rows[nlocal:]
        else:  # LAMMPS folds no ghost forces: the pair does
            f = np.zeros((nall, 3))
            f[:nlocal] = f_rows[:nlocal]
            f[ghosts] = f_rows[nlocal:]
            self.comm.exchange(f, reverse=True)
            out[:nlocal] += f[:nlocal]
        if eatom:
            _array(eatom, np.float64, (nall,))[:nlocal] += e
        if vatom:  # each edge's virial to its receiver, a local atom
            per_edge = -_voigt(vec, g.cpu().numpy())
            atom_virial = _array(vatom, np.float64, (nall, 6))
            for k in range(6):
                atom_virial[:nlocal, k] += np.bincount(r, per_edge[:, k], minlength=nlocal)
        virial = -_voigt_matrix(w.cpu().numpy())  # LAMMPS's virial: sum of r ⊗ F = -dE/d(strain)
        return (float(e.sum()), *map(float, virial))


def fold(ids: np.ndarray, nlocal: int, senders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The graph rows of a rank's LAMMPS atoms (``ids``: their atom ids, the ``nlocal`` local
    atoms first, then the ghosts; ``senders``: the LAMMPS rows the edges read).

    LAMMPS keeps a ghost for every periodic image within reach, so a small box has several times
    more ghosts than atoms; the model needs one row per atom. A ghost of one of this rank's own
    atoms (a periodic image) becomes that atom's row (its edge vector keeps the image's
    coordinates: exact, as distmlip's one-part graph with shifts); the ghosts of other ranks' atoms
    that an edge reads become the halo rows, one per atom (the first of its ghosts). On one rank
    there is no halo at all.

    Returns ``row`` ((nall,) the graph row of each LAMMPS row, -1 for a ghost no edge reads) and
    ``ghosts`` ((h,) the LAMMPS row of each halo row, graph rows ``nlocal:``)."""
    nall = len(ids)
    where = np.full(int(ids.max(initial=-1)) + 1, -1, dtype=np.int64)
    where[ids[:nlocal]] = np.arange(nlocal)
    row = where[ids]
    read = np.zeros(nall, dtype=bool)
    read[senders] = True
    foreign = np.flatnonzero((row < 0) & read)
    _, first, inverse = np.unique(ids[foreign], return_index=True, return_inverse=True)
    row[foreign] = nlocal + inverse.reshape(-1)
    return row, foreign[first]


def _voigt(vec: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(E, 6) symmetrised ``vec ⊗ grad`` per edge in LAMMPS's order xx, yy, zz, xy, xz, yz."""
    return np.stack([vec[:, 0] * grad[:, 0], vec[:, 1] * grad[:, 1], vec[:, 2] * grad[:, 2],
                     0.5 * (vec[:, 0] * grad[:, 1] + vec[:, 1] * grad[:, 0]),
                     0.5 * (vec[:, 0] * grad[:, 2] + vec[:, 2] * grad[:, 0]),
                     0.5 * (vec[:, 1] * grad[:, 2] + vec[:, 2] * grad[:, 1])], axis=1)


def _voigt_matrix(w: np.ndarray) -> np.ndarray:
    """(6,) symmetrised (3, 3) ``w`` in LAMMPS's order xx, yy, zz, xy, xz, yz."""
    return np.array([w[0, 0], w[1, 1], w[2, 2], 0.5 * (w[0, 1] + w[1, 0]),
                     0.5 * (w[0, 2] + w[2, 0]), 0.5 * (w[1, 2] + w[2, 1])])
