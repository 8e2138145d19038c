"""Lennard-Jones as a one-layer pair model: the analytic oracle."""

from __future__ import annotations

import torch

from .base import DistributableModel, LocalGraph

__all__ = ["LennardJones"]


class LennardJones(DistributableModel):
    """Truncated and shifted Lennard-Jones, equal to
    ``ase.calculators.lj.LennardJones(epsilon, sigma, rc=cutoff, smooth=False)``.

    ``E = sum_pairs 4 eps [(sigma/r)^12 - (sigma/r)^6] - e0`` for ``r <= cutoff``, with ``e0`` the
    value at the cutoff; each pair's energy is split half-and-half between its two atoms.

    A pair exactly at the cutoff counts, as in ASE's calculator (its force does not vanish there).
    The neighbour graph keeps only pairs strictly inside the model's radius (vesin's and ASE's
    ``neighbor_list`` convention), so the radius the model declares, ``cutoff``, is the truncation
    radius ``rc`` widened by ``RADIUS_SLACK`` (relative) and the model masks ``r**2 <= rc**2`` itself.

    Args:
        epsilon: well depth, eV.
        sigma: zero-crossing distance, Å.
        cutoff: truncation radius, Å (default ``3 * sigma``, as ASE).
        dtype: floating dtype of the model (float64 by default).
    """

    num_layers = 1
    #: relative widening of the declared radius over ``rc`` (see the class docstring)
    RADIUS_SLACK = 1e-12

    def __init__(self, epsilon: float = 1.0, sigma: float = 1.0, cutoff: float | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if cutoff is None:
            cutoff = 3.0 * sigma
        for name, value in (("epsilon", epsilon), ("sigma", sigma), ("cutoff", cutoff)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        self.rc = float(cutoff)
        self.cutoff = self.rc * (1.0 + self.RADIUS_SLACK)
        self.register_buffer("epsilon", torch.tensor(float(epsilon), dtype=dtype))
        self.register_buffer("sigma", torch.tensor(float(sigma), dtype=dtype))

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        r2 = (graph.edge_vec * graph.edge_vec).sum(dim=-1)
        inside = r2 <= self.rc**2
        c6 = torch.where(inside, (self.sigma**2 / r2) ** 3, torch.zeros_like(r2))
        e0 = 4 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
        pair = torch.where(inside, 4 * self.epsilon * (c6 * c6 - c6) - e0, torch.zeros_like(r2))
        out = torch.zeros(graph.num_nodes, dtype=pair.dtype, device=pair.device)
        return out.index_add(0, graph.edge_index[1], 0.5 * pair)
