"""``global_sum`` in the bounded-memory mode (parts evaluated one at a time, ``max_memory=``): a
model whose energy is not a sum of per-atom terms gives exactly its unbounded results (float64,
1e-10): the toy of tests/engine/test_global_sum.py and Orb v3 (a mean readout), halo and extended mode,
1, 2, 3 and 5 parts, one and two workers, and through a real ``max_memory`` budget.

How: each ``global_sum`` call is a level of the sequential evaluation, like a halo exchange: a
forward pass posts every part's partial sum, the total is given back to every part in the replays,
and the backward replays accumulate dE/d(total), which is the gradient of every part's partial sum
(``distmlip/runtime/sequential.py``)."""

from __future__ import annotations

import pytest

from distmlip import DistributedCalculator, estimate_memory
from distmlip.testing import evaluate
from distmlip.testing.models import GlobalReadoutToy

from support import assert_close, launch, one_at_a_time, salt, slab

RTOL = 1e-10


@pytest.fixture(scope="module")
def toy():
    return GlobalReadoutToy(cutoff=4.0, seed=3, scale=4.0).double()


def _compare(got: dict, ref: dict, what: str) -> float:
    return assert_close(got, ref, RTOL, what)


@pytest.mark.parametrize("make", [salt, slab], ids=["salt", "slab"])
@pytest.mark.parametrize("mode", ["halo", "extended"])
def test_one_at_a_time_equals_all_at_once(toy, make, mode):
    atoms = make()
    ref = evaluate(DistributedCalculator(toy, 1), atoms)
    for parts, partitioner, device in ((1, "grid", "cpu"), (2, "slab", "cpu"), (3, "metis", "cpu"),
                                       (5, "grid", "cpu"), (4, "grid", ["cpu", "cpu"])):
        calc = one_at_a_time(toy, parts, partitioner=partitioner, mode=mode, device=device)
        for call in range(2):  # the second call knows the levels and replays them
            got = evaluate(calc, atoms)
            _compare(got, ref, f"{mode}/{partitioner}/{parts}/call {call}")
        assert calc.runner.sequential
        # the levels: one halo exchange (halo mode) then the global sum
        want = ("halo_exchange", "global_sum") if mode == "halo" else ("global_sum",)
        assert calc.runner._levels == want
        assert calc.runner.last_exchange_calls == (1 if mode == "halo" else 0)


def test_more_parts_than_atoms(toy):
    """Empty parts and a worker with no part still post (zero) partial sums."""
    from ase import Atoms
    from ase.build import molecule

    water = molecule("H2O")
    atoms = Atoms(water.numbers, water.positions, pbc=False)
    ref = evaluate(DistributedCalculator(toy, 1), atoms)
    for parts, device in ((5, "cpu"), (2, ["cpu", "cpu", "cpu"])):
        calc = one_at_a_time(toy, parts, device=device)
        _compare(evaluate(calc, atoms), ref, f"{parts} parts on {device}")


def test_max_memory_budget(toy):
    """A budget below the unbounded needs: more parts, one at a time, the same results, also after
    the atoms move."""
    atoms = salt().repeat((2, 1, 1))  # 128 atoms
    unbounded = estimate_memory(toy, atoms)
    # halfway between the smallest budget that works and the unbounded need: the calibrated memory
    # model of this tiny model is mostly a constant (measured 1.4 MB here, 15 MB on another
    # machine), so a fraction of the unbounded need alone may fall below the smallest budget
    with pytest.raises(ValueError, match="max_memory: expected at least") as refused:
        estimate_memory(toy, atoms, max_memory=1)
    value, unit = str(refused.value).split("at least ")[1].split(" ")[:2]
    smallest = float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    assert smallest < unbounded
    budget = int(smallest + 0.5 * (unbounded - smallest))
    ref_calc = DistributedCalculator(toy, 1)
    calc = DistributedCalculator(toy, 1, max_memory=budget)
    for step in range(2):
        _compare(evaluate(calc, atoms), evaluate(ref_calc, atoms), f"step {step}")
        atoms.positions += 0.01
    assert calc.runner.sequential and calc.last_plan.num_parts > 1


def test_model_that_changes_its_calls_is_refused(toy):
    """A model whose calls differ between parts (a halo exchange on one, a global sum on the
    other) gets a clear error, not a wrong result."""

    class Inconsistent(GlobalReadoutToy):
        def forward(self, graph):
            h = self.embedding[graph.numbers].to(graph.edge_vec.dtype)
            if int(graph.atom_ids[0]) == 0 if graph.num_nodes else False:
                graph.global_sum(h)
            else:
                graph.halo_exchange(h[: graph.num_needed])
            return (h.sum(1) * graph.edge_vec.sum() * 0)[: graph.num_needed]

    model = Inconsistent(cutoff=4.0).double()
    calc = one_at_a_time(model, 3)
    atoms = salt()
    atoms.calc = calc
    with pytest.raises(RuntimeError, match="every part must make the same calls"):
        atoms.get_potential_energy()


def test_model_that_changes_its_calls_between_evaluations(toy):
    """The levels found on the first evaluation are replayed on the next ones: a model that then
    makes other calls (here a global sum before its halo exchange, then one more at the end) gets
    a clear error."""

    class Changing(GlobalReadoutToy):
        extra = None

        def forward(self, graph):
            h = self.embedding[graph.numbers].to(graph.edge_vec.dtype)
            first = graph.global_sum(h).sum() if self.extra == "first" else 0.0
            out = super().forward(graph) + 0.0 * first
            if self.extra == "last":
                out = out + 0.0 * graph.global_sum(out.unsqueeze(1)).sum()
            return out

    model = Changing(cutoff=4.0, seed=3).double()
    calc = one_at_a_time(model, 3)
    atoms = salt()
    evaluate(calc, atoms)
    for extra, match in (("first", "call 1 to halo_exchange/global_sum was a halo_exchange on the "
                                   "first evaluation and now .on this rank. global_sum"),
                         ("last", "made call 3 to halo_exchange/global_sum a global_sum in a replay, "
                                  "but the first pass made 2")):
        for replica in calc.runner.replicas.values():
            replica.extra = extra
        atoms.positions += 0.01
        atoms.calc = calc
        with pytest.raises(RuntimeError, match=match):
            atoms.get_potential_energy()


@pytest.mark.parametrize("name", ["oxide", "slab"])
def test_orb_one_at_a_time(name):
    """Orb v3 (mean readout, ZBL averaged over atoms, neighbour cap): bounded equals unbounded,
    float64, 1e-10, both modes, 2 and 3 parts, and 1 part (parts one at a time by construction)."""
    pytest.importorskip("orb_models", reason="orb-models is not installed")
    from distmlip.models.orb import OrbModel
    from distmlip.testing.adapters import adapter_structures

    from support.adapters import make_orb

    model = OrbModel(make_orb().double())
    atoms = adapter_structures()[name]
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    for mode in ("halo", "extended"):
        for parts, partitioner in ((1, "grid"), (2, "slab"), (3, "metis")):
            calc = one_at_a_time(model, parts, partitioner=partitioner, mode=mode)
            calc.runner.layer_steps = False  # the generic replay's sum level (steps: test_orb.py)
            _compare(evaluate(calc, atoms), ref, f"orb {name}/{mode}/{partitioner}/{parts}")
            assert calc.runner._levels.count("global_sum") == 1


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun_one_at_a_time():
    """mpirun -n 2, 2 parts per rank evaluated one at a time: the partial sums all-reduced across
    ranks in the forward level and dE/d(total) in the backward level (salt, slab, a molecule with
    fewer atoms than parts; both modes; grid, slab, METIS)."""
    proc, _ = launch("mpirun", 2, "global_sum.py", "2", "--bounded")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert f"rank {rank}: 66 global-sum checks passed with 4 parts, one at a time" in out, out[-4000:]
