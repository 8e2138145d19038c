"""Small reference models for the conformance kit."""

from __future__ import annotations

import math

import torch

from ..models.base import NUM_ELEMENTS, DistributableModel, LocalGraph

__all__ = ["GlobalReadoutToy"]


class GlobalReadoutToy(DistributableModel):
    """A model whose energy is not a sum of per-atom terms: Orb's readout in miniature.

    ``E = sum_i eps(h_i) + N * MLP(mean_i h_i) * (1 + w . composition / N)``: two message-passing
    layers (halo exchange between them), a per-atom term, a readout of the mean node feature over
    the whole system (``graph.global_sum``) and a factor from the whole system's composition
    (``graph.composition``, as a mixture of experts uses it). The per-atom energies it returns are
    ``eps(h_i)`` plus an equal share ``E_global / N`` of the global term.

    Random weights from ``seed``; ``scale`` sets the size of energies (forces ~1 eV/Å by default).
    """

    def __init__(self, cutoff: float = 4.0, features: int = 8, num_layers: int = 2, seed: int = 0,
                 scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cutoff = float(cutoff)
        self.num_layers = int(num_layers)
        self.scale = float(scale)
        f = features
        self.embedding = torch.nn.Parameter(torch.randn(NUM_ELEMENTS, f, generator=g))
        self.centres = torch.nn.Parameter(torch.linspace(0.5, cutoff, f), requires_grad=False)
        self.filters = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(f, f, generator=g) / f) for _ in range(num_layers)])
        self.updates = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(f, f, generator=g) / math.sqrt(f)) for _ in range(num_layers)])
        self.atomic = torch.nn.Parameter(torch.randn(f, generator=g) / math.sqrt(f))
        self.mlp1 = torch.nn.Parameter(torch.randn(f, f, generator=g) / math.sqrt(f))
        self.mlp2 = torch.nn.Parameter(torch.randn(f, generator=g) / math.sqrt(f))
        self.experts = torch.nn.Parameter(torch.randn(NUM_ELEMENTS, generator=g) * 0.1)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        dtype = graph.edge_vec.dtype
        senders, receivers = graph.edge_index
        r = graph.edge_vec.norm(dim=-1, keepdim=True)
        envelope = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        rbf = torch.exp(-2.0 * (r - self.centres) ** 2) * envelope  # (E, F)
        h = self.embedding[graph.numbers]
        for k in range(self.num_layers):
            if k > 0:
                h = graph.halo_exchange(h)
            m = torch.zeros_like(h).index_add_(0, receivers, h[senders] * (rbf @ self.filters[k]))
            h = h[: graph.num_needed] + torch.tanh(m[: graph.num_needed] @ self.updates[k])
        n = graph.num_system_atoms
        mean = graph.global_sum(h) / max(n, 1)
        global_term = torch.tanh(mean @ self.mlp1) @ self.mlp2
        mix = 1.0 + (graph.composition.to(dtype) @ self.experts) / max(n, 1)
        eps = torch.tanh(h) @ self.atomic + global_term * mix
        return self.scale * eps
