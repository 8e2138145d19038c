"""SchNet: a continuous-filter message-passing network (Schütt et al. 2017), written against the
distmlip contract. Random weights from a seed; the workhorse for tests and benchmarks.

Node work: the post-aggregation ``lin_out -> act -> lin`` update with its residual and the readout
run on the first ``graph.num_needed`` rows only (the owned rows in halo mode). The halo exchange
before each interaction but the first refreshes the halo rows of the node features h, and the
filter input ``lin_in`` (one ``channels x filters`` matrix product per row) is computed from them
on every row, halo rows included: the one node-wise redundancy, so that the layer protocol's state
between interactions is h alone (what bounded memory stores per atom and level; see below). The
first interaction reads the element embedding, exact on every row, without exchanging. (With
the no-op exchange, which refreshes nothing, every row is computed.)"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .base import DistributableModel, LocalGraph, check_numbers

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

        def forward(self, x, edge_index, rbf, envelope, num_receivers: int):
            """``x``: ``lin_in`` of the features of every row that sends (all local rows); the
            messages are summed into the first ``num_receivers`` rows (every receiver is one)."""
            w = self.filter(rbf) * envelope.unsqueeze(-1)
            h = self.propagate(edge_index, x=x, w=w, size=(x.shape[0], num_receivers))
            return self.lin_out(h)

        def message(self, x_j, w):
            return x_j * w

    # findable as distmlip.models.schnet.CFConv (the module's __getattr__): a SchNet pickles
    CFConv.__module__, CFConv.__qualname__ = __name__, "CFConv"
    return CFConv


def __getattr__(name: str):
    """``CFConv`` (defined on first use, with torch_geometric) as a module attribute, so pickle
    and ``torch.save`` find the class of a SchNet's convolutions by name."""
    if name == "CFConv":
        return _cfconv_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Interaction(nn.Module):
    def __init__(self, channels: int, filters: int, gaussians: int):
        super().__init__()
        self.conv = _cfconv_class()(channels, filters, gaussians)
        self.act = _ShiftedSoftplus()
        self.lin = nn.Linear(channels, channels)

    def forward(self, x, edge_index, rbf, envelope, num_receivers: int):
        """The update of the first ``num_receivers`` rows from ``x = conv.lin_in(h)`` on every row."""
        return self.lin(self.act(self.conv(x, edge_index, rbf, envelope, num_receivers)))


class SchNet(DistributableModel):
    """SchNet with a smooth cosine cutoff (forces continuous at the cutoff).

    Args:
        cutoff: interaction radius, Å.
        num_interactions: message-passing layers (the halo exchange of the node features runs
            before each but the first, whose input, the element embedding, is exact on the halo).
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
        # rows whose node-wise work is needed (the owned rows in halo mode); every row if nothing
        # refreshes the halo (a graph given the no-op exchange, as tests of a broken model do)
        needed = graph.num_needed
        check_numbers(graph.numbers, 0, self.embedding.num_embeddings - 1, "SchNet")
        h = self.embedding(graph.numbers)  # every row: exact on the halo too
        for k, block in enumerate(self.interactions):
            if k > 0:  # h holds the needed rows: refresh its halo rows (what neighbours read)
                h = graph.halo_exchange(h)
            x = block.conv.lin_in(h)  # every row (owned + halo)
            h = h[:needed] + block(x, graph.edge_index, rbf, envelope, needed)
        return self.readout(h).squeeze(-1)

    # ------------------------------------------------------------------ the layer protocol
    # The same computation as ``forward``, as steps the runtime calls one at a time (see
    # ``DistributableModel``): the state is ``(h,)``, the node features, on every row where a step
    # reads it (the embedding's, exact on every row; then the owned rows, the halo rows refreshed
    # by the runtime's exchange between steps). Each step computes ``x = lin_in(h)`` itself on
    # every row before its convolution: the bounded-memory mode then stores one row of features
    # per atom and level instead of two (h and x), at the price of ``lin_in`` on the halo rows.

    #: Layer protocol: state entry 0 (the node features) is read on halo rows.
    exchanged = (0,)

    def _radial(self, graph: LocalGraph):
        r = torch.linalg.vector_norm(graph.edge_vec, dim=-1)
        inside = r < self.cutoff
        envelope = torch.where(inside, 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0),
                               torch.zeros_like(r))
        rbf = torch.exp(-self.gamma * (r.unsqueeze(-1) - self.centers) ** 2)
        return rbf, envelope

    def embed(self, graph: LocalGraph) -> tuple[torch.Tensor, ...]:
        """The element embedding, on every row (exact on the halo rows too)."""
        check_numbers(graph.numbers, 0, self.embedding.num_embeddings - 1, "SchNet")
        return (self.embedding(graph.numbers),)

    def step(self, i: int, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Interaction ``i``: ``lin_in`` of h on every row (h exchanged), the update of the needed rows."""
        (h,) = state
        needed = graph.num_needed
        rbf, envelope = self._radial(graph)
        block = self.interactions[i]
        return (h[:needed] + block(block.conv.lin_in(h), graph.edge_index, rbf, envelope, needed),)

    def energies(self, graph: LocalGraph, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The readout of the last interaction's features."""
        return self.readout(state[0][: graph.num_needed]).squeeze(-1)
