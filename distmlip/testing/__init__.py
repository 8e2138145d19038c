"""A conformance kit for model authors: awkward test systems and checks that a
``DistributableModel`` gives the same results however the system is split.

Example::

    from distmlip.testing import awkward_structures, assert_partition_invariant, format_report

    for name, atoms in awkward_structures().items():
        report = assert_partition_invariant(my_model, atoms)
        print(name, format_report(report), sep="\\n")

Every check raises ``AssertionError`` with a message naming what failed; nothing here needs pytest.
"""

from .adapters import ADAPTER_ELEMENTS, adapter_structures, assert_matches_calculator
from .battery import AdapterBattery
from .checks import (
    assert_partition_invariant,
    check_forces_finite_difference,
    check_steps,
    check_stress_finite_difference,
    count_work,
    evaluate,
    format_report,
    rel_err,
)
from .structures import (
    ISOLATED_CUTOFF,
    awkward_structures,
    fcc_bulk,
    molecule,
    multi_element_isolated,
    slab_vacuum,
    small_triclinic,
)

__all__ = [
    "ADAPTER_ELEMENTS",
    "AdapterBattery",
    "ISOLATED_CUTOFF",
    "adapter_structures",
    "assert_matches_calculator",
    "assert_partition_invariant",
    "awkward_structures",
    "check_forces_finite_difference",
    "check_steps",
    "check_stress_finite_difference",
    "count_work",
    "evaluate",
    "fcc_bulk",
    "format_report",
    "molecule",
    "multi_element_isolated",
    "rel_err",
    "slab_vacuum",
    "small_triclinic",
]
