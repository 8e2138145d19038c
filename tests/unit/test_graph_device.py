"""The neighbour graph built by vesin-torch (``neighbors="vesin-torch"``) against vesin's (the
default on the CPU): the same edges, shifts and order on the CPU; in the canonical order used off
the CPU the same edges; the host build taken where the device's kernel cannot build; the full
calculator's results unchanged; a clear error when vesin-torch is missing."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

import distmlip.graph.neighbors as nb
from distmlip import DistributedCalculator, NeighborGraph
from distmlip.graph.neighbors import complete_cell, device_limit, resolve_neighbors
from distmlip.testing import awkward_structures, evaluate

from support import make_lj, make_schnet

vesin_torch = pytest.importorskip("vesin_torch", reason="vesin-torch is not installed (distmlip[gpu])")

CUTOFF = 5.0


def _cells() -> dict[str, Atoms]:
    """Orthogonal, triclinic, slab (mixed periodicity), molecule, tiny periodic cells."""
    cells = dict(awkward_structures())
    tric = bulk("Cu", "fcc", a=3.6).repeat((4, 4, 4))  # primitive fcc vectors: triclinic
    tric.rattle(0.05, seed=2)
    cells["triclinic_bulk"] = tric
    cells["tiny_si"] = bulk("Si", "diamond", a=5.43)  # 2 atoms, cell << cutoff: many images
    wire = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 4))
    wire.pbc = (False, False, True)  # one periodic direction
    wire.rattle(0.05, seed=4)
    cells["wire"] = wire
    return cells


CELLS = _cells()


def _graph(atoms: Atoms, neighbors: str, cutoff: float = CUTOFF, device=None) -> NeighborGraph:
    return NeighborGraph.from_arrays(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers, cutoff,
                                     neighbors, device)


def _triples(g: NeighborGraph) -> list:
    return sorted(zip(g.receivers.tolist(), g.senders.tolist(), map(tuple, g.shifts.tolist()),
                      strict=True))


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("cutoff", [2.6, CUTOFF])
def test_vesin_torch_graph_equals_vesin(name, cutoff):
    """On the CPU vesin-torch runs vesin's own code: the graph is identical, order and types too."""
    atoms = CELLS[name]
    host, dev = _graph(atoms, "vesin", cutoff), _graph(atoms, "vesin-torch", cutoff)
    assert host.num_edges > 0 or name == "multi_element_isolated"
    for field in ("senders", "receivers", "shifts"):
        a, b = getattr(host, field), getattr(dev, field)
        assert a.dtype == b.dtype, (name, field, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: {field}")
    assert dev.cutoff == host.cutoff


@pytest.mark.parametrize("name", sorted(CELLS))
def test_canonical_order_has_the_same_edges(name):
    """The order used off the CPU (the library's order there is not fixed): the same edges and
    shifts, sorted by receiver, then sender, then shift."""
    atoms = CELLS[name]
    host = _graph(atoms, "vesin")
    pbc = np.asarray(atoms.pbc)
    box = complete_cell(atoms.cell.array, pbc) if not pbc.all() else atoms.cell.array
    senders, receivers, shifts = nb._device_edges(atoms.positions, box, pbc, CUTOFF, "cpu", canonical=True)
    canon = NeighborGraph(host.positions, host.cell, host.pbc, host.numbers, CUTOFF, senders, receivers,
                          shifts)
    assert (senders.dtype, receivers.dtype, shifts.dtype) == (host.senders.dtype, host.receivers.dtype,
                                                              host.shifts.dtype)
    assert _triples(canon) == _triples(host)
    keys = np.column_stack([receivers, senders, shifts]).tolist()
    assert keys == sorted(keys), f"{name}: not in (receiver, sender, shift) order"
    if name == "fcc_bulk":  # vesin's own order is not that one: the test sees a real reordering
        assert not np.array_equal(canon.senders, host.senders)


def test_device_limit_names_the_narrow_directions():
    tiny = CELLS["tiny_si"]
    reason = device_limit(tiny.cell.array, tiny.pbc, CUTOFF)
    assert reason is not None and "narrower than twice the cutoff" in reason and "[0, 1, 2]" in reason
    wide = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))  # 10.8 Å > 2 x 5 Å
    assert device_limit(wide.cell.array, wide.pbc, CUTOFF) is None
    slab = CELLS["slab_vacuum"]  # the open direction does not count
    box = complete_cell(slab.cell.array, slab.pbc)
    assert device_limit(box, slab.pbc, 2.0) is None
    assert device_limit(np.eye(3), np.zeros(3, dtype=bool), CUTOFF) is None  # a molecule


@pytest.mark.parametrize("name", ["tiny_si", "fcc_bulk"])
def test_a_device_that_cannot_build_falls_back_to_the_host(name):
    """Off the CPU a system the device's kernel refuses (a tiny cell) or a failure of the device
    (here the meta device, which vesin does not support) gives the host's graph, with a warning."""
    atoms = CELLS[name]
    host = _graph(atoms, "vesin")
    with pytest.warns(RuntimeWarning, match="built on the host with vesin, not on meta") as record:
        dev = _graph(atoms, "vesin-torch", device="meta")
    reason = "narrower than twice the cutoff" if name == "tiny_si" else "vesin-torch failed there"
    assert reason in str(record[0].message)
    for field in ("senders", "receivers", "shifts"):
        np.testing.assert_array_equal(getattr(host, field), getattr(dev, field))


def test_auto_takes_vesin_torch_on_cuda_only(monkeypatch):
    assert resolve_neighbors("auto", "cpu") == "vesin"
    assert resolve_neighbors("auto", None) == "vesin"
    assert resolve_neighbors("auto", "cuda:0") == "vesin-torch"  # no GPU needed to decide
    assert resolve_neighbors("vesin", "cuda:0") == "vesin"
    assert resolve_neighbors("vesin-torch", "cpu") == "vesin-torch"
    monkeypatch.setitem(sys.modules, "vesin_torch", None)  # not installed
    assert resolve_neighbors("auto", "cuda:0") == "vesin"
    with pytest.raises(ValueError, match=r"^neighbors: expected one of \['auto', 'vesin', 'vesin-torch'\], "
                                         r"got 'torch'$"):
        resolve_neighbors("torch", "cpu")


def test_missing_vesin_torch_is_a_clear_error(monkeypatch):
    atoms = CELLS["fcc_bulk"]
    monkeypatch.setitem(sys.modules, "vesin_torch", None)
    with pytest.raises(ImportError) as err:
        _graph(atoms, "vesin-torch")
    message = str(err.value)
    assert message.startswith("neighbors: expected vesin-torch importable for neighbors='vesin-torch', got "
                              "ModuleNotFoundError"), message
    assert "install with pip install vesin-torch" in message and "neighbors='vesin'" in message
    calc = DistributedCalculator(make_lj(), num_parts=2, neighbors="vesin-torch")
    with pytest.raises(ImportError, match="^neighbors: expected vesin-torch importable"):
        calc.get_potential_energy(atoms.copy())
    _graph(atoms, "auto", device="cpu")  # auto and vesin never need it


def test_option_is_checked_and_threaded():
    with pytest.raises(ValueError, match=r"^neighbors: expected one of \['auto', 'vesin', 'vesin-torch'\], "
                                         r"got 'cuda'$"):
        DistributedCalculator(make_lj(), neighbors="cuda")
    calc = DistributedCalculator(make_lj(), num_parts=2, neighbors="vesin-torch")
    assert calc.parameters["neighbors"] == "vesin-torch"
    assert calc.runner.builder.neighbors == "vesin-torch"
    assert calc.set(neighbors="vesin") == {"neighbors": "vesin"}
    assert calc.runner.builder.neighbors == "vesin"
    assert DistributedCalculator(make_lj()).parameters["neighbors"] == "auto"


@pytest.mark.parametrize("canonical", [False, True], ids=["cpu_order", "device_order"])
@pytest.mark.parametrize("name", ["small_triclinic", "slab_vacuum", "molecule", "tiny_si"])
def test_calculator_results_equal_the_default(name, canonical, monkeypatch):
    """float64 results with the vesin-torch graph (in vesin's order, and in the canonical order a
    GPU build uses) within 1e-10 of the default's, split in 3 parts, forces and stress included."""
    if canonical:
        monkeypatch.setattr(nb, "_device_edges", functools.partial(nb._device_edges, canonical=True))
    atoms = CELLS[name]
    model = make_schnet()
    ref = evaluate(DistributedCalculator(model, num_parts=3), atoms)
    calc = DistributedCalculator(model, num_parts=3, neighbors="vesin-torch")
    out = evaluate(calc, atoms)
    for key in ref:
        scale = max(float(np.abs(ref[key]).max()), 1.0)
        assert np.abs(np.asarray(out[key]) - np.asarray(ref[key])).max() <= 1e-10 * scale, key
    if canonical and name == "small_triclinic":  # the order differs, so the sums may round apart
        assert not np.array_equal(calc.runner.last_graph.senders,
                                  NeighborGraph.from_atoms(atoms, calc.runner.last_graph.cutoff).senders)
