"""Shared fixtures: the awkward structures and small float64 reference models (the helpers behind
them are in ``support``)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# memory calibrations are cached on disk: one fresh directory per session (inherited by the
# processes the tests start), so that no test reads another run's calibration or the user's cache
os.environ.setdefault("DISTMLIP_CACHE_DIR", tempfile.mkdtemp(prefix="distmlip-test-cache-"))

import pytest
import torch

from distmlip.models import LennardJones, SchNet
from distmlip.testing import awkward_structures

from support import STRUCTURE_NAMES, make_lj, make_schnet

torch.set_num_threads(1)


# ---------------------------------------------------------------- the default (fast) selection
# `make test` runs every test not marked slow; `make test-all` runs everything. Besides the
# `@pytest.mark.slow` in the files, these long or repetitive cases are marked slow here (measured
# durations on 2 cores in the comments; every module and every adapter keeps fast tests).
# Test function (path under tests/) -> the parameter ids that stay in the default suite: () marks
# every case slow; a grid keeps one or two representative cases and runs in full under test-all.
SLOW = {
    # SevenNet-0 (pretrained, ~200 s in all): one calculator comparison, one float64 split
    "adapters/test_sevenn.py::test_float64_matches_sevennet": ("cu111_slab",),
    # the slab (20 s) in make test; rutile TiO2 (54 s) and Cu fcc (31 s) in test-all
    "adapters/test_sevenn.py::TestSevenNetBattery::test_battery_matches_calculator_and_split": (),
    "adapters/test_sevenn.py::test_awkward_structures": ("small_triclinic",),
    "adapters/test_sevenn.py::test_node_work_only_on_owned_rows": (),  # 59 s
    "adapters/test_sevenn.py::test_partitioners_float64": (),  # 12 s
    "adapters/test_sevenn.py::test_multi_fidelity_modal": (),  # 10 s
    "adapters/test_sevenn.py::test_l3i5_matches": (),  # 9 s
    "adapters/test_sevenn.py::test_wrap_raw_module_unmodified": (),  # 5 s
    "adapters/test_sevenn.py::test_steps_compose_to_forward": ("small",),  # sevennet-0: 4-5 s
    "adapters/test_sevenn.py::test_max_memory_budget_takes_the_steps": (),  # 13-30 s (calibration)
    "adapters/test_sevenn.py::test_multi_fidelity_steps": (),  # 6 s
    # MACE (~105 s)
    "adapters/test_mace.py::TestMACEBattery::test_battery_matches_calculator_and_split": (),
    "adapters/test_mace.py::test_node_work_only_on_owned_rows": (),  # 25 s
    "adapters/test_mace.py::test_threaded_workers": (),  # 4 s
    "adapters/test_mace.py::test_interaction_classes_are_sliced_exactly": (
        "RealAgnosticInteractionBlock-RealAgnosticResidualInteractionBlock",),
    "adapters/test_mace.py::test_max_memory_budget_takes_the_steps": (),  # 40 s (calibration)
    # session 11, make test at 4:37-5:12: the checks below are covered in make test by a cheaper one
    "adapters/test_mace.py::TestMACEBattery::test_battery_finite_difference_forces": (),  # 15-20 s
    "adapters/test_mace.py::test_steps_with_empty_parts_and_two_workers": (),  # 8 s
    "adapters/test_mace.py::test_other_forward_keeps_the_generic_path": (),  # 6 s
    "adapters/test_sevenn.py::test_exchange_is_needed": (),  # 9 s (test_wrap's example: the same)
    "adapters/test_wrap.py::test_custom_model_example_fails_without_the_exchange": (),  # 7 s
    "adapters/test_matgl.py::test_warp_built_model_is_rebuilt_without_warp": (),  # 7 s
    "cli/test_md_robust.py::test_nothing_to_do_writes_nothing": (),  # 7 s (a subprocess)
    "engine/test_device_errors.py::test_out_of_memory_under_a_budget_names_the_budget": (),
    # session 11 again: this machine ran make test in 7 min 28 s (its tests ~1.5x slower than the
    # last session's); each file keeps cheaper fast tests
    "engine/test_calibration_cache.py::test_a_fresh_process_reads_the_cache": (),  # 14-25 s
    "cli/test_cli.py::test_demo_at_reduced_size": (),  # 15-21 s (make demo runs the full one)
    "adapters/test_wrap.py::test_custom_model_example_passes_its_checks": (),  # 11-15 s
    "engine/test_md.py::test_graph_reuse_equals_fresh_build_every_step": (),  # 8 s
    "adapters/test_matgl.py::test_m3gnet_saves_and_loads": ("False",),  # 5 s each
    "unit/test_graph_chunks.py::test_chunked_build_peaks_near_the_compact_graph": (),  # a process
    "engine/test_bounded_memory.py::test_parts_one_at_a_time_stay_small_on_cpu": (),  # 7-12 s
    "unit/test_bad_input.py::test_budget_below_one_neighbourhood": (),  # 6 s (calibration)
    "adapters/test_fairchem.py::test_node_work_only_on_owned_rows": (),  # 4 s
    "adapters/test_fairchem.py::test_split_equals_whole": ("oxide",),
    "adapters/test_chgnet.py::test_steps_compose_to_forward": ("metal",),  # oxide 7 s
    "engine/test_visible.py::test_last_run_reports_the_parts_used": (),  # 13 s (module setup: a
    "engine/test_visible.py::test_last_run_without_a_budget_and_on_two_devices": (),  # budgeted
    "engine/test_visible.py::test_cli_run_reports_the_parts_used": (),  # calibration)
    "engine/test_md.py::test_deformed_cell_reuses_the_graph_exactly": (),  # 4.5 s
    "adapters/test_sevenn.py::test_bounded_steps_equal_unbounded": (),  # small: 4.4 s
    "adapters/test_mace.py::test_steps_of_every_variant": (),  # residual: 6 s
    "adapters/test_nequip.py::test_float32_model_keeps_nequip_mixed_precision": (),  # 3.6 s
    "cli/test_md_robust.py::test_serve_says_where_it_connects_at_once": (),  # 4.7 s
    "mpi/test_mpi.py::test_exchange_buffers_are_reused_between_steps": (),  # a torchrun launch
    # CHGNet (~80 s)
    "adapters/test_chgnet.py::TestCHGNetBattery::test_battery_matches_calculator_and_split": (),
    "adapters/test_chgnet.py::test_float32_as_accurate_as_chgnet": ("slab",),
    "adapters/test_chgnet.py::test_atom_updates_only_on_owned_rows": (),  # 23 s
    "adapters/test_chgnet.py::test_other_partitioners": (),  # 7 s
    "adapters/test_chgnet.py::test_other_checkpoints": (),  # 7 s
    "adapters/test_chgnet.py::test_bounded_steps_equal_unbounded": ("slab",),  # oxide: 6.5 s
    # NequIP / Allegro (~35 s)
    "adapters/test_nequip.py::TestNequIPBattery::test_battery_matches_calculator_and_split": (
        "allegro-oxide",),
    "adapters/test_nequip.py::test_nequip_node_work_only_on_owned_rows": (),  # 8 s
    # matgl TensorNet: the budget search (calibration, several builds); the chosen-parts case stays
    "adapters/test_matgl.py::test_tensornet_budget_takes_the_steps": (),  # 5.5 s
    "adapters/test_matgl.py::test_m3gnet_bounded_steps_equal_unbounded": ("slab",),  # oxide: 4.3 s loaded
    # MatterSim: the steps in bounded memory (3 part counts, 1 and 2 workers); the slab stays
    "adapters/test_mattersim.py::test_bounded_steps_equal_unbounded": ("slab",),  # oxide: 2-5.5 s
    # bounded memory: the adapters' own files cover the pretrained ones
    "engine/test_bounded_memory.py::test_budget_is_honoured_in_a_fresh_process": (),  # 22 s
    "engine/test_bounded_memory.py::test_budget_chooses_the_number_of_parts": (),  # 16 s (calibration)
    "engine/test_bounded_memory.py::test_every_adapter_is_exact_one_part_at_a_time": (
        "nequip", "tensornet"),  # sevenn, chgnet, mace: 28 s
    # MD robustness (a subprocess each, 6-15 s): one case of each kind stays in the default suite
    "cli/test_md_robust.py::test_signal_checkpoints_and_says_how_to_continue": (),  # 9 s each
    "cli/test_md_robust.py::test_relax_optimizer_pressure_trajectory": (),
    "cli/test_md_robust.py::test_starting_temperature_is_exact": (),
    "cli/test_md_robust.py::test_run_every_frame_writes_extxyz": (),
    "cli/test_md_robust.py::test_reader_warnings_folded_into_the_error_line": (),
    "cli/test_md_robust.py::test_max_temperature_flag": (),
    "cli/test_md_robust.py::test_bad_max_time_is_refused": (),
    "cli/test_md_robust.py::test_relax_output_format_checked_before_work": (),
    "cli/test_md_robust.py::test_blow_up_stops_the_run": (),
    "cli/test_md_robust.py::test_schnet_saves_and_loads_as_model_file": (),
    "cli/test_md_robust.py::test_sigterm_under_mpirun_stops_every_rank_at_one_step": (),
    "cli/test_md_robust.py::test_max_time_stops_before_the_limit": (),
    "cli/test_md_robust.py::test_refusals_name_the_flag_and_the_fix": ("args0-expected0",),
    "cli/test_md_robust.py::test_partition_plot_path_checked_first": ("parts.xyz-expected1",),
    "cli/test_md_robust.py::test_max_memory_fraction_and_unit_accepted": (),
    "cli/test_md_robust.py::test_restart_without_plot_redraws_stale_plots": (),
    "cli/test_md_robust.py::test_relax_write_failure_saves_the_result": (),
    "cli/test_md_robust.py::test_serve_progress_is_a_sign_of_life": (),
    # calibration cache (fresh processes, 7-24 s): a fresh process reading the cache stays
    "engine/test_calibration_cache.py::test_a_corrupted_file_is_warned_about_once_and_rewritten": (
        "{not json",),
    "engine/test_calibration_cache.py::test_a_foreign_file_is_not_trusted": (),
    "engine/test_calibration_cache.py::test_an_unwritable_cache_is_silent": (),
    "engine/test_calibration_cache.py::test_two_ranks_calibrating_at_once": (),
    "engine/test_calibration_cache.py::test_concurrent_writers_leave_a_valid_file": (),
    "engine/test_calibration_cache.py::test_a_changed_weight_misses_the_cache": (),
    "engine/test_calibration_cache.py::test_cached_calibration_of_a_million_parameter_model_is_fast": (),
    "engine/test_calibration_cache.py::test_a_cached_calibration_adds_little_to_a_call": (),
    # the layer protocol: three structures of five, the budgeted run under test-all
    "engine/test_layer_protocol.py::test_bounded_steps_equal_unbounded": (
        "fcc_bulk", "molecule", "multi_element_isolated"),
    "engine/test_layer_protocol.py::test_max_memory_budget_takes_the_steps": (),  # 11 s
    "engine/test_layer_protocol.py::test_edge_entries_are_priced_per_edge": (),  # 12 s (budget)
    # launches (run one after another: ~185 s in tests/mpi alone)
    "mpi/test_mpi.py::test_equivalence_under_launcher": ("mpirun-2", "torchrun-2"),
    "mpi/test_mpi.py::test_failing_rank_stops_everyone": ("mpirun-model",),
    "mpi/test_mpi.py::test_world_size_mismatch_is_an_error": (),
    "mpi/test_mpi.py::test_independent_exchanges_stay_ordered_across_ranks": (),
    "cli/test_serve.py::test_serve_under_mpirun": (),
    "mpi/test_mpi.py::test_several_parts_per_rank": (),  # 27 s
    "mpi/test_mpi.py::test_bounded_memory_under_launcher": (),  # 18 s
    "mpi/test_mpi.py::test_md_matches_single_process": (),  # 18 s
    "mpi/test_mpi.py::test_srun_environment": (),  # 16 s (tests/mpi/test_launch.py: the detection)
    "cli/test_cli.py::test_md_under_a_launcher_matches_one_process": (),
    "cli/test_cli.py::test_an_error_on_one_rank_is_reported_by_that_rank": (),  # 7 s
    "engine/test_longrun.py::test_bit_identical_under_mpirun": (),  # 6 s
    # LAMMPS's pair_style distmlip (an lmp launch each, 1-12 s; make test is near its 5 minutes):
    # the default suite keeps SchNet on 2 ranks, LJ where ghosts wrap on 3, the global readout,
    # the in-process run and three refusals (~12 s); test-all runs the 50 cases (~4 min)
    "lammps/test_pair_style.py::test_lj_matches_distmlip": ("small_triclinic-3",),
    "lammps/test_pair_style.py::test_schnet_file_matches_distmlip": ("triclinic-2",),  # 5-8 s each
    "lammps/test_pair_style.py::test_global_readout_matches_distmlip": (),
    "lammps/test_pair_style.py::test_lj_matches_ase": (),
    "lammps/test_pair_style.py::test_newton_off": (),  # schnet: 6-7 s
    "lammps/test_pair_style.py::test_float32": (),  # 7 s
    "lammps/test_pair_style.py::test_nve_one_and_two_ranks_agree": (),  # 12 s
    "lammps/test_pair_style.py::test_npt_pressure_is_distmlips_stress": (),  # 8 s
    "lammps/test_pair_style.py::test_a_model_failing_on_one_rank_stops_every_rank": (),  # 5-6 s
    "lammps/test_pair_style.py::test_bad_input_is_one_error_line": ("unknown_model",),
}


def _key(nodeid: str) -> tuple[str, str]:
    """("path/test_x.py::test_function", "param-id") of a node id."""
    path, _, name = nodeid.removeprefix("tests/").partition("::")
    function, _, param = name.partition("[")
    return f"{path}::{function}", param.removesuffix("]")


def pytest_collection_modifyitems(config, items):
    """Marks the table's cases slow. Launches (``mpi`` mark) share one xdist group: under
    ``pytest -n N --dist loadgroup`` they run one after another in one worker (two launches at
    once would compete for the rendezvous port and the cores their timeouts assume); ``make test``
    and ``make test-all`` run them in a serial pytest of their own after the parallel one."""
    seen = set()
    for item in items:
        key, param = _key(item.nodeid)
        if key in SLOW:
            seen.update((key, (key, param)))
            if param not in SLOW[key]:
                item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("mpi") is not None:
            item.add_marker(pytest.mark.xdist_group("mpi"))
    # a renamed test or parameter must not silently leave the table (checked when the whole suite
    # is collected, for the files that were: a file skipped for a missing package has no items)
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        files = {item.nodeid.removeprefix("tests/").partition("::")[0] for item in items}
        stale = [f"{key}[{param}]" if param else key
                 for key, keep in SLOW.items() if key.partition("::")[0] in files
                 for param in (keep or ("",))
                 if key not in seen or (param and (key, param) not in seen)]
        if stale:
            raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")


@pytest.fixture(scope="session")
def lj_model() -> LennardJones:
    return make_lj()


@pytest.fixture(scope="session")
def schnet_model() -> SchNet:
    return make_schnet()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache directory of this test's own (``DISTMLIP_CACHE_DIR``): no calibration and no passed
    check (the layer protocol's probe) recorded by another test."""
    monkeypatch.setenv("DISTMLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def structures():
    """Fresh copies of every awkward structure (tests may modify them)."""
    return awkward_structures()


@pytest.fixture(params=STRUCTURE_NAMES)
def structure(request):
    """(name, atoms) for each awkward structure."""
    return request.param, awkward_structures()[request.param]
