"""Small randomly initialised models of the optional packages, the structures they are checked on,
and the checks the adapter tests share. Used by ``tests/adapters/test_<package>.py`` and by the
tests that exercise every adapter outside its own file (bounded memory, global sum, the launched
``tests/mpi/scripts/adapter.py`` and ``sevennet.py``). Each builder imports its package when called.

Each model and structure is defined here once (same arguments, same weights as the adapter tests'
reference values were measured with), so that no test module imports another.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

import distmlip
from distmlip import DistributedCalculator
from distmlip.testing import adapters as structures
from distmlip.testing import evaluate, rel_err
from distmlip.testing.adapters import ADAPTER_ELEMENTS

# ---------------------------------------------------------------- MACE
MACE_ELEMENTS = (3, 8, 13, 29)  # Li, O, Al, Cu


def float64_mace(seed: int, **options):
    """A float64 ``ScaleShiftMACE`` over ``MACE_ELEMENTS`` (polynomial cutoff 5, SiLU gates,
    interaction shift -0.1; ``options``: the rest of its arguments), its weights drawn from torch
    seed ``seed``; torch's default dtype and random state are left as they were."""
    from mace.modules import models as mace_models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mace_models.ScaleShiftMACE(
                num_polynomial_cutoff=5, num_elements=len(MACE_ELEMENTS),
                atomic_numbers=list(MACE_ELEMENTS), gate=torch.nn.functional.silu,
                atomic_inter_shift=-0.1, **options)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.float64).eval()


def make_mace(seed: int = 0, scale: float = 40.0):
    """MACE-MP-medium width: 128x0e+128x1o hidden irreps, 2 interactions, r_max 6 Å, correlation 3,
    max_ell 3, 10 Bessel functions; interaction scale ``scale``."""
    from e3nn import o3
    from mace.modules import blocks

    rng = np.random.default_rng(seed)
    return float64_mace(
        seed, r_max=6.0, num_bessel=10, max_ell=3,
        interaction_cls=blocks.RealAgnosticResidualInteractionBlock,
        interaction_cls_first=blocks.RealAgnosticResidualInteractionBlock,
        num_interactions=2, hidden_irreps=o3.Irreps("128x0e+128x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=rng.uniform(-8.0, -1.0, len(MACE_ELEMENTS)),
        avg_num_neighbors=60.0, correlation=3, radial_MLP=[64, 64, 64], atomic_inter_scale=scale)


def mace_oxide():
    """Li2O (antifluorite), one conventional cell: 12 atoms, ~125 neighbours each at 6 Å."""
    return structures.oxide()


# ---------------------------------------------------------------- NequIP and Allegro
NEQUIP_TYPES = ["Li", "O", "Al", "Cu"]
NEQUIP_R_MAX = 5.0


def nequip_common(seed: int) -> dict:
    """The arguments NequIP's and Allegro's builders share here (float64, ``NEQUIP_TYPES``, 5 Å,
    per-type energy scales of 20-30 so that forces are ~0.1-1 eV/Å)."""
    return dict(
        seed=seed, model_dtype="float64", type_names=NEQUIP_TYPES, r_max=NEQUIP_R_MAX,
        avg_num_neighbors=40.0,
        per_type_energy_shifts=dict(zip(NEQUIP_TYPES, [-2.0, -4.5, -3.5, -1.5], strict=True)),
        per_type_energy_scales=dict(zip(NEQUIP_TYPES, [20.0, 30.0, 25.0, 20.0], strict=True)),
    )


def nequip_build(builder, **kwargs):
    """``builder(**kwargs)`` (a NequIP model builder), warnings silenced, leaving torch's default
    dtype and e3nn's jit mode as they were."""
    import e3nn
    from nequip.utils.global_state import set_global_state

    previous = torch.get_default_dtype()
    e3nn_jit = e3nn.get_optimization_defaults()["jit_mode"]
    try:
        set_global_state()  # nequip's builders require it; it sets torch's default dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = builder(**kwargs)
    finally:
        # restore what nequip changed globally: torch's default dtype, and e3nn's jit mode, which
        # nequip's builder leaves at "script" (e3nn modules built later, e.g. MACE's, would then
        # hold TorchScript functions that cannot be deep-copied)
        torch.set_default_dtype(previous)
        e3nn.set_optimization_defaults(jit_mode=e3nn_jit)
    return model.eval()


def make_nequip(seed: int = 0):
    from nequip.model import NequIPGNNModel

    return nequip_build(NequIPGNNModel, num_layers=3, l_max=2, num_features=16,
                         **nequip_common(seed))


def make_allegro(seed: int = 0):
    from allegro import model as allegro_models

    return nequip_build(
        allegro_models.AllegroModel, l_max=2, num_layers=2, num_scalar_features=32,
        num_tensor_features=8, allegro_mlp_hidden_layers_width=32,
        readout_mlp_hidden_layers_width=16,
        radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed", "num_bessels": 8},
        **nequip_common(seed),
    )


def nequip_oxide():
    """Li2O (antifluorite), 2x1x1 conventional cells (24 atoms)."""
    return structures.oxide(repeat=(2, 1, 1))


def nequip_metal():
    """Cu fcc, 2x2x2 conventional cells (32 atoms)."""
    return structures.metal(repeat=(2, 2, 2))


# ---------------------------------------------------------------- SevenNet and CHGNet (pretrained)
def sevenn_rutile(seed=1):
    """Rutile TiO2, 2x2x2 cells (48 atoms)."""
    from ase.spacegroup import crystal

    atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                    cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=seed)
    return atoms


def chgnet_oxide():
    """MgO rock salt in a tetragonal (a/sqrt2, a/sqrt2, a) cell, repeated 16x along z."""
    from ase import Atoms

    a = 4.21
    cell = np.diag([a / np.sqrt(2), a / np.sqrt(2), a])
    frac = [(0, 0, 0), (0.5, 0.5, 0.5), (0, 0, 0.5), (0.5, 0.5, 0)]
    atoms = Atoms("Mg2O2", scaled_positions=frac, cell=cell, pbc=True).repeat((1, 1, 16))
    atoms.rattle(0.05, seed=1)
    return atoms


# ---------------------------------------------------------------- matgl
MATGL_REFS = np.array([-1.1, -1.9, -7.3, -4.9, -3.7, -3.5])  # per-element references, eV


def make_matgl(seed: int = 0, use_warp: bool = False, arch: str = "TensorNet"):
    """A matgl ``Potential`` around a random TensorNet (or M3GNet with ``arch="M3GNet"``)."""
    from matgl.apps.pes import Potential
    from matgl.models import M3GNet, TensorNet

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        if arch == "M3GNet":
            model = M3GNet(element_types=ADAPTER_ELEMENTS, dim_node_embedding=16,
                           dim_edge_embedding=16, units=16, nblocks=2, max_n=3, max_l=3,
                           cutoff=5.0, threebody_cutoff=4.0, is_intensive=False)
            scale = 3000.0
        else:
            model = TensorNet(element_types=ADAPTER_ELEMENTS, units=16, nblocks=2, num_rbf=8,
                              cutoff=4.0, is_intensive=False, use_warp=use_warp)
            scale = 1000.0
        return Potential(model=model, data_mean=0.7, data_std=scale, element_refs=MATGL_REFS,
                         calc_stresses=True)


# ---------------------------------------------------------------- fairchem (UMA)
#: the small eSCN-MD backbone: 16 sphere channels, lmax = mmax = 2, 2 blocks, 5 Å, two tasks
MOE_BACKBONE = dict(
    max_num_elements=100, sphere_channels=16, lmax=2, mmax=2, otf_graph=True, cutoff=5.0,
    edge_channels=16, num_distance_basis=16, num_layers=2, hidden_channels=16, direct_forces=False,
    regress_forces=True, regress_stress=True, dataset_mapping={"omat": "omat", "omol": "omol"},
    max_neighbors=300, always_use_pbc=False)


def _hydra(backbone_class, seed: int, **options):
    """A ``HydraModelV2`` around ``backbone_class(**options)`` with an ``MLP_EFS_Head`` whose
    output is multiplied by 30 (forces ~0.5-2 eV/Å), weights drawn from torch seed ``seed``."""
    from fairchem.core.models.base import HydraModelV2
    from fairchem.core.models.uma.escn_md import MLP_EFS_Head

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        backbone = backbone_class(**options)
        head = MLP_EFS_Head(backbone)
        with torch.no_grad():
            head.energy_block[-1].weight.mul_(30.0)
        return HydraModelV2(backbone, {"efs": head}).eval()


def make_uma(seed: int = 0, **extra):
    """UMA's architecture (``eSCNMDBackbone``), one task "omat"; ``extra``: backbone options."""
    from fairchem.core.models.uma.escn_md import eSCNMDBackbone

    return _hydra(eSCNMDBackbone, seed,
                  **{**MOE_BACKBONE, "dataset_mapping": {"omat": "omat"}, **extra})


def make_uma_moe(seed: int = 1, experts: int = 4):
    """A ``HydraModelV2`` with UMA's mixture-of-experts backbone (``experts`` unmerged experts
    mixed by the composition embedding and the task, two tasks "omat" and "omol")."""
    from fairchem.core.models.uma.escn_moe import eSCNMDMoeBackbone

    return _hydra(eSCNMDMoeBackbone, seed, num_experts=experts, use_composition_embedding=True,
                  **MOE_BACKBONE)


# ---------------------------------------------------------------- MatterSim
def make_mattersim(seed: int = 0):
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.potential import Potential

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = M3Gnet(num_blocks=2, units=16, max_l=3, max_n=3, cutoff=5.0, threebody_cutoff=4.0,
                       device="cpu")
        model.normalizer.scale.data.fill_(300.0)
        model.normalizer.shift.data.uniform_(-5.0, -1.0)
        return Potential(model, device="cpu")


# ---------------------------------------------------------------- Orb
ORB_CAP = 8


def make_orb(seed: int = 0, cap: int = ORB_CAP):
    from orb_models.forcefield.atomic_system import SystemConfig
    from orb_models.forcefield.pretrained import orb_v3_conservative_architecture

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = orb_v3_conservative_architecture(
            latent_dim=32, base_mlp_hidden_dim=64, head_mlp_hidden_dim=32,
            num_message_passing_steps=2, device="cpu",
            system_config=SystemConfig(radius=6.0, max_num_neighbors=cap))
    model.eval()
    model.heads["energy"].normalizer.bn.running_var.mul_(1e4)  # energies x 100
    return model


# ---------------------------------------------------------------- checks the adapter tests share
def _stale_halo(graph):
    """An exchange that refreshes nothing: given every row it returns them as they are, given
    the owned rows it appends zeros for the halo rows (which were then never computed)."""
    def exchange(x):
        if x.shape[0] == graph.num_nodes:
            return x
        return torch.cat([x, x.new_zeros((graph.num_nodes - x.shape[0], *x.shape[1:]))])
    return exchange


class WithoutExchange(distmlip.DistributableModel):
    """A wrapped model whose halo exchange refreshes nothing (the negative control: split, it must
    be wrong)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cutoff, self.num_layers = inner, inner.cutoff, inner.num_layers

    def forward(self, graph):
        return self.inner(dataclasses.replace(graph, halo_exchange=_stale_halo(graph)))


class RecordExchange:
    """Mixin for an adapter class (``class Recorded(RecordExchange, CHGNetModel)``): records each
    graph's rows, ``graphs``: [(owned, needed, local)], and each halo exchange's rows in and out,
    ``calls``: [(owned, local, given, returned)]."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.graphs = [], []

    def forward(self, graph):
        def exchange(x):
            y = graph.halo_exchange(x)
            self.calls.append((graph.num_owned, graph.num_nodes, x.shape[0], y.shape[0]))
            return y

        self.graphs.append((graph.num_owned, graph.num_needed, graph.num_nodes))
        return super().forward(dataclasses.replace(graph, halo_exchange=exchange))


def split_row_counts(wrapped, atoms, count_rows, parts: int = 4, threads: bool = False):
    """For halo then extended mode: ``wrapped`` split into ``parts`` parts (one worker, or
    ``parts`` threads) with ``count_rows(replica)``'s hooks on the replica the runner made
    (``count_rows`` returns the dict they fill: {name: [rows per call]}). Asserts that the split
    results equal the unsplit model's at 1e-10 and that the parts own every atom once, with a halo
    besides (owned rows sum to N, fewer than the local rows). Yields (mode, calculator, that dict,
    the local rows summed over the parts)."""
    n = len(atoms)
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    for mode in ("halo", "extended"):
        calc = DistributedCalculator(wrapped, num_parts=parts, mode=mode,
                                     device=["cpu"] * parts if threads else "cpu")
        rows = count_rows(next(iter(calc.runner.replicas.values())))
        split = evaluate(calc, atoms)
        for q in one:
            assert rel_err(split[q], one[q]) <= 1e-10, (mode, q)
        shards = calc.runner.last_shards
        local = sum(s.num_rows for s in shards)
        assert sum(s.num_owned for s in shards) == n < local  # there is a halo to skip
        yield mode, calc, rows, local
