"""SchNet: a continuous-filter message-passing network (Schütt et al. 2017), written against the
distmlip contract. Random weights from a seed; the workhorse for tests and benchmarks."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .base import DistributableModel, LocalGraph

__all__ = ["SchNet"]


def _shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(x) - math.log(2.0)


class _ShiftedSoftplus(nn.Module):
    def forward(self, x):
        return _shifted_softplus(x)


@functools.cache
def _cfconv_class():
    """The PyG layer, defined on first use (torch_geometric is imported lazily, once)."""
    from torch_geometric.nn import MessagePassing

    class CFConv(MessagePassing):
        """x_i' = sum_j x_j * W(r_ij) * C(r_ij) (PyG MessagePassing, sum aggregation)."""

        def __init__(self, channels: int, filters: int, gaussians: int):
            super().__init__(aggr="add")
            self.lin_in = nn.Linear(channels, filters, bias=False)
            self.filter = nn.Sequential(
                nn.Linear(gaussians, filters), _ShiftedSoftplus(), nn.Linear(filters, filters)
            )
            self.lin_out = nn.Linear(filters, channels)

        def forward(self, x, edge_index, rbf, envelope):
            w = self.filter(rbf) * envelope.unsqueeze(-1)
            h = self.propagate(edge_index, x=self.lin_in(x), w=w, size=(x.shape[0], x.shape[0]))
            return self.lin_out(h)

        def message(self, x_j, w):
            return x_j * w

    return CFConv


class _Interaction(nn.Module):
    def __init__(self, channels: int, filters: int, gaussians: int):
        super().__init__()
        self.conv = _cfconv_class()(channels, filters, gaussians)
        self.act = _ShiftedSoftplus()
        self.lin = nn.Linear(channels, channels)

    def forward(self, h, edge_index, rbf, envelope):
        return self.lin(self.act(self.conv(h, edge_index, rbf, envelope)))


class SchNet(DistributableModel):
    """SchNet with a smooth cosine cutoff (forces continuous at the cutoff).

    Args:
        cutoff: interaction radius, Å.
        num_interactions: message-passing layers (the halo exchange runs before each but the
            first, whose input, the element embedding, is already exact on the halo).
        hidden_channels: width of the node features.
        num_filters: width of the continuous filters (default ``hidden_channels``).
        num_gaussians: radial basis size.
        max_z: largest atomic number embedded.
        seed: seed of the random weights.
        dtype: floating dtype (float64 by default).
    """

    def __init__(self, cutoff: float = 5.0, num_interactions: int = 3, hidden_channels: int = 64,
                 num_filters: int | None = None, num_gaussians: int = 50, max_z: int = 100,
                 seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        if not isinstance(cutoff, (int, float)) or not cutoff > 0:
            raise ValueError(f"cutoff: expected a positive number in Å, got {cutoff!r}")
        if not isinstance(num_interactions, int) or num_interactions < 1:
            raise ValueError(f"num_interactions: expected an integer >= 1, got {num_interactions!r}")
        if not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ValueError(f"hidden_channels: expected an integer >= 1, got {hidden_channels!r}")
        self.cutoff = float(cutoff)
        self.num_layers = num_interactions
        filters = num_filters or hidden_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(max_z + 1, hidden_channels)
            self.interactions = nn.ModuleList(
                _Interaction(hidden_channels, filters, num_gaussians) for _ in range(num_interactions)
            )
            self.readout = nn.Sequential(
                nn.Linear(hidden_channels, hidden_channels // 2 or 1),
                _ShiftedSoftplus(),
                nn.Linear(hidden_channels // 2 or 1, 1),
            )
        self.register_buffer("centers", torch.linspace(0.0, self.cutoff, num_gaussians))
        self.gamma = 0.5 / (self.cutoff / max(num_gaussians - 1, 1)) ** 2
        self.to(dtype)

    def forward(self, graph: LocalGraph) -> torch.Tensor:
        r = torch.linalg.vector_norm(graph.edge_vec, dim=-1)
        inside = r < self.cutoff
        envelope = torch.where(inside, 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0),
                               torch.zeros_like(r))
        rbf = torch.exp(-self.gamma * (r.unsqueeze(-1) - self.centers) ** 2)
        h = self.embedding(graph.numbers)
        for k, block in enumerate(self.interactions):
            if k > 0:
                h = graph.halo_exchange(h)
            h = h + block(h, graph.edge_index, rbf, envelope)
        return self.readout(h).squeeze(-1)
