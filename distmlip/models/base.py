"""The contract between distmlip and a message-passing model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["DistributableModel", "LocalGraph", "no_exchange"]


def no_exchange(x: torch.Tensor) -> torch.Tensor:
    """The halo exchange of a system that is not split: nothing to refresh."""
    return x


@dataclass(frozen=True, eq=False)
class LocalGraph:
    """The piece of the system one worker evaluates: owned atoms plus a halo.

    Attributes:
        numbers: (n,) int64 atomic numbers of the local atoms (owned and halo).
        edge_index: (2, E) int64 local ``[senders; receivers]`` (PyG's source-to-target order):
            a message flows from ``edge_index[0]`` to ``edge_index[1]``.
        edge_vec: (E, 3) edge vectors, receiver -> sender image, Å, in the model's dtype. Forces
            and stress are taken from the gradient of the energy with respect to this tensor.
        halo_exchange: ``x -> x`` on (n, ...) node features; refreshes the halo rows from their
            owners (autograd sends gradients home). Call it wherever a layer is about to read
            neighbours' features that an earlier layer has updated. A no-op when nothing is split.
        owned: (n,) bool, which local atoms this worker owns (their energies are the ones kept).
        atom_ids: (n,) int64 global atom indices (for adapters that need them).
        cell: (3, 3) lattice vectors (no gradient), in the model's dtype.
    """

    numbers: torch.Tensor
    edge_index: torch.Tensor
    edge_vec: torch.Tensor
    halo_exchange: Callable[[torch.Tensor], torch.Tensor]
    owned: torch.Tensor
    atom_ids: torch.Tensor
    cell: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @classmethod
    def single(cls, numbers, edge_index, edge_vec, cell=None) -> "LocalGraph":
        """A whole, unsplit system (every atom owned, exchange a no-op)."""
        n = int(numbers.shape[0])
        device = edge_vec.device
        if cell is None:
            cell = torch.zeros(3, 3, dtype=edge_vec.dtype, device=device)
        return cls(
            numbers=numbers,
            edge_index=edge_index,
            edge_vec=edge_vec,
            halo_exchange=no_exchange,
            owned=torch.ones(n, dtype=torch.bool, device=device),
            atom_ids=torch.arange(n, device=device),
            cell=cell,
        )


class DistributableModel(torch.nn.Module):
    """A message-passing interatomic potential distmlip can split.

    A model author subclasses this (or wraps an existing module) and provides:

    - ``cutoff`` (float, Å): the radius of the neighbour graph the model reads.
    - ``num_layers`` (int >= 1): how many hops of neighbours an atom's energy depends on (the
      number of message-passing layers; 1 for a pair potential). Extended mode holds a halo this
      deep.
    - ``forward(graph: LocalGraph) -> Tensor``: (n,) per-atom energies (eV) of the local atoms.
      The energy must depend on positions only through ``graph.edge_vec``, and before every layer
      that reads neighbours' *updated* features the model calls ``graph.halo_exchange(x)`` on
      them. Every worker must call ``halo_exchange`` the same number of times.

    Features that live on edges or angles across atoms (CHGNet's bond graph) are not exchanged by
    distmlip: split their update into per-atom partial sums and exchange those as node features
    (see ``distmlip/models/chgnet.py`` and docs/wrapping.md).

    distmlip sums the energies of owned atoms, and obtains forces and stress from the gradient of
    that sum with respect to ``edge_vec``. Halo rows of the output are discarded.
    """

    cutoff: float
    num_layers: int

    def forward(self, graph: LocalGraph) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.get_default_dtype()
