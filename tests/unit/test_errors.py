"""Bad input gives a ValueError/TypeError whose message names the argument, what is allowed and
what was received."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from distmlip import DistributedCalculator, NeighborGraph, PartitionPlan
from distmlip.models import DistributableModel, LennardJones, SchNet
from distmlip.testing.structures import fcc_bulk

from support import LJ_PARAMS, make_lj


def _calc(**kwargs):
    return DistributedCalculator(LennardJones(**LJ_PARAMS), **kwargs)


def _energy(calc, atoms):
    atoms.calc = calc
    return atoms.get_potential_energy()


@pytest.mark.parametrize("value", ["kmeans", "Grid", "", None])
def test_unknown_partitioner(value):
    with pytest.raises(ValueError) as err:
        _calc(partitioner=value)
    msg = str(err.value)
    assert msg.startswith("partitioner:")
    assert "slab" in msg and "grid" in msg and "metis" in msg
    assert repr(value) in msg


def test_unknown_partitioner_in_plan():
    graph = NeighborGraph.from_atoms(fcc_bulk(size=2), 5.0)
    with pytest.raises(ValueError, match=r"partitioner: expected one of .*'grid'.* got 'voronoi'"):
        PartitionPlan.build(graph, 2, "voronoi")


@pytest.mark.parametrize("value", ["ghost", "HALO", "full"])
def test_unknown_mode(value):
    with pytest.raises(ValueError) as err:
        _calc(mode=value)
    msg = str(err.value)
    assert msg.startswith("mode:") and "'halo'" in msg and "'extended'" in msg and repr(value) in msg


@pytest.mark.parametrize("value", [0, -3])
def test_num_parts_below_one(value):
    with pytest.raises(ValueError, match=rf"num_parts: expected an integer >= 1, got {value}"):
        _calc(num_parts=value)


@pytest.mark.parametrize("value", [2.5, 2.0, "4", True, [2]])
def test_num_parts_not_an_int(value):
    with pytest.raises(TypeError) as err:
        _calc(num_parts=value)
    msg = str(err.value)
    assert msg.startswith("num_parts:") and "integer" in msg and repr(value) in msg


def test_num_parts_numpy_int_and_default_accepted():
    assert _calc(num_parts=np.int64(3)).num_parts == 3
    assert _calc(num_parts=None).num_parts == 1  # one process: default one part


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad):
    atoms = fcc_bulk(size=2)
    atoms.positions[5, 1] = bad
    with pytest.raises(ValueError) as err:
        _energy(_calc(num_parts=2), atoms)
    msg = str(err.value)
    assert msg.startswith("positions:") and "finite" in msg and "[5]" in msg


def test_singular_cell_with_periodic_directions():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]],
                  cell=[[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]], pbc=True)
    with pytest.raises(ValueError) as err:
        _energy(_calc(), atoms)
    msg = str(err.value)
    assert msg.startswith("cell:") and "singular" in msg and "pbc" in msg


def test_zero_cell_with_pbc():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], pbc=True)
    with pytest.raises(ValueError, match=r"cell: .*periodic"):
        _energy(_calc(), atoms)


def test_empty_atoms():
    with pytest.raises(ValueError) as err:
        _energy(_calc(num_parts=2), Atoms())
    msg = str(err.value)
    assert msg.startswith("atoms:") and "at least one atom" in msg and "0 atoms" in msg


@pytest.mark.parametrize("value", ["float16", "double", "fp32", torch.int32, 32])
def test_wrong_dtype(value):
    with pytest.raises(ValueError) as err:
        _calc(dtype=value)
    msg = str(err.value)
    assert msg.startswith("dtype:") and "float32" in msg and "float64" in msg and repr(value) in msg


@pytest.mark.parametrize("value", ["tpu", "not a device", 3.5])
def test_wrong_device(value):
    with pytest.raises(ValueError) as err:
        _calc(device=value)
    msg = str(err.value)
    assert msg.startswith("device:") and repr(value) in msg


def test_model_not_distributable():
    class Plain(torch.nn.Module):
        cutoff = 5.0
        num_layers = 1

        def forward(self, graph):
            return torch.zeros(graph.num_nodes)

    for obj in (Plain(), "schnet", None):
        with pytest.raises(TypeError) as err:
            DistributedCalculator(obj)
        msg = str(err.value)
        assert msg.startswith("model:") and "DistributableModel" in msg and type(obj).__name__ in msg


def test_atoms_not_atoms():
    calc = _calc()
    with pytest.raises(TypeError,
                       match=r"atoms: expected ase.Atoms or a pymatgen Structure/Molecule, got dict"):
        calc.calculate({"positions": [[0, 0, 0]]})


class _WrongShape(DistributableModel):
    cutoff = 5.0
    num_layers = 1

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, graph):
        r = graph.edge_vec.norm(dim=-1)
        e = torch.zeros(graph.num_nodes, dtype=r.dtype).index_add(0, graph.edge_index[1], self.w * r)
        return e.reshape(self.shape(graph.num_nodes))


@pytest.mark.parametrize("shape,got", [(lambda n: (n, 1), r"\((\d+), 1\)"),
                                       (lambda n: (1, n), r"\(1, (\d+)\)"),
                                       (lambda n: (), r"\(\)")])
def test_model_returning_wrong_shape(shape, got):
    atoms = fcc_bulk(size=2)
    if shape(4) == ():  # a scalar total energy instead of per-atom energies
        model = _WrongShape(lambda n: (n,))
        model.forward = lambda graph: torch.zeros((), dtype=torch.float64) + graph.edge_vec.sum()
    else:
        model = _WrongShape(shape)
    with pytest.raises(ValueError) as err:
        _energy(DistributedCalculator(model, num_parts=2), atoms)
    msg = str(err.value)
    assert msg.startswith("model:") and "per-atom energies" in msg
    assert "must return" in msg and "got" in msg


def test_model_returning_wrong_shape_threaded():
    atoms = fcc_bulk(size=2)
    model = _WrongShape(lambda n: (n, 1))
    with pytest.raises(ValueError, match=r"model: .* per-atom energies"):
        _energy(DistributedCalculator(model, num_parts=2, device=["cpu", "cpu"]), atoms)


@pytest.mark.parametrize("cutoff,exc", [(-1.0, ValueError), (0.0, ValueError), (np.nan, ValueError),
                                        ("five", TypeError), (None, TypeError)])
def test_graph_bad_cutoff(cutoff, exc):
    with pytest.raises(exc, match=r"^cutoff: expected a positive"):
        NeighborGraph.from_atoms(fcc_bulk(size=2), cutoff)


@pytest.mark.parametrize("kwargs,arg", [({"epsilon": -1.0}, "epsilon"), ({"sigma": 0.0}, "sigma"),
                                        ({"cutoff": "x"}, "cutoff")])
def test_lj_bad_parameters(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected a positive number"):
        LennardJones(**kwargs)


@pytest.mark.parametrize("kwargs,arg", [({"cutoff": -5.0}, "cutoff"),
                                        ({"num_interactions": 0}, "num_interactions"),
                                        ({"hidden_channels": 2.5}, "hidden_channels")])
def test_schnet_bad_parameters(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        SchNet(**kwargs)


def test_plan_bad_owner_and_hops():
    graph = NeighborGraph.from_atoms(fcc_bulk(size=2), 5.0)
    with pytest.raises(ValueError, match=r"owner: expected part indices in \[0, 2\), got values in \[0, 5\]"):
        PartitionPlan.from_owner(graph, np.arange(graph.num_atoms) % 6, 2)
    with pytest.raises(ValueError, match=r"owner: expected shape \(32,\)"):
        PartitionPlan.from_owner(graph, np.zeros(3, dtype=int), 2)
    with pytest.raises(ValueError, match=r"num_hops: expected an integer >= 1, got 0"):
        PartitionPlan.build(graph, 2, num_hops=0)


def test_num_partitions_is_the_old_name_of_num_parts():
    """The renamed option (2026-12-02) still works, with a dated DeprecationWarning, in the
    constructor, ``set()`` and ``estimate_memory``; both names at once are refused."""
    from distmlip import estimate_memory
    from distmlip.options import RENAMED

    assert RENAMED["num_partitions"] == ("num_parts", "2026-12-02")
    with pytest.warns(DeprecationWarning,
                      match=r"num_partitions= is deprecated since 2026-12-02.*num_parts="):
        calc = _calc(num_partitions=3)
    assert calc.parameters["num_parts"] == 3 and "num_partitions" not in calc.parameters
    with pytest.warns(DeprecationWarning, match="num_partitions"):
        assert calc.set(num_partitions=2) == {"num_parts": 2}
    with pytest.raises(TypeError, match=r"num_partitions: expected only num_parts="):
        _calc(num_parts=2, num_partitions=2)
    atoms, model = fcc_bulk(size=2), make_lj()  # one model: one memory calibration for both calls
    with pytest.warns(DeprecationWarning, match="num_partitions"):
        old = estimate_memory(model, atoms, num_partitions=2)
    assert old == estimate_memory(model, atoms, num_parts=2)
