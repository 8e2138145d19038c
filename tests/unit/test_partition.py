"""Owner assignment and PartitionPlan: ownership, validity, balance, odd part counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distmlip import DistributedCalculator, NeighborGraph, PartitionPlan
from distmlip.partition import assign_owners
from distmlip.partition.assign import grid_owners, slab_owners
from distmlip.testing import awkward_structures, evaluate, rel_err
from distmlip.testing.structures import fcc_bulk
from distmlip.typing import PARTITIONERS

CUTOFF = 5.0


def _graph(atoms):
    return NeighborGraph.from_atoms(atoms, CUTOFF)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("num_parts", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("mode,hops", [("halo", 1), ("halo", 2), ("extended", 3)])
def test_plan_owns_every_atom_once_and_validates(structure, partitioner, num_parts, mode, hops):
    name, atoms = structure
    graph = _graph(atoms)
    plan = PartitionPlan.build(graph, num_parts, partitioner, mode, hops)
    plan.validate(graph)
    assert plan.num_parts == num_parts
    owned = np.concatenate([p.owned_ids for p in plan.parts])
    assert np.array_equal(np.sort(owned), np.arange(len(atoms))), f"{name}: ownership not a partition"
    for p in plan.parts:
        assert np.all(plan.owner[p.owned_ids] == p.index)
        # a part's edges are exactly those received by its atoms fewer than `hops` hops away
        if p.num_local:
            received = np.isin(graph.receivers, p.atoms)
            assert set(p.edges.tolist()) <= set(np.flatnonzero(received).tolist())
            own_edges = np.flatnonzero(np.isin(graph.receivers, p.owned_ids))
            assert set(own_edges.tolist()) <= set(p.edges.tolist()), "an owned atom misses an edge"
    if mode == "halo" and hops == 1:
        all_edges = np.concatenate([p.edges for p in plan.parts])
        assert np.array_equal(np.sort(all_edges), np.arange(graph.num_edges))
        # the one-hop halo is exactly the non-owned senders of owned atoms' edges
        for p in plan.parts:
            senders = graph.senders[np.isin(graph.receivers, p.owned_ids)]
            expect = np.setdiff1d(senders, p.owned_ids)
            assert np.array_equal(np.sort(p.halo_ids), expect)


def test_slab_balanced_by_count():
    for atoms in awkward_structures().values():
        for parts in (2, 3, 7, 16):
            counts = np.bincount(slab_owners(atoms.positions, atoms.cell.array, atoms.pbc, parts),
                                 minlength=parts)
            assert counts.max() - counts.min() <= 1, (len(atoms), parts, counts)


def test_slab_cuts_along_one_axis():
    atoms = fcc_bulk(size=3)
    atoms = atoms.repeat((3, 1, 1))  # long along x
    owner = slab_owners(atoms.positions, atoms.cell.array, atoms.pbc, 4)
    x = atoms.get_scaled_positions(wrap=True)[:, 0]
    for p in range(3):
        assert x[owner == p].max() <= x[owner == p + 1].min()


@pytest.mark.parametrize("parts", [2, 3, 5, 7, 13, 31, 97])
def test_grid_balanced_for_any_count(parts):
    atoms = fcc_bulk(size=3)
    owner = grid_owners(atoms.positions, atoms.cell.array, atoms.pbc, parts)
    counts = np.bincount(owner, minlength=parts)
    assert len(counts) == parts and counts.sum() == len(atoms)
    # recursive bisection in proportion to the parts each side gets: sizes differ by < log2(P)+1
    assert counts.max() - counts.min() <= int(np.ceil(np.log2(parts))) + 1, counts
    assert counts.min() >= 1


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_more_parts_than_atoms(partitioner, schnet_model):
    atoms = awkward_structures()["small_triclinic"]  # 3 atoms
    parts = 1000
    graph = _graph(atoms)
    plan = PartitionPlan.build(graph, parts, partitioner, "halo")
    plan.validate(graph)
    assert plan.num_parts == parts
    empty = sum(p.num_owned == 0 for p in plan.parts)
    assert empty == parts - len(atoms)
    for p in plan.parts:
        if p.num_owned == 0:
            assert p.num_local == 0 and len(p.edges) == 0
    ref = evaluate(DistributedCalculator(schnet_model, 1), atoms)
    got = evaluate(DistributedCalculator(schnet_model, parts, partitioner=partitioner), atoms)
    for q in ref:
        assert rel_err(got[q], ref[q]) <= 1e-10, q


@pytest.mark.parametrize("partitioner", ["grid", "slab"])
def test_huge_part_count_on_a_crystal(partitioner):
    atoms = fcc_bulk(size=3)
    owner = assign_owners(_graph(atoms), 4096, partitioner)
    counts = np.bincount(owner, minlength=4096)
    assert counts.sum() == len(atoms) and counts.max() == 1
    assert owner.max() < 4096 and owner.min() >= 0


def test_metis_partition():
    atoms = fcc_bulk(size=3)
    graph = _graph(atoms)
    for parts in (2, 3, 7):
        owner = assign_owners(graph, parts, "metis")
        counts = np.bincount(owner, minlength=parts)
        assert counts.min() > 0, counts
        assert counts.max() <= 1.3 * len(atoms) / parts + 1, counts  # METIS default imbalance 1.03 per weight
        plan = PartitionPlan.from_owner(graph, owner, parts)
        plan.validate(graph)
    # deterministic for a fixed seed
    assert np.array_equal(assign_owners(graph, 7, "metis"), assign_owners(graph, 7, "metis"))


def test_metis_cuts_fewer_edges_than_random():
    """The point of METIS: on a connected graph its halo is far below a random assignment's.
    (Nearest-neighbour graph of 500 atoms: at 5 Å every part of a small cell sees everything.)"""
    atoms = fcc_bulk(size=5)
    graph = NeighborGraph.from_atoms(atoms, 3.0)
    metis = PartitionPlan.build(graph, 4, "metis").halo_fraction()
    rng = np.random.default_rng(0)
    random = PartitionPlan.from_owner(graph, rng.integers(0, 4, len(atoms)), 4).halo_fraction()
    assert metis < 0.85 * random, (metis, random)


def test_partitioners_deterministic_and_translation_invariant():
    atoms = fcc_bulk(size=3)
    shifted = atoms.copy()
    shifted.positions += atoms.cell.array.sum(axis=0) * 1.0  # a whole lattice vector sum
    for partitioner in ("slab", "grid"):
        a = assign_owners(_graph(atoms), 5, partitioner)
        b = assign_owners(_graph(atoms), 5, partitioner)
        assert np.array_equal(a, b)
        c = assign_owners(_graph(shifted), 5, partitioner)
        assert np.array_equal(a, c), f"{partitioner}: owners changed under a lattice translation"


def test_extended_mode_holds_deeper_halo():
    atoms = fcc_bulk(size=5)
    graph = NeighborGraph.from_atoms(atoms, 3.0)
    halo = PartitionPlan.build(graph, 4, "grid", "halo", 1)
    ext = PartitionPlan.build(graph, 4, "grid", "extended", 3)
    assert ext.halo_fraction() > halo.halo_fraction()
    assert halo.redundancy() == 1.0
    assert ext.redundancy() > 1.0


def test_exchange_maps_point_at_owners():
    atoms = awkward_structures()["slab_vacuum"]
    graph = _graph(atoms)
    plan = PartitionPlan.build(graph, 5, "grid")
    for t in range(plan.num_parts):
        for s in range(plan.num_parts):
            rows_there = plan.send_rows(s, t)
            rows_here = plan.recv_rows(t, s)
            assert len(rows_there) == len(rows_here)
            np.testing.assert_array_equal(plan.parts[s].atoms[rows_there], plan.parts[t].atoms[rows_here])
            assert np.all(plan.owner[plan.parts[t].atoms[rows_here]] == s)


@pytest.mark.parametrize("mode,hops", [("halo", 1), ("extended", 3)])
def test_lean_parts_make_the_same_local_edges(structure, mode, hops):
    """A lean plan (parts one at a time: no stored local edge_index, 4 bytes an edge instead of 12)
    gives each part the same local edges when it is evaluated (part_edge_index), and validates;
    a lean part whose edges name an atom it lacks fails validate."""
    from distmlip.partition.plan import build_parts, owned_rows, part_edge_index

    name, atoms = structure
    graph = _graph(atoms)
    plan = PartitionPlan.build(graph, 5, "grid", mode, hops)
    lean = build_parts(graph, range(5), plan.owner, owned_rows(plan.owner, 5), hops, lean=True)
    for full, part in zip(plan.parts, lean, strict=True):
        assert (part.edge_index is None or not part.num_local) and np.array_equal(part.atoms, full.atoms)
        got = part_edge_index(part, graph)
        assert got.dtype == full.edge_index.dtype, name
        assert np.array_equal(got, full.edge_index), f"{name}: part {part.index}"
        assert part_edge_index(full, graph) is full.edge_index
    dataclasses.replace(plan, parts=lean).validate(graph)
    big = max(lean, key=lambda p: len(p.edges))
    if big.num_halo:  # drop a halo atom its edges read: validate names the part
        cut = dataclasses.replace(big, atoms=big.atoms[:-1], halo_owner=big.halo_owner[:-1],
                                  halo_source=big.halo_source[:-1])
        broken = tuple(cut if p is big else p for p in lean)
        with pytest.raises(ValueError, match=f"part {big.index} has wrong local"):
            dataclasses.replace(plan, parts=broken).validate(graph)
