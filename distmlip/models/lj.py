"""Lennard-Jones as a one-layer pair model: the analytic oracle."""

from __future__ import annotations

import torch

from .base import DistributableModel, LocalGraph

__all__ = ["LennardJones"]


class LennardJones(DistributableModel):
    """Truncated and shifted Lennard-Jones, equal to
    ``ase.calculators.lj.LennardJones(epsilon, sigma, rc=cutoff, smooth=False)``.

    ``E = sum_pairs 4 eps [(sigma/r)^12 - (sigma/r)^6] - e0`` for ``r < cutoff``, with ``e0`` the
    value at the cutoff; each pair's energy is split half-and-half between its two atoms.

    Args:
        epsilon: well depth, eV.
        sigma: zero-crossing distance, Å.
        cutoff: truncation radius, Å (default ``3 * sigma``, as ASE).
        dtype: floating dtype of the model (float64 by default).
    """

    num_layers = 1

    def __init__(self, epsilon: float = 1.0, sigma: float = 1.0, cutoff: float | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if cutoff is None:
            cutoff = 3.0 * sigma
        for name, value in (("epsilon", epsilon), ("sigma", sigma), ("cutoff", cutoff)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        self.cutoff = float(cutoff)
        self.register_buffer("epsilon", torch.tensor(float(epsilon), dtype=dtype))
        self.register_buffer("sigma", torch.tensor(float(sigma), dtype=dtype))

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        r2 = (graph.edge_vec * graph.edge_vec).sum(dim=-1)
        inside = r2 < self.cutoff**2
        c6 = torch.where(inside, (self.sigma**2 / r2) ** 3, torch.zeros_like(r2))
        e0 = 4 * self.epsilon * ((self.sigma / self.cutoff) ** 12 - (self.sigma / self.cutoff) ** 6)
        pair = torch.where(inside, 4 * self.epsilon * (c6 * c6 - c6) - e0, torch.zeros_like(r2))
        out = torch.zeros(graph.num_nodes, dtype=pair.dtype, device=pair.device)
        return out.index_add(0, graph.edge_index[1], 0.5 * pair)
