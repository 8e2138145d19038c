"""Per-part helpers on the host: edges within the cutoff at the current positions (NumPy), the
``LocalGraph`` of a part or a shard from host arrays (``local_graph``: the memory probes and the
LAMMPS pair driver), running the model, and the forces and virial of edge gradients
(``add_edge_terms``).

The runner's per-step path is on the model's device (``runtime/resident.py``); ``host_piece`` with
``add_edge_terms`` is the host path it replaced, kept as the reference of its test
(tests/engine/test_resident.py) and of bench/bench_step.py."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..graph import NeighborGraph
from ..models.base import NUM_ELEMENTS, DistributableModel, LocalGraph
from ..partition.plan import part_edge_index

__all__ = ["MIN_DISTANCE", "add_edge_terms", "check_distances", "composition_of", "edges_within",
           "host_piece", "inside_cutoff", "local_edges", "local_graph", "replica", "run_model"]


def add_edge_terms(forces: np.ndarray, receivers: np.ndarray, senders: np.ndarray,
                   vec: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Add the forces of edge gradients ``grad = dE/d(vec)`` ((E, 3)) to ``forces`` ((N, 3),
    in place) and return their virial ``vec^T grad`` ((3, 3), dE/d(strain) before symmetrising).

    ``vec = pos[sender] - pos[receiver] + shift @ cell``, so the receiver gets ``+grad`` and the
    sender ``-grad``.
    """
    n = len(forces)
    for k in range(3):
        forces[:, k] += np.bincount(receivers, grad[:, k], minlength=n)
        forces[:, k] -= np.bincount(senders, grad[:, k], minlength=n)
    return vec.T @ grad


#: Atoms closer than this (Å) are refused as coincident: a zero-length edge has no direction and
#: gives NaN forces. No physical structure comes near it (the shortest bond, H2's, is 0.74 Å), and
#: it is the tolerance by which the CHGNet adapter tells periodic images apart.
MIN_DISTANCE = 1e-3


def check_distances(d2: np.ndarray, senders: np.ndarray, receivers: np.ndarray,
                    ids: np.ndarray | None = None) -> None:
    """``ValueError`` naming the closest pair if any edge (squared lengths ``d2``, of graph atoms
    ``senders``/``receivers``; ``ids``: their global ids, if the graph is a region) is shorter
    than ``MIN_DISTANCE``. O(E) on edge lengths already computed."""
    if not len(d2) or d2.min() >= MIN_DISTANCE ** 2:
        return
    e = int(np.argmin(d2))
    i, j = int(receivers[e]), int(senders[e])
    if ids is not None:
        i, j = int(ids[i]), int(ids[j])
    count = int(np.count_nonzero(d2 < MIN_DISTANCE ** 2)) // 2  # each pair is two edges
    what = (f"atom {i} and its own periodic image" if i == j else f"atoms {min(i, j)} and {max(i, j)}")
    raise ValueError(
        f"positions: expected atoms at least {MIN_DISTANCE} Å apart, got {what} "
        f"{np.sqrt(d2[e]):.3g} Å apart (coincident{f'; {count} such pairs' if count > 1 else ''}); "
        f"remove the duplicated atom"
    )


def edges_within(graph: NeighborGraph, positions: np.ndarray, cell: np.ndarray, edges: np.ndarray,
                 cutoff: float, check: bool = False, ids: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Of the graph's ``edges`` (ids), the mask of those shorter than ``cutoff`` at ``positions``
    (the graph's atoms; it was built with cutoff + skin) and their (kept, 3) float64 vectors
    ``pos[sender] - pos[receiver] + shift @ cell``. ``check``: refuse coincident atoms
    (``check_distances``; ``ids``: the graph atoms' global ids if it is a region)."""
    s, r = np.take(graph.senders, edges), np.take(graph.receivers, edges)
    vec = np.take(positions, s, axis=0)
    vec -= np.take(positions, r, axis=0)
    vec += np.take(graph.shifts, edges, axis=0) @ cell
    d2 = np.einsum("ij,ij->i", vec, vec)
    if check:
        check_distances(d2, s, r, ids)
    keep = d2 < cutoff * cutoff
    return keep, (vec if keep.all() else vec[keep])


def local_edges(graph: NeighborGraph, positions: np.ndarray, ids: np.ndarray | None, cell: np.ndarray,
                edges: np.ndarray, edge_index: np.ndarray, cutoff: float):
    """A part's (or shard's) edges within ``cutoff`` at ``positions`` (global; ``ids``: the graph
    atoms' global ids if it is a region), coincident atoms refused: kept edge ids, their local
    (2, kept) ``edge_index`` and (kept, 3) float64 vectors."""
    pos = positions if ids is None else positions[ids]
    keep, vec = edges_within(graph, pos, cell, edges, cutoff, check=True, ids=ids)
    if len(vec) == len(keep):
        return edges, edge_index, vec
    return edges[keep], np.ascontiguousarray(edge_index[:, keep]), vec


def inside_cutoff(graph: NeighborGraph | None, positions: np.ndarray, cell: np.ndarray,
                  cutoff: float) -> np.ndarray:
    """(E,) bool: the graph's edges shorter than ``cutoff`` at ``positions``, computed in chunks
    (no E x 3 temporary)."""
    if graph is None or graph.num_edges == 0:
        return np.zeros(0, dtype=bool)
    inside = np.empty(graph.num_edges, dtype=bool)
    step = 1 << 15  # ~100 bytes per edge of temporaries: 3 MB a chunk (2^18 took 27 MB)
    for start in range(0, graph.num_edges, step):
        chunk = np.arange(start, min(start + step, graph.num_edges))
        inside[start : start + len(chunk)] = edges_within(graph, positions, cell, chunk, cutoff)[0]
    return inside


def run_model(model: DistributableModel, local: LocalGraph) -> torch.Tensor:
    """Run ``model`` on ``local`` and return the owned atoms' energies, checking the output."""
    with torch.enable_grad():
        out = model(local)
    n, num_owned = local.num_nodes, local.num_owned
    if not isinstance(out, torch.Tensor) or out.ndim != 1 or not num_owned <= out.shape[0] <= n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: {type(model).__name__}.forward must return per-atom energies of shape "
            f"({n},) (or of the first graph.num_needed = {local.num_needed} rows), got {got}"
        )
    if not out.is_floating_point():
        raise ValueError(
            f"model: {type(model).__name__}.forward must return per-atom energies as a floating "
            f"tensor (differentiable with respect to graph.edge_vec), got dtype {out.dtype}"
        )
    return out[:num_owned]


def composition_of(numbers: np.ndarray, device) -> torch.Tensor:
    """``LocalGraph.composition`` of a whole system: (119,) int64 counts per atomic number."""
    return torch.as_tensor(np.bincount(numbers, minlength=NUM_ELEMENTS)[:NUM_ELEMENTS],
                           dtype=torch.int64, device=device)


def local_graph(numbers: np.ndarray, edge_index: np.ndarray, vec: np.ndarray, exchange, atom_ids: np.ndarray,
                cell: np.ndarray, num_owned: int, num_needed: int, dtype: torch.dtype, device: torch.device,
                requires_grad: bool = True, composition: torch.Tensor | None = None) -> LocalGraph:
    """The one place a ``LocalGraph`` is assembled: rows ``numbers`` (the first ``num_owned``
    owned), local ``edge_index`` (2, E) and float64 edge vectors ``vec`` (E, 3) (made ``dtype``,
    asking for a gradient if ``requires_grad``), on ``device``."""
    return LocalGraph(
        numbers=torch.as_tensor(numbers, device=device),
        edge_index=torch.as_tensor(edge_index, dtype=torch.long, device=device).reshape(2, -1),
        edge_vec=torch.as_tensor(vec, device=device).to(dtype).requires_grad_(requires_grad),
        halo_exchange=exchange,
        owned_mask=torch.as_tensor(np.arange(len(numbers)) < num_owned, device=device),
        atom_ids=torch.as_tensor(atom_ids, device=device),
        cell=torch.as_tensor(cell, device=device).to(dtype),
        num_owned=num_owned,
        num_needed=num_needed,
        composition=composition,
    )


def host_piece(built, item, positions: np.ndarray, exchange, cutoff: float, mode: str, dtype: torch.dtype,
               device: torch.device, requires_grad: bool = True):
    """The ``LocalGraph`` of ``item`` (a ``Shard`` or a ``PartPlan`` of the build ``built``;
    ``None``: an empty graph) at ``positions`` (global) and what the gather needs: its kept edge ids
    and their float64 vectors."""
    if item is None or built.graph is None or len(item.atoms) == 0:
        edges, vec = np.zeros(0, dtype=np.int64), np.zeros((0, 3))
        edge_index = np.zeros((2, 0), dtype=np.int64)
        numbers, ids, num_owned = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
    else:
        graph = built.graph
        edges, edge_index, vec = local_edges(graph, positions, built.ids, built.now_cell, item.edges,
                                             part_edge_index(item, graph), cutoff)
        numbers = graph.numbers[item.atoms]
        ids = item.atoms if built.ids is None else built.ids[item.atoms]
        num_owned = item.num_owned
    local = local_graph(numbers, edge_index, vec, exchange, ids, built.now_cell, num_owned,
                        num_owned if mode == "halo" else len(numbers), dtype, device, requires_grad,
                        composition_of(built.numbers, device))
    return local, edges, vec


def replica(model: DistributableModel, device: torch.device, dtype: torch.dtype) -> DistributableModel:
    """A copy of ``model`` on ``device`` in ``dtype``, in eval mode, its parameters frozen (the
    caller's module is not modified)."""
    out = copy.deepcopy(model).to(device=device, dtype=dtype)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out
