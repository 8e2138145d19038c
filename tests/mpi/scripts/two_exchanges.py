"""Run under a launcher: a model that exchanges two independent feature tensors per layer (as a
PaiNN-style model exchanges scalars and vectors). Their backward exchanges are not ordered by the
data, only by distmlip's token chain; a mismatch between ranks would deadlock or mix them up."""

import sys

import numpy as np
import torch
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import DistributableModel


class TwoStreams(DistributableModel):
    def __init__(self, cutoff=4.5, layers=3, width=8, seed=0):
        super().__init__()
        self.cutoff, self.num_layers = cutoff, layers
        g = torch.Generator().manual_seed(seed)
        self.embed_a = torch.nn.Parameter(torch.randn(100, width, generator=g, dtype=torch.float64))
        self.embed_b = torch.nn.Parameter(torch.randn(100, width, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(0.3 * torch.randn(layers, width, width, generator=g,
                                                        dtype=torch.float64))

    def forward(self, graph):
        r = torch.linalg.vector_norm(graph.edge_vec, dim=-1)
        w = torch.where(r < self.cutoff, torch.cos(r * torch.pi / self.cutoff) + 1, torch.zeros_like(r))
        src, dst = graph.edge_index
        a, b = self.embed_a[graph.numbers], self.embed_b[graph.numbers]
        for k in range(self.num_layers):
            if k > 0:
                b = graph.halo_exchange(b)  # b first, then a: the order the data does not impose
                a = graph.halo_exchange(a)
            msg_a = torch.zeros_like(a).index_add(0, dst, w[:, None] * torch.tanh(b[src]))
            msg_b = torch.zeros_like(b).index_add(0, dst, w[:, None] * torch.tanh(a[src] @ self.mix[k]))
            a, b = a + msg_a, b + msg_b
        return (a * b).sum(-1)


def main():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=2)
    model = TwoStreams()
    ref = atoms.copy()
    ref.calc = DistributedCalculator(model, backend="local")
    worst = 0.0
    for partitioner in ("grid", "metis"):
        test = atoms.copy()
        test.calc = DistributedCalculator(model, partitioner=partitioner)
        assert test.calc.backend == "torch"
        for key in ("energy", "forces", "stress", "energies"):
            got, want = test.calc.get_property(key, test), ref.calc.get_property(key, ref)
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - want)) / max(np.max(np.abs(want)), 1.0)))
    rank = test.calc.rank
    calls = test.calc.runner.last_exchange_calls
    print(f"rank {rank}: worst relative error {worst:.2e}, {calls} exchanges", flush=True)
    sys.exit(0 if worst <= 1e-10 and calls == 4 else 1)


if __name__ == "__main__":
    main()
