"""The layer protocol (``DistributableModel.embed/step/energies``, models/base.py): a model that
describes itself as steps is evaluated in bounded memory one step per part and level (no replay
from the start, ``runtime/sequential.py``) with exactly its unbounded results; steps that do not
compose to ``forward`` are refused naming the step; a model without steps is unchanged."""

from __future__ import annotations

import pytest
import torch

from distmlip import DistributedCalculator
from distmlip.models import SchNet
from distmlip.models.base import LocalGraph, compare_steps, has_steps, run_steps
from distmlip.testing import awkward_structures, check_steps, evaluate
from distmlip.testing.structures import fcc_bulk

from support import CALLS, CountedSchNet, assert_close, counted, launch, make_lj, make_schnet, one_at_a_time

RTOL = 1e-10


class NoSteps(CountedSchNet):
    """The same SchNet declaring no steps: the generic replay."""

    exchanged = None


class BrokenStep(SchNet):
    """Step 1 shifts the features it reads: its steps do not compose to its forward."""

    def step(self, i, graph, state):
        if i == 1:
            state = (state[0] + 1e-3,)
        return super().step(i, graph, state)


class BrokenEnergies(SchNet):
    def energies(self, graph, state):
        return 1.01 * super().energies(graph, state)


class ExchangingStep(SchNet):
    """A step that calls the halo exchange itself (the runtime's job with steps)."""

    def step(self, i, graph, state):
        if i > 0:
            state = (graph.halo_exchange(state[0][: graph.num_owned]),)
        return super().step(i, graph, state)


def like(cls, **kwargs):
    """``cls`` with the weights of ``support.make_schnet(**kwargs)``."""
    ref = make_schnet(**kwargs)
    model = cls(cutoff=ref.cutoff, num_interactions=ref.num_layers,
                hidden_channels=ref.embedding.embedding_dim, num_gaussians=len(ref.centers))
    model.load_state_dict(ref.state_dict())
    return model


def _graph(atoms, model):
    import numpy as np
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijD", atoms, model.cutoff)
    return LocalGraph.single(torch.as_tensor(atoms.numbers), torch.as_tensor(np.stack([j, i])),
                             torch.as_tensor(d, dtype=torch.float64))


def test_steps_compose_to_forward():
    model = make_schnet()
    assert has_steps(model) and not has_steps(make_lj()) and not has_steps(like(NoSteps))
    graph = _graph(fcc_bulk(size=2, seed=1), model)
    assert torch.equal(run_steps(model, graph), model(graph))
    report = compare_steps(model, graph)
    assert report["ok"] and report["energies"] == 0.0 and len(report["levels"]) == 2, report
    report = check_steps(model, awkward_structures()["small_triclinic"])
    assert report["ok"] and report["steps"], report["message"]
    assert not check_steps(make_lj(), fcc_bulk(size=2))["steps"]


@pytest.mark.parametrize("name", sorted(awkward_structures()))
def test_bounded_steps_equal_unbounded(name, own_cache):
    """Periodic and non-periodic cells, several part counts and partitioners, two workers: energy,
    forces, stress and per-atom energies within 1e-10 of the unbounded result, through the steps
    (forward called only on the probe, which the first calculator runs when it is built: the
    others find it passed in the cache)."""
    model = like(CountedSchNet)
    atoms = awkward_structures()[name]
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    first = True
    for parts, partitioner, device in ((1, "grid", "cpu"), (2, "slab", "cpu"), (3, "metis", "cpu"),
                                       (7, "slab", "cpu"), (4, "grid", ["cpu", "cpu"])):
        CALLS.clear()
        calc = one_at_a_time(model, parts, partitioner=partitioner, mode="halo", device=device)
        assert CALLS["forward"] == int(first) and CALLS["step"] == model.num_layers * int(first), CALLS
        for call in range(2):
            CALLS.clear()
            calc.reset()
            got = evaluate(calc, atoms)
            assert_close(got, ref, RTOL, f"{name}/{partitioner}/{parts}/call {call}")
            assert calc.runner.sequential and calc.last_plan.num_parts == parts
            # no replay: no forward; 2 L - 1 steps per part
            assert CALLS["forward"] == 0, CALLS
            pieces = sum(max(len(s.parts), 1) for s in calc.runner._built.shards)
            assert CALLS["step"] == (2 * model.num_layers - 1) * pieces, CALLS
        first = False
        assert calc.runner.last_exchange_calls == model.num_layers - 1


def test_more_parts_than_atoms_and_idle_workers():
    """Empty parts and a worker with no part still run their (empty) steps and take part in every
    level exchange; float32 too (1e-5)."""
    from ase import Atoms
    from ase.build import molecule

    water = molecule("H2O")
    atoms = Atoms(water.numbers, water.positions, pbc=False)
    for dtype, rtol in ((torch.float64, RTOL), (torch.float32, 1e-5)):
        model = like(CountedSchNet)
        ref = evaluate(DistributedCalculator(model, 1), atoms)
        for parts, device in ((5, "cpu"), (2, ["cpu", "cpu", "cpu"])):
            calc = one_at_a_time(model, parts, device=device, dtype=dtype)
            CALLS.clear()
            assert_close(evaluate(calc, atoms), ref, rtol, f"{dtype}/{parts}/{device}")
            assert CALLS["step"] > 0 and CALLS["forward"] <= 1, CALLS


def test_steps_call_counts(own_cache, monkeypatch, tmp_path):
    """L = 3 steps, P parts: (L - 1) P steps forward, L P backward, and the probe's L, once per
    model and machine: a new calculator (as in a new process) finds the probe passed in the cache
    directory; with another directory it probes again."""
    model = like(CountedSchNet)
    atoms = fcc_bulk(size=3, seed=2)
    CALLS.clear()
    calc = one_at_a_time(model, 5)  # the probe: when the calculator is built
    evaluate(calc, atoms)
    assert CALLS == {"forward": 1, "step": 2 * 5 + 3 * 5 + 3}, CALLS
    CALLS.clear()
    atoms.positions += 0.01
    evaluate(calc, atoms)
    assert CALLS == {"step": 25}, CALLS
    assert len(list((own_cache / "checks").glob("*.json"))) == 1
    CALLS.clear()
    evaluate(one_at_a_time(like(CountedSchNet), 5), atoms)  # the same weights: recorded
    assert CALLS == {"step": 25}, CALLS
    CALLS.clear()
    evaluate(one_at_a_time(like(CountedSchNet, seed=2), 5), atoms)  # other weights
    assert CALLS["forward"] == 1, CALLS
    monkeypatch.setenv("DISTMLIP_CACHE_DIR", str(tmp_path / "elsewhere"))
    CALLS.clear()
    evaluate(one_at_a_time(model, 5), atoms)
    assert CALLS == {"forward": 1, "step": 2 * 5 + 3 * 5 + 3}, CALLS


def test_progress_bar_counts_every_step(capsys, monkeypatch):
    """``progress=True``: the bar counts parts, each advanced by its L - 1 forward steps and L
    backward steps (2L - 1 ticks make a part), and reaches every part on every call."""
    import re

    from distmlip.runtime.progress import Progress

    ticks = []
    monkeypatch.setattr(Progress, "tick", lambda self, _tick=Progress.tick: (ticks.append(1), _tick(self)))
    model = make_schnet()
    atoms = fcc_bulk(size=3, seed=4)
    calc = DistributedCalculator(model, 4, progress=True)
    calc.runner._sequential = True
    for seed in (4, 5):
        atoms.rattle(0.01, seed=seed)
        ticks.clear()
        evaluate(calc, atoms)
        err = capsys.readouterr().err
        counts = [(float(a), int(b)) for a, b in re.findall(r"(\d+\.\d)/(\d+) parts", err)]
        assert counts and counts[-1] == (4.0, 4), counts[-3:]
        assert len(ticks) == 4 * (2 * model.num_layers - 1), len(ticks)


def test_model_without_steps_unchanged():
    """No steps (or the generic path asked for): the replay from the start, same results."""
    atoms = fcc_bulk(size=3, seed=2)
    ref = evaluate(DistributedCalculator(make_schnet(), 1), atoms)
    for model, generic in ((like(NoSteps), False), (like(CountedSchNet), True)):
        calc = one_at_a_time(model, 4)
        if generic:
            calc.runner.layer_steps = False
        CALLS.clear()
        assert_close(evaluate(calc, atoms), ref, RTOL, type(model).__name__)
        assert CALLS["step"] == 0 and CALLS["forward"] > 4 * model.num_layers, CALLS
    lj = make_lj()
    assert_close(evaluate(one_at_a_time(lj, 3), atoms), evaluate(DistributedCalculator(lj, 1), atoms),
                 1e-12, "lj")


def test_extended_mode_uses_the_generic_path():
    model = like(CountedSchNet)
    atoms = fcc_bulk(size=3, seed=2)
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    CALLS.clear()
    assert_close(evaluate(one_at_a_time(model, 3, mode="extended"), atoms), ref, RTOL, "extended")
    assert CALLS["step"] == 0


def test_max_memory_budget_takes_the_steps():
    from distmlip import estimate_memory

    model = like(CountedSchNet, hidden_channels=32)
    atoms = fcc_bulk(size=5, seed=3)
    budget = int(0.4 * estimate_memory(model, atoms))
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    calc = DistributedCalculator(model, 1, max_memory=budget)
    CALLS.clear()
    assert_close(evaluate(calc, atoms), ref, RTOL, "budget")
    assert calc.runner.sequential and calc.last_plan.num_parts > 1
    assert CALLS["step"] > 0


@pytest.mark.parametrize("cls, where", [(BrokenStep, r"step\(1\) differs first"),
                                        (BrokenEnergies, r"step\(2\) or energies differs first")])
def test_broken_steps_refused(cls, where):
    model = like(cls)
    atoms = fcc_bulk(size=3, seed=2)
    report = check_steps(model, atoms, raise_on_failure=False)
    assert not report["ok"], report
    with pytest.raises(AssertionError, match=where):
        check_steps(model, atoms)
    refusal = f"do not compose to its forward: {where}.*largest relative difference"
    # refused when the calculator is built (a probe crystal), with a budget or one at a time
    with pytest.raises(ValueError, match=refusal):
        DistributedCalculator(model, 3, max_memory="1GB")
    with pytest.raises(ValueError, match=refusal):
        one_at_a_time(model, 3)
    # unbounded (no steps used) it still runs its forward
    evaluate(DistributedCalculator(model, 3), atoms)


def test_steps_the_probe_cannot_take_are_checked_at_the_first_call(monkeypatch):
    """A model the probe crystal does not suit (here: the probe made to fail) is built, and its
    broken steps refused at the first bounded evaluation, on the system's own first part."""
    from distmlip.runtime import steps

    def unsuitable(model):
        raise KeyError("no element this model takes")

    monkeypatch.setattr(steps, "_probe_atoms", unsuitable)
    calc = one_at_a_time(like(BrokenStep), 3)
    with pytest.raises(ValueError, match=r"do not compose to its forward: step\(1\) differs first"):
        evaluate(calc, fcc_bulk(size=3, seed=2))


def test_step_calling_the_exchange_refused():
    with pytest.raises(RuntimeError, match="called graph.halo_exchange inside a step"):
        evaluate(one_at_a_time(like(ExchangingStep), 3), fcc_bulk(size=3, seed=2))


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun_steps():
    """mpirun -n 2, 2 parts per rank one at a time: the steps path (counted) and the generic replay
    equal the single-process result across ranks (bulk, slab, molecule; slab, grid, METIS); a
    broken step refused on every rank (tests/mpi/scripts/layer_protocol.py)."""
    proc, _ = launch("mpirun", 2, "layer_protocol.py", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert f"rank {rank}: 85 layer-protocol checks passed with 4 parts, one at a time" in out, out[-4000:]


def test_stored_state_is_predicted(monkeypatch):
    """The memory model's bytes stored by steps (``MemoryModel.stored(rows, steps=True)``, from the
    state widths measured on a probe) bound the bytes the step store really holds at its largest
    (forward: every level's state; backward: the levels below, two levels' gradients), and by
    closely: SchNet keeps one entry per level, h (exchanged: owned and halo rows, as counted)."""
    import numpy as np

    from distmlip.graph import NeighborGraph
    from distmlip.runtime import steps as steps_module
    from distmlip.runtime.memory import MemoryModel, _state_widths

    model = make_schnet(hidden_channels=32)
    atoms = fcc_bulk(size=4, seed=5)
    widths, edge_widths = _state_widths(model, NeighborGraph.from_atoms(atoms, model.cutoff),
                                        torch.float64, torch.device("cpu"))
    # (h,), float64: one row of features per level (h and x = lin_in(h) were two, twice the bytes)
    assert widths == (32 * 8,) * (model.num_layers - 1) and edge_widths == ()
    held = []

    def measure(store):
        held.append(sum(t.numel() * t.element_size() for values in (store.X, store.Z, store.G, store.Gown)
                        for t in values if isinstance(t, torch.Tensor)))

    for name in ("forward_step", "backward_step"):
        original = getattr(steps_module.StepWorker, name)

        def wrapped(self, j, *args, _original=original):
            _original(self, j, *args)
            measure(self.store)
        monkeypatch.setattr(steps_module.StepWorker, name, wrapped)
    calc = one_at_a_time(model, 4)
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    assert_close(evaluate(calc, atoms), ref, RTOL, "steps")
    memory = MemoryModel(0.0, 0.0, 0.0, 0.0, widths=(), state_widths=widths)
    predicted = memory.stored(len(atoms), steps=True)
    assert held and max(held) <= predicted
    # every entry is exchanged (h on owned and halo rows): the prediction is (nearly) exact
    assert max(held) >= 0.95 * predicted, (max(held), predicted)
    print(f"\nstored at most {max(held)} bytes, predicted {predicted:.0f}")
    assert memory.stored(len(atoms)) == 0 and np.isfinite(predicted)


# ---------------------------------------------------------------------- edge entries
class EdgeSchNet(SchNet):
    """SchNet carrying a per-edge feature between layers: the filter ``m`` of each interaction is
    an edge entry of the state, ``m_0 = W_0(r) C(r)`` and ``m_{k+1} = C(r) (W_{k+1}(r) +
    tanh(x_sender m_k))``: it depends on the sender's exchanged features, so it is part-local only
    because every edge of a part is received by an owned atom. State ``(h, x, m)``: ``x``
    exchanged, ``m`` an edge entry (rows: the part's edges)."""

    exchanged = (1,)
    edge_entries = (2,)

    def _layer(self, k, graph, h, x, m, envelope, rbf):
        send, recv = graph.edge_index
        needed = graph.num_needed
        block = self.interactions[k]
        message = x[send] * m
        summed = message.new_zeros(needed, message.shape[1]).index_add(0, recv, message)
        h = h[:needed] + block.lin(block.act(block.conv.lin_out(summed)))
        if k + 1 < self.num_layers:
            m = envelope.unsqueeze(-1) * (self.interactions[k + 1].conv.filter(rbf) + torch.tanh(message))
        return h, m

    def forward(self, graph):
        rbf, envelope = self._radial(graph)
        h, x, m = self.embed(graph)
        for k in range(self.num_layers):
            if k > 0:
                x = graph.halo_exchange(self.interactions[k].conv.lin_in(h))
            h, m = self._layer(k, graph, h, x, m, envelope, rbf)
        return self.readout(h).squeeze(-1)

    def embed(self, graph):
        rbf, envelope = self._radial(graph)
        h = self.embedding(graph.numbers)
        m = self.interactions[0].conv.filter(rbf) * envelope.unsqueeze(-1)
        return h, self.interactions[0].conv.lin_in(h), m

    def step(self, i, graph, state):
        h, x, m = state
        rbf, envelope = self._radial(graph)
        h, m = self._layer(i, graph, h, x, m, envelope, rbf)
        if i + 1 < self.num_layers:
            return h, self.interactions[i + 1].conv.lin_in(h), m
        return (h,)


CountedEdgeSchNet = counted(EdgeSchNet)


def _held(worker) -> int:
    """Bytes a step worker's store holds: the exchanged and owned-row levels and the edge entries."""
    store = worker.store
    values = [t for v in (store.X, store.Z, store.G, store.Gown) for t in v]
    values += [t for d in (worker.edge_Z, worker.edge_G) for part in d.values() for t in part.values()]
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def _watch_store(monkeypatch, held: list) -> None:
    from distmlip.runtime import steps as steps_module

    for name in ("forward_step", "backward_step"):
        original = getattr(steps_module.StepWorker, name)

        def wrapped(self, j, *args, _original=original):
            _original(self, j, *args)
            held.append(_held(self))
        monkeypatch.setattr(steps_module.StepWorker, name, wrapped)


def test_edge_entries_compose_and_equal_unbounded(own_cache):
    """A per-edge state entry: the steps compose to forward, and bounded by steps (several part
    counts and partitioners, two workers, an idle worker, periodic and not) equals unbounded within
    1e-10 (energy, forces, stress, per-atom energies), forward called only on the probe."""
    from ase import Atoms
    from ase.build import molecule

    model = like(CountedEdgeSchNet)
    assert has_steps(model)
    graph = _graph(fcc_bulk(size=2, seed=1), model)
    assert torch.equal(run_steps(model, graph), model(graph))
    report = check_steps(model, awkward_structures()["small_triclinic"])
    assert report["ok"] and report["energies"] == 0.0 and len(report["levels"]) == 2, report
    water = molecule("H2O")
    cases = [(awkward_structures()[name], configs) for name, configs in (
        ("small_triclinic", ((2, "slab", "cpu"), (3, "metis", "cpu"), (4, "grid", ["cpu", "cpu"]))),
        ("slab_vacuum", ((5, "slab", "cpu"),)), ("molecule", ((3, "metis", "cpu"),)))]
    cases.append((Atoms(water.numbers, water.positions, pbc=False), ((2, "slab", ["cpu"] * 3),)))
    first = True
    for atoms, configs in cases:
        ref = evaluate(DistributedCalculator(model, 1), atoms)
        for parts, partitioner, device in configs:
            CALLS.clear()  # the probe runs when the first calculator is built
            calc = one_at_a_time(model, parts, partitioner=partitioner, mode="halo", device=device)
            got = evaluate(calc, atoms)
            assert_close(got, ref, RTOL, f"{len(atoms)} atoms/{partitioner}/{parts}")
            assert calc.runner.sequential and CALLS["forward"] == int(first), CALLS
            assert CALLS["step"] > 0
            first = False


def test_edge_entries_refused_when_exchanged():
    class Both(EdgeSchNet):
        edge_entries = (1, 2)

    with pytest.raises(ValueError, match=r"both exchanged and edge_entries"):
        run_steps(like(Both), _graph(fcc_bulk(size=2, seed=1), like(Both)))


def test_edge_entries_are_priced_per_edge(monkeypatch, own_cache):
    """``_state_widths`` prices the edge entry per edge (16 float64 filters), ``stored`` counts it
    on the shard's edges, and under a budget the prediction of the chosen build bounds what the
    step store (edge entries included) holds at its largest."""
    from ase.neighborlist import neighbor_list

    from distmlip import estimate_memory
    from distmlip.graph import NeighborGraph
    from distmlip.runtime.memory import MemoryModel, _state_widths

    model = like(CountedEdgeSchNet, hidden_channels=32)
    atoms = fcc_bulk(size=4, seed=5)
    widths, edge_widths = _state_widths(model, NeighborGraph.from_atoms(atoms, model.cutoff),
                                        torch.float64, torch.device("cpu"))
    assert widths == (2 * 32 * 8,) * 2 and edge_widths == (32 * 8,) * 2
    held: list[int] = []
    _watch_store(monkeypatch, held)
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    assert_close(evaluate(one_at_a_time(model, 4), atoms), ref, RTOL, "steps")
    edges = len(neighbor_list("i", atoms, model.cutoff))
    memory = MemoryModel(0.0, 0.0, 0.0, 0.0, widths=(), state_widths=widths, edge_state_widths=edge_widths)
    predicted = memory.stored(len(atoms), steps=True, edges=edges)
    assert max(held) <= predicted and max(held) >= 0.95 * predicted, (max(held), predicted)
    assert memory.stored(len(atoms), steps=True) < 0.5 * max(held)  # the edges dominate here
    # under a budget: the planner's prediction for the build it chose bounds the store
    held.clear()
    calc = DistributedCalculator(model, 1, max_memory=int(0.4 * estimate_memory(model, atoms)))
    assert_close(evaluate(calc, atoms), ref, RTOL, "budget")
    assert calc.runner.sequential and calc.last_plan.num_parts > 1
    planner = calc.runner.planner
    assert planner.memory_model.edge_state_widths == edge_widths
    calls = []
    original = MemoryModel.stored

    def recording(self, rows, steps=False, edges=0):
        calls.append(original(self, rows, steps, edges))
        return calls[-1]

    monkeypatch.setattr(MemoryModel, "stored", recording)
    planner.predict(calc.runner._built, planner.memory_model)
    assert calls and max(held) <= sum(calls), (max(held), calls)
    assert max(held) >= 0.9 * sum(calls), (max(held), calls)
