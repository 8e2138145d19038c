"""Wrapping your own model: a small PaiNN-style network made distributable, then checked.

PaiNN (Schütt, Unke, Gastegger 2021) carries a scalar feature s (n, F) and a vector feature
v (n, 3, F) per atom; each layer is a message block (reads neighbours' s and v) and an update
block (per atom). Written as a model author would, with two concessions to distmlip: its
``forward`` takes an ``exchange`` callable (the identity by default) and calls it on the node
features before every message block that reads features an earlier layer updated; and a
``num_needed`` (all rows by default): the message blocks sum into, and the update blocks and the
readout compute, only the first ``num_needed`` rows (``graph.num_needed``: the owned rows in halo
mode, whose halo rows the next exchange overwrites anyway), and the exchange is given those rows.

The checks: partition invariance (every partitioner x number of parts x mode gives the
unpartitioned energy, forces, stress and per-atom energies to 1e-10) on awkward structures, and
forces and stress against finite differences of the energy of a split evaluation. Exits with
status 1 if any check fails. ``--without-exchange`` drops the exchange to show that the checks
catch it.

Run: ``OMP_NUM_THREADS=1 python examples/wrap_custom_model.py``  (~20 s)
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from distmlip import DistributableModel, DistributedCalculator
from distmlip.testing import (
    assert_partition_invariant,
    awkward_structures,
    check_forces_finite_difference,
    check_stress_finite_difference,
    format_report,
)


# ----------------------------------------------------------------- the model, as a user writes it
class MessageBlock(nn.Module):
    def __init__(self, features: int, num_rbf: int):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(features, features), nn.SiLU(),
                                 nn.Linear(features, 3 * features))
        self.filter = nn.Linear(num_rbf, 3 * features)

    def forward(self, s, v, senders, receivers, rbf, envelope, unit, num_needed):
        # one message per edge, from the sender's features (every row), into the receiver (one of
        # the first num_needed rows, which are the only ones returned)
        x = self.phi(s)[senders] * self.filter(rbf) * envelope[:, None]
        ds, dvv, dvs = x.chunk(3, dim=-1)
        dv = v[senders] * dvv[:, None, :] + dvs[:, None, :] * unit[:, :, None]
        return s[:num_needed].index_add(0, receivers, ds), v[:num_needed].index_add(0, receivers, dv)


class UpdateBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.U = nn.Linear(features, features, bias=False)
        self.V = nn.Linear(features, features, bias=False)
        self.mix = nn.Sequential(nn.Linear(2 * features, features), nn.SiLU(),
                                 nn.Linear(features, 3 * features))

    def forward(self, s, v):
        uv, vv = self.U(v), self.V(v)  # linear in the channel dimension: equivariant
        norm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)
        a_vv, a_sv, a_ss = self.mix(torch.cat([s, norm], dim=-1)).chunk(3, dim=-1)
        return s + a_ss + a_sv * (uv * vv).sum(dim=1), v + a_vv[:, None, :] * uv


class PaiNN(nn.Module):
    """Per-atom energies from atomic numbers and edge vectors (edge_vec: receiver -> sender)."""

    def __init__(self, cutoff=5.0, num_layers=3, features=32, num_rbf=16, max_z=100, seed=0):
        super().__init__()
        self.cutoff, self.features, self.num_rbf = cutoff, features, num_rbf
        with torch.random.fork_rng(devices=[]):  # random weights from the seed
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(max_z + 1, features)
            self.messages = nn.ModuleList(MessageBlock(features, num_rbf) for _ in range(num_layers))
            self.updates = nn.ModuleList(UpdateBlock(features) for _ in range(num_layers))
            self.readout = nn.Sequential(nn.Linear(features, features), nn.SiLU(),
                                         nn.Linear(features, 1))
        self.double()

    def forward(self, numbers, edge_index, edge_vec, exchange=lambda x: x, num_needed=None):
        senders, receivers = edge_index
        needed = len(numbers) if num_needed is None else num_needed
        r = torch.linalg.vector_norm(edge_vec, dim=-1)
        unit = edge_vec / r[:, None]
        n = torch.arange(1, self.num_rbf + 1, dtype=r.dtype, device=r.device)
        rbf = torch.sin(n * math.pi * r[:, None] / self.cutoff) / r[:, None]
        envelope = torch.where(r < self.cutoff, 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1),
                               torch.zeros_like(r))
        s = self.embedding(numbers)
        v = s.new_zeros(s.shape[0], 3, self.features)
        for k, (message, update) in enumerate(zip(self.messages, self.updates, strict=True)):
            if k > 0:  # layer k-1 updated the needed rows of s and v: every row, in one call
                x = exchange(torch.cat([s, v.flatten(1)], dim=1))
                s, v = x[:, :self.features], x[:, self.features:].reshape(-1, 3, self.features)
            s, v = message(s, v, senders, receivers, rbf, envelope, unit, needed)
            s, v = update(s, v)
        return self.readout(s).squeeze(-1)  # the needed rows' energies


# ------------------------------------------------------------- made distributable: a few lines
class DistributablePaiNN(DistributableModel):
    def __init__(self, painn: PaiNN, use_exchange: bool = True):
        super().__init__()
        self.painn = painn
        self.cutoff = painn.cutoff               # radius of the neighbour graph it reads
        self.num_layers = len(painn.messages)    # hops an atom's energy depends on
        self.use_exchange = use_exchange

    def forward(self, graph):
        if not self.use_exchange:  # nothing refreshes the halo: compute every row
            return self.painn(graph.numbers, graph.edge_index, graph.edge_vec)
        return self.painn(graph.numbers, graph.edge_index, graph.edge_vec,
                          exchange=graph.halo_exchange, num_needed=graph.num_needed)


# -------------------------------------------------------------------------------- the checks
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-exchange", action="store_true",
                        help="drop the halo exchange (the checks must then fail)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = DistributablePaiNN(PaiNN(), use_exchange=not args.without_exchange)
    with torch.no_grad():  # random weights give ~0.2 eV/Å forces: scale them up
        model.painn.readout[-1].weight.mul_(5.0)
    try:
        for name, atoms in awkward_structures(seed=0).items():
            report = assert_partition_invariant(model, atoms, num_parts=(1, 2, 3, 7),
                                                partitioners=("grid", "metis"),
                                                modes=("halo", "extended"), rtol=1e-10)
            worst = max(row["max_err"] for row in report)
            print(f"{name}: partition invariant, worst relative error {worst:.1e}")
        print(f"the last one in detail:\n{format_report(report)}")
        atoms = awkward_structures(seed=1)["fcc_bulk"]
        calc = DistributedCalculator(model, num_parts=4)
        df = check_forces_finite_difference(calc, atoms, atol=1e-6)
        ds = check_stress_finite_difference(calc, atoms, atol=1e-6)
        fmax = abs(calc.get_forces(atoms)).max()
        print(f"fcc_bulk, 4 parts: forces (max {fmax:.2f} eV/Å) match finite differences to "
              f"{df:.1e} eV/Å, stress to {ds:.1e} eV/Å^3")
    except AssertionError as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
