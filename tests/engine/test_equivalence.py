"""Partitioned == unpartitioned, for every partitioner x part count x mode, on every awkward
structure; Lennard-Jones == ASE's; the conformance kit catches a model that skips the exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmlip import DistributedCalculator
from distmlip.models import SchNet
from distmlip.testing import (
    assert_partition_invariant,
    awkward_structures,
    evaluate,
    format_report,
    rel_err,
)

from support import LJ_PARAMS, STRUCTURE_NAMES

ALL_PARTS = (1, 2, 3, 7, 16)


def _check_report(report, model):
    """What the report says about how the work was split (beyond the errors already asserted)."""
    for row in report:
        p = row["num_parts"]
        assert row["max_err"] <= 1e-10
        if row["mode"] == "halo":
            assert row["redundancy"] == 1.0, row
            if isinstance(model, SchNet):  # one exchange before every interaction but the first
                assert row["exchange_calls"] == model.num_layers - 1, row
        else:
            assert row["exchange_calls"] == 0, row
            if model.num_layers == 1:  # one hop deep: extended is the one-hop halo, no exchange
                assert row["redundancy"] == 1.0, row
            elif row["nonempty_parts"] > 1:
                assert row["redundancy"] > 1.0, row
        assert row["nonempty_parts"] <= p


def _invariant_on(model, label, name):
    """``model`` split every way (``ALL_PARTS``, each partitioner, both modes) on the awkward
    structure ``name``, at 1e-10 of the unsplit result; returns (atoms, report)."""
    atoms = awkward_structures()[name]
    report = assert_partition_invariant(model, atoms, num_parts=ALL_PARTS, rtol=1e-10)
    print(f"\n{label} on {name} ({len(atoms)} atoms)\n{format_report(report)}")
    assert len(report) == 3 * len(ALL_PARTS) * 2
    _check_report(report, model)
    return atoms, report


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_lennard_jones_partition_invariant(lj_model, name):
    _invariant_on(lj_model, "LennardJones", name)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_schnet_partition_invariant(schnet_model, name):
    atoms, report = _invariant_on(schnet_model, "SchNet", name)
    # more parts than atoms really happened for the small systems
    if len(atoms) < 16:
        assert any(r["nonempty_parts"] < r["num_parts"] for r in report)


@pytest.mark.parametrize("name", ["fcc_bulk", "small_triclinic", "slab_vacuum", "molecule",
                                  "multi_element_isolated"])
def test_schnet_threaded_workers(schnet_model, name):
    """Two worker threads (device=["cpu", "cpu"]): parts run concurrently and meet at each halo
    exchange."""
    atoms = awkward_structures()[name]
    report = assert_partition_invariant(schnet_model, atoms, num_parts=(2, 3, 7),
                                        partitioners=("grid", "metis"), device=["cpu", "cpu"])
    _check_report(report, schnet_model)


def test_schnet_float32(schnet_model):
    for name in ("fcc_bulk", "slab_vacuum", "molecule"):
        atoms = awkward_structures()[name]
        report = assert_partition_invariant(schnet_model, atoms, num_parts=(2, 3, 7),
                                            partitioners=("grid", "slab"), dtype="float32", rtol=1e-5)
        print(f"\nSchNet float32 on {name}\n{format_report(report)}")
    # float32 really ran in float32: it differs from float64 by more than float64 noise
    f64 = evaluate(DistributedCalculator(schnet_model, 3), atoms)
    f32 = evaluate(DistributedCalculator(schnet_model, 3, dtype="float32"), atoms)
    err = rel_err(f32["forces"], f64["forces"])
    assert 1e-12 < err < 1e-4, err


def _ase_lj(atoms):
    from ase.calculators.lj import LennardJones as AseLJ

    calc = AseLJ(epsilon=LJ_PARAMS["epsilon"], sigma=LJ_PARAMS["sigma"], rc=LJ_PARAMS["cutoff"],
                 smooth=False)
    return evaluate(calc, atoms)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
@pytest.mark.parametrize("parts,partitioner,mode", [(1, "grid", "halo"), (3, "grid", "halo"),
                                                    (7, "metis", "extended"), (16, "slab", "halo")])
def test_lennard_jones_equals_ase(lj_model, name, parts, partitioner, mode):
    atoms = awkward_structures()[name]
    ref = _ase_lj(atoms)
    got = evaluate(DistributedCalculator(lj_model, parts, partitioner=partitioner, mode=mode), atoms)
    assert set(got) == ({"energy", "forces", "energies", "stress"} if atoms.cell.rank == 3
                        else {"energy", "forces", "energies"})
    for q in got:
        err = rel_err(got[q], ref[q])
        assert err <= 1e-8, f"{name}: {q} differs from ase.calculators.lj by {err:.2e}"
    # non-trivial: forces and energies are not all zero
    assert np.abs(ref["forces"]).max() > 0.1


def test_lennard_jones_isolated_atom_has_zero_energy(lj_model):
    atoms = awkward_structures()["multi_element_isolated"]
    got = evaluate(DistributedCalculator(lj_model, 7, partitioner="metis"), atoms)
    assert got["energies"][-1] == 0.0
    np.testing.assert_array_equal(got["forces"][-1], 0.0)
    assert np.all(got["energies"][:-1] != 0.0)


class _NoExchangeSchNet(SchNet):
    """A broken model: never refreshes the halo between layers."""

    def forward(self, graph):
        import dataclasses

        from distmlip.models.base import no_exchange

        # no exchange: every row must then be computed (nothing refreshes the halo)
        return super().forward(dataclasses.replace(graph, halo_exchange=no_exchange,
                                                   num_needed=graph.num_nodes))


def test_kit_catches_a_model_that_skips_the_exchange(schnet_model):
    broken = _NoExchangeSchNet(cutoff=5.0, num_interactions=3, hidden_channels=16, num_gaussians=25,
                               seed=1)
    broken.load_state_dict(schnet_model.state_dict())
    atoms = awkward_structures()["fcc_bulk"]
    # unsplit and extended mode are still exact (nothing to exchange)...
    assert_partition_invariant(broken, atoms, num_parts=(1, 3), modes=("extended",),
                               partitioners=("grid",))
    # ...but halo mode is not, and the kit says where
    with pytest.raises(AssertionError, match=r"partitioner='grid', num_parts=3, mode='halo'"):
        assert_partition_invariant(broken, atoms, num_parts=(3,), modes=("halo",),
                                   partitioners=("grid",))


def test_kit_catches_a_model_reading_positions_outside_edge_vec():
    """Energy depending on which atoms are local (here: on the number of local atoms) breaks
    partition invariance of per-atom energies."""
    from distmlip.models import LennardJones

    class Leaky(LennardJones):
        def forward(self, graph):
            return super().forward(graph) + 1e-3 * graph.num_nodes

    with pytest.raises(AssertionError, match=r"energ"):
        assert_partition_invariant(Leaky(**LJ_PARAMS), awkward_structures()["slab_vacuum"],
                                   num_parts=(2,), partitioners=("slab",), modes=("halo",))


def test_rel_err_definition():
    assert rel_err([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_err([0.0, 1e-3], [0.0, 0.0]) == 1e-3  # floor of 1 in the denominator
    assert rel_err([10.0, 0.0], [11.0, 0.0]) == pytest.approx(1 / 11)
    assert rel_err(np.nan, 1.0) != rel_err(np.nan, 1.0)  # NaN propagates
    with pytest.raises(AssertionError, match="shape"):
        rel_err(np.zeros(3), np.zeros(4))
    assert torch.get_num_threads() >= 1
