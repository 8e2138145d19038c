"""What a bounded-memory evaluation did is visible: ``calc.last_run`` (parts used, how many at
once, one at a time, the predicted peak, the budget), ``calc.num_parts``, and ``distmlip run``'s
line and ``--json``."""

from __future__ import annotations

import dataclasses
import json

import ase.io
import pytest

from distmlip import DistributedCalculator, estimate_memory, minimum_memory
from distmlip.cli import main
from distmlip.runtime import RunInfo
from distmlip.testing import evaluate
from distmlip.testing.structures import fcc_bulk

from support import make_lj, make_schnet


@pytest.fixture(scope="module")
def split():
    """A system, a model and a budget that splits it on one device or two: halfway between the
    smallest budget that works on two devices (``minimum_memory``) and the unbounded need."""
    model = make_schnet()
    atoms = fcc_bulk(size=6, seed=3)  # 864 atoms
    need = estimate_memory(model, atoms)
    floor = minimum_memory(model, atoms, device=["cpu", "cpu"])
    assert floor < need
    return model, atoms, int(floor + 0.5 * (need - floor))


def test_last_run_reports_the_parts_used(split):
    model, atoms, budget = split
    calc = DistributedCalculator(model, max_memory=budget)
    assert calc.last_run is None and calc.num_parts == 1  # before: as asked
    evaluate(calc, atoms)
    run = calc.last_run
    assert isinstance(run, RunInfo)
    assert run.num_parts == calc.last_plan.num_parts > 1 and calc.num_parts == run.num_parts
    assert run.sequential and run.parts_at_once == 1
    assert run.budget_bytes == budget and 0 < run.predicted_peak_bytes <= budget
    assert run.predicted_peak_bytes == calc.runner.predicted_peak
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.num_parts = 1
    text = run.describe()
    assert text.startswith(f"{run.num_parts} parts, one at a time, predicted peak ") and "budget" in text
    assert json.loads(json.dumps(run.todict())) == dataclasses.asdict(run)


def test_last_run_without_a_budget_and_on_two_devices(split):
    model, atoms, budget = split
    calc = DistributedCalculator(model, 3)
    evaluate(calc, atoms)
    assert calc.last_run == RunInfo(3, 3, False, None, None)
    assert calc.last_run.describe() == "3 parts, all at once"
    two = DistributedCalculator(model, device=["cpu", "cpu"], max_memory=budget)
    evaluate(two, atoms)
    run = two.last_run
    assert run.sequential and run.parts_at_once == 2 and run.num_parts >= 2
    assert "2 at a time (one per worker)" in run.describe()
    roomy = DistributedCalculator(make_lj(), 2, max_memory="10GB")
    evaluate(roomy, atoms)
    assert not roomy.last_run.sequential and roomy.last_run.parts_at_once == 2
    assert roomy.last_run.predicted_peak_bytes <= 10e9


def test_cli_run_reports_the_parts_used(tmp_path, capsys):
    atoms = fcc_bulk(size=4, seed=3)  # 256 atoms
    path = tmp_path / "cu.xyz"
    ase.io.write(path, atoms)
    # the CLI's schnet is not the tests' one: its own estimate gives the splitting budget
    assert main(["run", str(path), "--model", "schnet", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["num_parts"] == 1 and whole["sequential"] is False
    assert whole["predicted_peak_bytes"] is None and whole["budget_bytes"] is None
    assert main(["run", str(path), "--model", "schnet", "--max-memory", "30MB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_parts"] > 1 and result["sequential"] is True and result["parts_at_once"] == 1
    assert result["budget_bytes"] == 30_000_000 and 0 < result["predicted_peak_bytes"] <= 30e6
    assert result["energy_eV"] == pytest.approx(whole["energy_eV"], rel=1e-10)
    assert main(["run", str(path), "--model", "schnet", "--max-memory", "30MB", "--show", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f": {result['num_parts']} parts, one at a time, predicted peak " in first, first
    assert first.endswith("of a 30 MB budget"), first
