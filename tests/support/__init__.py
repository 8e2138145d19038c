"""Helpers shared by the tests and the scripts they launch (``import support``).

Importable because ``tests/`` is on ``sys.path``: pytest's ``pythonpath = ["tests"]`` (pyproject)
for the test modules, and ``PYTHONPATH`` (set by ``launch``) for the scripts under
``tests/mpi/scripts``. Test modules import from here, never from one another; fixtures stay in the
``conftest.py`` files.

- ``LJ_PARAMS``, ``make_lj``, ``make_schnet``: the small float64 reference models;
  ``FailsWithAtom5``: Lennard-Jones failing on the worker that owns atom 5;
- ``STRUCTURE_NAMES``: the names of ``distmlip.testing.awkward_structures()``;
- ``salt``, ``slab``: NaCl bulk and a Cu(111) slab (the global-sum tests' structures);
- ``one_at_a_time``: a calculator evaluating its parts one at a time (the bounded-memory path);
- ``assert_close``: every quantity of a result within a relative tolerance of a reference;
- ``launch``, ``launcher_env``, ``assert_ranks_pass``: a script under mpirun/torchrun with a timeout;
- ``support.adapters``: small randomly initialised models of the optional packages, the
  structures they are checked on, and the checks the adapter tests share;
- ``support.splits``: the split-vs-whole check the launched scripts run on every rank.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from distmlip import DistributedCalculator
from distmlip.models import LennardJones, SchNet
from distmlip.testing import awkward_structures, rel_err

TESTS = Path(__file__).resolve().parents[1]  # the tests directory (on sys.path)
ROOT = TESTS.parent
SCRIPTS = TESTS / "mpi" / "scripts"
BIN = Path(sys.executable).parent

STRUCTURE_NAMES = tuple(awkward_structures())

# Lennard-Jones roughly fitted to Cu: minimum at 2^(1/6) * 2.3 = 2.58 Å (Cu-Cu: 2.55 Å).
LJ_PARAMS = {"epsilon": 0.4, "sigma": 2.3, "cutoff": 5.0}
#: the same model as the command line's ``--model`` spelling
LJ_SPEC = "lj:" + ",".join(f"{k}={v}" for k, v in LJ_PARAMS.items())


def make_lj() -> LennardJones:
    return LennardJones(**LJ_PARAMS)


class FailsWithAtom5(LennardJones):
    """Lennard-Jones that raises on the worker owning atom 5 only (a failure on one rank)."""

    def forward(self, graph):
        if bool((graph.atom_ids[: graph.num_owned] == 5).any()):
            raise RuntimeError("test model: atom 5 is owned here")
        return super().forward(graph)

#: ``forward`` and ``step`` calls of every counted model (shared by the runner's replicas).
CALLS: collections.Counter = collections.Counter()


class Counting:
    """Mixin counting a model's ``forward`` and ``step`` calls in ``CALLS`` (which path the
    runtime took in bounded memory: the steps, the probe's forward, or the generic replay)."""

    def forward(self, graph):
        CALLS["forward"] += 1
        return super().forward(graph)

    def step(self, i, graph, state):
        CALLS["step"] += 1
        return super().step(i, graph, state)


def counted(cls: type) -> type:
    """``cls`` (a model or adapter class) counting its calls in ``CALLS``."""
    return type(f"Counted{cls.__name__}", (Counting, cls), {"__doc__": Counting.__doc__})


CountedSchNet = counted(SchNet)


def make_schnet(cutoff: float = 5.0, num_interactions: int = 3, hidden_channels: int = 16,
                seed: int = 1, scale: float = 30.0) -> SchNet:
    """A small float64 SchNet with random weights. Its last readout layer is multiplied by
    ``scale`` (and its bias zeroed) so that forces are 0.1-1 eV/Å rather than ~0.005 eV/Å: the
    relative error max|a-b| / max(max|ref|, 1) then measures the forces at their own scale."""
    model = SchNet(cutoff=cutoff, num_interactions=num_interactions,
                   hidden_channels=hidden_channels, num_gaussians=25, seed=seed)
    with torch.no_grad():
        model.readout[-1].weight.mul_(scale)
        model.readout[-1].bias.zero_()
    return model


def salt():
    """NaCl rock salt, 2x2x2 conventional cells (64 atoms), rattled."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.08, seed=2)
    return atoms


def slab():
    """Cu(111), 3x3x3, 6 Å of vacuum each side, periodic in x, y only, rattled."""
    from ase.build import fcc111

    atoms = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    atoms.pbc = [True, True, False]
    atoms.rattle(0.05, seed=3)
    return atoms


def one_at_a_time(model, parts, **options) -> DistributedCalculator:
    """A calculator whose runner evaluates each worker's ``parts`` one at a time whatever the
    memory (the path a tight ``max_memory`` takes, here with a chosen number of parts)."""
    from distmlip.runtime import Runner

    calc = DistributedCalculator(model, parts, **options)
    calc.runner = Runner(model, calc.devices, calc.dtype, calc.partitioner, calc.mode, parts,
                         calc.skin, sequential=True)
    return calc


def assert_bounded_by_steps(model, atoms, configs=((3, "metis"), (4, "grid")), rtol: float = 1e-10) -> None:
    """Parts one at a time (the bounded-memory path, halo mode), for each ``(parts, partitioner)``
    of ``configs``: through the steps (``model`` is ``counted``: steps called, ``forward`` never:
    the steps' probe ran when the calculator was built), equal to one part unbounded within
    ``rtol``."""
    from distmlip.runtime.steps import uses_steps
    from distmlip.testing import evaluate

    ref = evaluate(DistributedCalculator(model, 1), atoms)
    for parts, partitioner in configs:
        calc = one_at_a_time(model, parts, partitioner=partitioner, mode="halo")
        CALLS.clear()
        assert_close(evaluate(calc, atoms), ref, rtol, f"{partitioner}/{parts}")
        assert calc.runner.sequential and uses_steps(calc.runner)
        assert calc.last_plan.num_parts == parts and CALLS["step"] > 0
        assert CALLS["forward"] == 0, CALLS  # no replay


def assert_steps_counted(model, atoms, ref: dict, rtol: float = 1e-10, **options) -> None:
    """Parts one at a time in halo mode (3 metis, 4 grid, 5 parts on two workers; ``options`` to
    the calculator) go by the steps of ``model`` (``counted``: forward only on the runtime's
    probe, run when the calculator is built; 2 L - 1 steps per part and call) and equal ``ref``
    (every quantity) within ``rtol``."""
    from distmlip.runtime.steps import uses_steps
    from distmlip.testing import evaluate

    layers = model.num_steps
    for parts, partitioner, device in ((3, "metis", "cpu"), (4, "grid", "cpu"), (5, None, ["cpu", "cpu"])):
        chosen = {} if partitioner is None else {"partitioner": partitioner}
        CALLS.clear()
        calc = one_at_a_time(model, parts, mode="halo", device=device, **chosen, **options)
        probe = CALLS["forward"]
        assert probe <= 1, CALLS
        got = evaluate(calc, atoms)
        assert calc.runner.sequential and uses_steps(calc.runner)
        assert calc.last_plan.num_parts == parts
        assert CALLS["forward"] == probe, CALLS  # no forward outside the probe
        pieces = sum(max(len(s.parts), 1) for s in calc.runner._built.shards)
        assert CALLS["step"] == (2 * layers - 1) * pieces + layers * probe, CALLS
        assert_close(got, ref, rtol, f"{parts} parts")


def assert_close(got: dict, ref: dict, rtol: float, what: str) -> float:
    """Every quantity of ``ref`` in ``got`` within ``rtol`` (``distmlip.testing.rel_err``);
    returns the largest relative error."""
    worst = 0.0
    for key in ref:
        err = rel_err(got[key], ref[key])
        assert err <= rtol, f"{what}: {key} differs by {err:.2e}"
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------- launched processes
def launcher_env(**extra) -> dict:
    """The environment for a launched process: no variables of an enclosing launch, one thread,
    and ``tests/`` on ``PYTHONPATH`` (the scripts import ``support``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "TORCHELASTIC", "MASTER_", "LOCAL_RANK"))
           and k not in ("RANK", "WORLD_SIZE")}
    path = [str(TESTS), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(path),
               **extra)
    return env


def launch(kind, n, script, *args, timeout=240, **env):
    """Run ``tests/mpi/scripts/<script> *args`` under ``kind`` (``"mpirun"`` or ``"torchrun"``)
    with ``n`` processes; a launch that does not end within ``timeout`` seconds fails the test
    (``subprocess.TimeoutExpired``) rather than hanging the suite. Returns (process, seconds)."""
    if kind == "mpirun":
        cmd = [str(BIN / "mpirun"), "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(n), str(SCRIPTS / script), *args]
    assert Path(cmd[0]).exists(), f"{cmd[0]} is missing: install the project with `make install`"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=launcher_env(**env))
    return proc, time.perf_counter() - t0


def assert_ranks_pass(script: str, *args: str, expect: str, ranks: int = 2) -> None:
    """Run ``tests/mpi/scripts/<script> *args`` under ``mpirun -n ranks`` and check that it
    exited 0 and that every rank printed ``rank R: <expect>`` (its count of passed checks); the
    output's tail is the failure message."""
    proc, _ = launch("mpirun", ranks, script, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(ranks):
        assert f"rank {rank}: {expect}" in out, out[-4000:]
