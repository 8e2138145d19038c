"""NeighborGraph against ASE's neighbour list, pymatgen input, and the properties the awkward
structures claim to have."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list

from distmlip import DistributedCalculator, NeighborGraph
from distmlip.testing import ISOLATED_CUTOFF, awkward_structures, evaluate
from distmlip.testing.structures import fcc_bulk, molecule, slab_vacuum, small_triclinic

CUTOFF = 5.0


def _triples(i, j, shifts) -> set:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts, strict=True)}


@pytest.mark.parametrize("cutoff", [2.6, 3.7, CUTOFF])
def test_edges_equal_ase_neighbor_list(structure, cutoff):
    name, atoms = structure
    graph = NeighborGraph.from_atoms(atoms, cutoff)
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    ours = _triples(graph.receivers, graph.senders, graph.shifts)
    theirs = _triples(i, j, S)
    assert len(ours) == graph.num_edges, f"{name}: duplicate edges in the graph"
    assert ours == theirs, (
        f"{name}, cutoff {cutoff}: {len(ours - theirs)} edges only in distmlip, "
        f"{len(theirs - ours)} only in ASE"
    )
    if len(theirs) == 0:
        return
    # edge vectors follow the convention receiver -> sender image, and are inside the cutoff
    D = neighbor_list("D", atoms, cutoff)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    ours_order = np.lexsort((graph.shifts[:, 2], graph.shifts[:, 1], graph.shifts[:, 0],
                             graph.senders, graph.receivers))
    np.testing.assert_allclose(graph.edge_vectors()[ours_order], D[order], rtol=0, atol=1e-12)
    assert np.linalg.norm(graph.edge_vectors(), axis=1).max() < cutoff


def test_graph_sorted_and_csr(structure):
    _, atoms = structure
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    assert np.all(np.diff(g.receivers) >= 0), "edges must be sorted by receiver"
    off = g.receiver_offsets()
    assert off[0] == 0 and off[-1] == g.num_edges
    for a in range(g.num_atoms):
        assert np.all(g.receivers[off[a]:off[a + 1]] == a)


def test_full_list_is_symmetric(structure):
    """Every edge (i <- j, S) has its reverse (j <- i, -S)."""
    _, atoms = structure
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    fwd = _triples(g.receivers, g.senders, g.shifts)
    rev = _triples(g.senders, g.receivers, -g.shifts)
    assert fwd == rev


# ---------------------------------------------------------------- the structures' claimed properties
def test_structures_are_small_deterministic_and_rattled():
    a, b = awkward_structures(seed=3), awkward_structures(seed=3)
    c = awkward_structures(seed=4)
    assert set(a) == {"fcc_bulk", "small_triclinic", "slab_vacuum", "molecule", "multi_element_isolated"}
    for name in a:
        assert 1 <= len(a[name]) <= 150, name
        np.testing.assert_array_equal(a[name].positions, b[name].positions)
        assert not np.allclose(a[name].positions, c[name].positions), f"{name}: seed has no effect"
    # rattled: the perfect fcc crystal has zero forces, the rattled one does not
    from ase.build import bulk

    from distmlip.models import LennardJones

    perfect = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    lj = LennardJones(0.4, 2.3, CUTOFF)
    f_perfect = evaluate(DistributedCalculator(lj), perfect)["forces"]
    f_rattled = evaluate(DistributedCalculator(lj), fcc_bulk())["forces"]
    assert np.abs(f_perfect).max() < 1e-10
    assert np.abs(f_rattled).max() > 0.1


def test_fcc_bulk_properties():
    atoms = fcc_bulk()
    assert atoms.pbc.all() and atoms.cell.rank == 3
    assert set(atoms.get_chemical_symbols()) == {"Cu"} and len(atoms) == 108
    np.testing.assert_allclose(atoms.cell.angles(), 90.0)


def test_small_triclinic_is_smaller_than_cutoff():
    atoms = small_triclinic()
    assert atoms.pbc.all()
    angles = atoms.cell.angles()
    assert np.all(np.abs(angles - 90.0) > 5.0), f"not triclinic: angles {angles}"
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array).T, axis=1)
    assert spacing.max() < CUTOFF, f"plane spacings {spacing} not all below the cutoff"
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    self_images = g.senders == g.receivers
    per_atom = np.bincount(g.receivers[self_images], minlength=len(atoms))
    assert per_atom.min() >= 4, f"each atom should bond to several own images, got {per_atom}"
    assert np.all(np.abs(g.shifts[self_images]).sum(axis=1) > 0)
    # one (receiver, sender) pair joined by several edges with different shifts
    pairs, counts = np.unique(np.stack([g.receivers, g.senders]), axis=1, return_counts=True)
    assert counts.min() >= 2


def test_slab_has_vacuum_along_z():
    atoms = slab_vacuum()
    assert atoms.pbc.tolist() == [True, True, False]
    assert atoms.cell.rank == 3
    z = atoms.positions[:, 2]
    assert z.min() > CUTOFF and atoms.cell[2, 2] - z.max() > CUTOFF
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    assert np.all(g.shifts[:, 2] == 0), "no edge may cross the non-periodic z boundary"
    assert np.any(g.shifts[:, 0] != 0) and np.any(g.shifts[:, 1] != 0)


def test_molecule_is_finite_with_zero_cell():
    atoms = molecule()
    assert not atoms.pbc.any()
    assert np.all(atoms.cell.array == 0.0)
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    assert np.all(g.shifts == 0)
    extent = np.ptp(atoms.positions, axis=0)
    assert extent.max() > CUTOFF, "the cluster should be larger than the cutoff"


def test_multi_element_isolated_atom_has_no_neighbours():
    atoms = awkward_structures()["multi_element_isolated"]
    assert atoms.pbc.all() and atoms.cell.rank == 3
    assert len(set(atoms.numbers[:-1])) >= 2
    assert len(set(atoms.numbers)) >= 3
    lone = len(atoms) - 1
    g = NeighborGraph.from_atoms(atoms, ISOLATED_CUTOFF)
    assert g.in_degree()[lone] == 0
    assert not np.any(g.senders == lone)
    assert np.all(g.in_degree()[:lone] > 0)
    # and ASE agrees (distance to every periodic image)
    i, d = neighbor_list("id", atoms, 3 * ISOLATED_CUTOFF)
    assert np.any(i == lone) and d[i == lone].min() > ISOLATED_CUTOFF


# ---------------------------------------------------------------- pymatgen input
def _pymatgen(atoms):
    from pymatgen.core import Molecule
    from pymatgen.io.ase import AseAtomsAdaptor

    if atoms.cell.rank == 3:
        return AseAtomsAdaptor.get_structure(atoms)
    # Cu55 has an odd electron count: skip pymatgen's charge/spin check
    return Molecule(atoms.get_chemical_symbols(), atoms.positions, charge_spin_check=False)


def test_pymatgen_input_gives_same_graph(structure):
    name, atoms = structure
    obj = _pymatgen(atoms)
    g_ase = NeighborGraph.from_atoms(atoms, CUTOFF)
    g_pmg = NeighborGraph.from_atoms(obj, CUTOFF)
    assert type(obj).__name__ == ("Structure" if atoms.cell.rank == 3 else "Molecule")
    np.testing.assert_array_equal(g_pmg.pbc, g_ase.pbc)
    assert _triples(g_pmg.receivers, g_pmg.senders, g_pmg.shifts) == \
        _triples(g_ase.receivers, g_ase.senders, g_ase.shifts)
    np.testing.assert_allclose(g_pmg.positions, g_ase.positions, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["small_triclinic", "slab_vacuum", "molecule"])
def test_pymatgen_input_gives_same_results(schnet_model, name):
    atoms = awkward_structures()[name]
    calc = DistributedCalculator(schnet_model, num_parts=3)
    ref = evaluate(calc, atoms)
    calc.calculate(_pymatgen(atoms))
    got = calc.results
    assert abs(got["energy"] - ref["energy"]) <= 1e-10 * max(abs(ref["energy"]), 1)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["energies"], ref["energies"], rtol=0, atol=1e-10)
    if "stress" in ref:
        np.testing.assert_allclose(got["stress"], ref["stress"], rtol=0, atol=1e-10)


def test_single_atom_and_no_edges():
    atoms = Atoms("Ar", positions=[[0, 0, 0]], pbc=False)
    g = NeighborGraph.from_atoms(atoms, CUTOFF)
    assert g.num_atoms == 1 and g.num_edges == 0


def test_rebuilds_do_not_grow_ctypes_caches():
    """vesin's own pointer-to-numpy helper (numpy.ctypeslib.as_array) makes a ctypes array type per
    new neighbour-list length, kept for the life of the process: a long MD's RSS grew ~0.3 MB per
    1,000 steps (LJ, 1,372 atoms). NeighborGraph routes it through numpy's array interface."""
    import ctypes

    from ase.build import bulk

    def build(n):
        atoms = bulk("Cu", cubic=True).repeat((1 + n % 4, 2, 2))
        atoms.rattle(0.3, seed=n)
        return NeighborGraph.from_atoms(atoms, 3.0 + 0.05 * n)

    build(0)
    before = len(ctypes._pointer_type_cache)
    sizes = {build(n).num_edges for n in range(1, 30)}
    assert len(sizes) > 20  # many distinct edge counts
    assert len(ctypes._pointer_type_cache) == before


_BUILD_PEAK = """
import json, torch
from distmlip import NeighborGraph
from distmlip.runtime.memory import PeakMeter
from distmlip.testing.structures import fcc_bulk
atoms = fcc_bulk(size=14, seed=1)
with PeakMeter(torch.device("cpu")) as meter:
    graph = NeighborGraph.from_atoms(atoms, 5.5)
print(json.dumps({"peak": meter.peak, "edges": graph.num_edges}))
"""


def test_graph_and_plan_are_stored_compactly():
    """The graph keeps int32 atom ids and int8 lattice shifts (11 bytes an edge), a part's plan
    int32 edge ids and local indices, and the build's measured peak stays within the bytes per
    edge the memory model charges for it (``GRAPH_BUILD_BYTES_PER_EDGE``; measured in a fresh
    process: the resident peak of a long-lived test process depends on what ran before)."""
    import json
    import os
    import subprocess
    import sys

    from distmlip.partition import PartitionPlan
    from distmlip.runtime.memory import GRAPH_BUILD_BYTES_PER_EDGE, GRAPH_BYTES_PER_EDGE

    atoms = fcc_bulk(size=14, seed=1)  # 10,976 atoms, ~0.9 M edges at 5.5 Å
    graph = NeighborGraph.from_atoms(atoms, 5.5)
    assert graph.senders.dtype == graph.receivers.dtype == np.int32
    assert graph.shifts.dtype == np.int8
    stored = graph.senders.nbytes + graph.receivers.nbytes + graph.shifts.nbytes
    assert stored == GRAPH_BYTES_PER_EDGE * graph.num_edges
    proc = subprocess.run([sys.executable, "-c", _BUILD_PEAK], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built["edges"] == graph.num_edges
    assert built["peak"] <= GRAPH_BUILD_BYTES_PER_EDGE * graph.num_edges, built["peak"] / graph.num_edges
    plan = PartitionPlan.build(graph, 4)
    for part in plan.parts:
        assert part.edges.dtype == part.edge_index.dtype == np.int32
        assert np.array_equal(part.atoms[part.edge_index[1]], graph.receivers[part.edges])


def test_shifts_beyond_int8_are_kept_exactly():
    """A 1 Å periodic chain with a 150 Å cutoff: shifts up to 150 cells do not fit int8; the
    graph stores them wider and still equals ASE's neighbour list."""
    atoms = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=[1.0, 20.0, 20.0], pbc=[True, False, False])
    graph = NeighborGraph.from_atoms(atoms, 150.0)
    assert graph.shifts.dtype == np.int32 and int(np.abs(graph.shifts).max()) == 149
    i, j, S = neighbor_list("ijS", atoms, 150.0)
    assert _triples(graph.receivers, graph.senders, graph.shifts) == _triples(i, j, S)
