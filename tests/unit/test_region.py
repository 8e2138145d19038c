"""The pieces the multi-process runtime builds each rank's part from: ``atoms_near`` (the atoms a
rank must hold) and ``build_part`` on that region's own graph, checked against the whole-graph plan."""

import numpy as np
import pytest

from distmlip.graph import NeighborGraph
from distmlip.graph.region import atoms_near
from distmlip.partition import PartitionPlan
from distmlip.partition.plan import build_part, owned_rows
from distmlip.testing import awkward_structures

CUTOFF = 5.0


@pytest.fixture(scope="module", params=sorted(awkward_structures()))
def structure(request):
    return awkward_structures()[request.param]


@pytest.mark.parametrize("hops", [1, 2, 3])
@pytest.mark.parametrize("partitioner,parts", [("grid", 2), ("grid", 7), ("slab", 5), ("metis", 3)])
def test_region_part_equals_whole_graph_part(structure, hops, partitioner, parts):
    graph = NeighborGraph.from_atoms(structure, CUTOFF)
    mode = "halo" if hops == 1 else "extended"
    plan = PartitionPlan.build(graph, parts, partitioner, mode, hops)
    rows = owned_rows(plan.owner, parts)
    for part in plan.parts:
        mine = plan.owner == part.index
        if not mine.any():
            continue
        ids = atoms_near(graph.positions, graph.cell, graph.pbc, mine, hops * CUTOFF)
        assert np.all(np.diff(ids) > 0)
        assert np.isin(part.atoms, ids).all(), "the region misses atoms the part needs"
        sub = NeighborGraph.from_arrays(graph.positions[ids], graph.cell, graph.pbc,
                                        graph.numbers[ids], CUTOFF)
        local = build_part(sub, part.index, plan.owner[ids], rows[ids], hops)
        assert np.array_equal(ids[local.atoms], part.atoms)
        assert np.array_equal(local.halo_owner, part.halo_owner)
        assert np.array_equal(local.halo_source, part.halo_source)
        # same edges: compare (sender, receiver, shift) triples in global ids
        mine_edges = np.column_stack([ids[sub.senders[local.edges]], ids[sub.receivers[local.edges]],
                                      sub.shifts[local.edges]])
        whole = np.column_stack([graph.senders[part.edges], graph.receivers[part.edges],
                                 graph.shifts[part.edges]])
        assert np.array_equal(np.unique(mine_edges, axis=0), np.unique(whole, axis=0))
        assert len(mine_edges) == len(whole)


def test_region_is_smaller_than_the_system_for_a_large_cell():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    graph = NeighborGraph.from_atoms(atoms, CUTOFF)
    plan = PartitionPlan.build(graph, 8, "grid")
    ids = atoms_near(graph.positions, graph.cell, graph.pbc, plan.owner == 0, CUTOFF)
    assert len(ids) < 0.6 * len(atoms)
