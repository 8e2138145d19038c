"""Conformance checks for a ``DistributableModel``: run them on your model before trusting it split.

- ``assert_partition_invariant``: every partitioner x number of parts x mode gives the
  unpartitioned energy, forces, stress and per-atom energies.
- ``check_forces_finite_difference`` / ``check_stress_finite_difference``: the calculator's forces
  and stress are the derivatives of its energy.
- ``count_work``: how many edges the last calculation evaluated, against the graph's edges.
- ``check_steps``: a model's layer-protocol steps (``embed``/``step``/``energies``) compose to its
  ``forward``.

Relative error, everywhere in this module::

    rel_err(a, ref) = max|a - ref| / max(max|ref|, 1)

the largest absolute deviation over all components, divided by the largest magnitude of the
reference but never by less than 1 (so quantities that are zero or tiny in the reference, such as
the forces on a symmetric site, are compared absolutely instead of amplifying rounding noise).
Energies are in eV, forces eV/Å, stress eV/Å^3.

No pytest here: every check raises ``AssertionError`` with a message naming what failed.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence

import numpy as np

from ..calculators import DistributedCalculator
from ..graph.neighbors import as_ase_atoms
from ..models.base import LocalGraph, compare_steps, has_steps
from ..typing import MODES, PARTITIONERS, Mode, Partitioner

__all__ = [
    "assert_partition_invariant",
    "check_forces_finite_difference",
    "check_steps",
    "check_stress_finite_difference",
    "count_work",
    "evaluate",
    "format_report",
    "rel_err",
]

QUANTITIES = ("energy", "forces", "stress", "energies")


def rel_err(a, ref) -> float:
    """``max|a - ref| / max(max|ref|, 1)`` (see the module docstring)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {a.shape}, reference {ref.shape}")
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(a - ref)) / max(float(np.max(np.abs(ref))), 1.0))


def evaluate(calc, atoms) -> dict:
    """Energy, forces, per-atom energies and (for a cell of rank 3) stress of ``atoms`` with
    ``calc``, as float64 numpy arrays. ``atoms`` is copied, not modified."""
    work = atoms.copy()
    work.calc = calc
    out = {
        "energy": np.float64(work.get_potential_energy()),
        "forces": np.array(work.get_forces(), dtype=np.float64),
        "energies": np.array(work.get_potential_energies(), dtype=np.float64),
    }
    if work.cell.rank == 3:
        out["stress"] = np.array(work.get_stress(voigt=True), dtype=np.float64)
    work.calc = None
    return out


def _compare(result: dict, reference: dict) -> dict:
    missing = set(reference) ^ set(result)
    if missing:
        raise AssertionError(f"quantities {sorted(missing)} present in only one of the two results")
    return {q: rel_err(result[q], reference[q]) for q in QUANTITIES if q in reference}


def assert_partition_invariant(
    model,
    atoms,
    num_parts=(1, 2, 3, 7, 16),
    partitioners: Sequence[Partitioner] = PARTITIONERS,
    modes: Sequence[Mode] = MODES,
    dtype=None,
    rtol: float = 1e-10,
    device="cpu",
) -> list[dict]:
    """Check that splitting ``atoms`` never changes what ``model`` computes.

    The reference is ``DistributedCalculator(model, num_parts=1, device=device, dtype=dtype)``
    (all calculators here use ``backend="local"``: every part runs in this process).
    Every combination of ``partitioners`` x ``num_parts`` x ``modes`` is then evaluated
    and its energy, forces, per-atom energies and, when the cell has rank 3, stress compared with
    the reference using ``rel_err`` (module docstring).

    Args:
        model: a ``DistributableModel``.
        atoms: an ``ase.Atoms`` (or pymatgen ``Structure``/``Molecule``).
        num_parts, partitioners, modes: the combinations to run.
        dtype: passed to the calculator (``None``: the model's own dtype).
        rtol: the largest relative error accepted (1e-10 suits float64; use ~1e-5 for float32).
        device: passed to the calculator (a list of devices runs threaded workers).

    Returns:
        One dict per combination: ``partitioner``, ``mode``, ``num_parts``,
        ``nonempty_parts``, ``redundancy`` (edges evaluated / graph edges), ``exchange_calls``
        and the relative error of each quantity (keys ``energy``, ``forces``, ``energies``,
        ``stress``) plus ``max_err``. Print it with ``format_report``.

    Raises:
        AssertionError: naming the first combination and quantity whose error exceeds ``rtol``,
        with the error found.
    """

    atoms = as_ase_atoms(atoms)
    # backend="local": the partitions run in this process even under a multi-process launcher
    with warnings.catch_warnings():  # backend='local' under a launcher warns that ranks repeat work
        warnings.filterwarnings("ignore", message="backend='local' under")
        reference = evaluate(DistributedCalculator(model, 1, device=device, dtype=dtype,
                                                   backend="local"), atoms)
    report = []
    for partitioner, parts, mode in itertools.product(partitioners, num_parts, modes):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="backend='local' under")
            calc = DistributedCalculator(model, num_parts=parts, partitioner=partitioner,
                                         mode=mode, device=device, dtype=dtype, backend="local")
        result = evaluate(calc, atoms)
        errors = _compare(result, reference)
        plan = calc.last_plan
        row = {
            "partitioner": partitioner,
            "mode": mode,
            "num_parts": parts,
            "nonempty_parts": int(sum(p.num_owned > 0 for p in plan.parts)),
            "redundancy": plan.redundancy(),
            "exchange_calls": int(getattr(calc.runner, "last_exchange_calls", 0)),
            **errors,
            "max_err": max(errors.values()),
        }
        report.append(row)
        for quantity, err in errors.items():
            if not err <= rtol:  # also catches NaN
                raise AssertionError(
                    f"partitioner={partitioner!r}, num_parts={parts}, mode={mode!r}"
                    f"{'' if dtype is None else f', dtype={dtype!r}'}: {quantity} differs from the "
                    f"unpartitioned result by relative error {err:.3e} > rtol={rtol:.1e} "
                    f"(rel_err = max|a-ref| / max(max|ref|, 1))"
                )
    return report


def format_report(report: list[dict]) -> str:
    """A plain-text table of ``assert_partition_invariant``'s report."""
    head = f"{'partitioner':<11} {'mode':<8} {'parts':>5} {'used':>4} {'redund.':>7} " \
           f"{'energy':>9} {'forces':>9} {'energies':>9} {'stress':>9}"
    lines = [head]
    for r in report:
        stress = f"{r['stress']:9.1e}" if "stress" in r else f"{'-':>9}"
        lines.append(
            f"{r['partitioner']:<11} {r['mode']:<8} {r['num_parts']:>5} {r['nonempty_parts']:>4} "
            f"{r['redundancy']:7.2f} {r['energy']:9.1e} {r['forces']:9.1e} {r['energies']:9.1e} {stress}"
        )
    return "\n".join(lines)


def _default_indices(n: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(count, n), replace=False))


def check_forces_finite_difference(calc, atoms, delta: float = 1e-3, atol: float = 1e-6,
                                   indices=None, num_atoms: int = 3, seed: int = 0) -> float:
    """Compare ``calc``'s forces with minus the numerical gradient of its energy.

    The gradient is taken with the fourth-order central difference
    ``dE/dx ~ (-E(x+2h) + 8E(x+h) - 8E(x-h) + E(x-2h)) / (12h)``: its truncation error,
    O(h^4), is negligible at ``delta`` = 1e-3 Å, where the rounding error of the energy
    (~1e-13 relative in float64) divided by h stays ~1e-10 eV/Å; a second-order stencil would need
    h ~ 1e-4 and still carry ~1e-7 eV/Å of truncation error on stiff pairs. Note that a pair
    potential truncated without smoothing has a kink at its cutoff: pairs within ``2 * delta`` of
    the cutoff give a wrong numerical derivative.

    Only the ``indices`` atoms (default: ``num_atoms`` atoms picked with ``seed``), all three
    directions, are checked, at 4 energy evaluations per component.

    Returns the largest absolute deviation (eV/Å); raises ``AssertionError`` naming the worst
    component if it exceeds ``atol``.
    """
    work = atoms.copy()
    work.calc = calc
    analytic = np.array(work.get_forces(), dtype=np.float64)
    if indices is None:
        indices = _default_indices(len(work), num_atoms, seed)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    base = work.get_positions()
    rows = []  # (atom, axis, analytic, numeric)
    for a in indices:
        for k in range(3):
            energies = []
            for step in (2, 1, -1, -2):
                pos = base.copy()
                pos[a, k] += step * delta
                work.set_positions(pos)
                energies.append(work.get_potential_energy())
            e2, e1, m1, m2 = energies
            numeric = -(-e2 + 8 * e1 - 8 * m1 + m2) / (12 * delta)
            rows.append((int(a), k, analytic[a, k], numeric))
    work.set_positions(base)
    work.calc = None
    if not rows:
        return 0.0
    devs = np.array([abs(r[2] - r[3]) for r in rows])
    i = int(np.argmax(np.where(np.isnan(devs), np.inf, devs)))
    dev = float(devs[i])
    if not dev <= atol:
        a, k, got, expected = rows[i]
        raise AssertionError(
            f"forces: atom {a}, {'xyz'[k]}: analytic {got:.10g} eV/Å, minus finite-difference "
            f"gradient {expected:.10g} eV/Å (delta={delta} Å): deviation {dev:.3e} > atol={atol:.1e}"
        )
    return dev


def check_stress_finite_difference(calc, atoms, atol: float = 1e-6, eps: float = 1e-6) -> float:
    """Compare ``calc``'s stress with ASE's numerical stress (central differences of the energy
    over +-``eps`` strains, ``ase.calculators.fd.calculate_numerical_stress``).

    The cell must have rank 3. Returns the largest absolute deviation (eV/Å^3); raises
    ``AssertionError`` naming the worst Voigt component if it exceeds ``atol``.
    """
    from ase.calculators.fd import calculate_numerical_stress

    work = atoms.copy()
    if work.cell.rank != 3:
        raise ValueError(f"atoms: stress needs a cell of rank 3, got rank {work.cell.rank}")
    work.calc = calc
    analytic = np.array(work.get_stress(voigt=True), dtype=np.float64)
    numeric = calculate_numerical_stress(work, eps=eps, voigt=True)
    work.calc = None
    dev = np.abs(analytic - numeric)
    worst = int(np.argmax(np.where(np.isnan(dev), np.inf, dev)))
    if not np.all(dev <= atol):
        name = ("xx", "yy", "zz", "yz", "xz", "xy")[worst]
        raise AssertionError(
            f"stress: component {name}: analytic {analytic[worst]:.10g} eV/Å^3, numerical "
            f"{numeric[worst]:.10g} eV/Å^3 (strain eps={eps}): deviation {dev[worst]:.3e} > "
            f"atol={atol:.1e}"
        )
    return float(dev.max())


def count_work(calc) -> dict:
    """What the last calculation of a ``DistributedCalculator`` evaluated.

    Returns a dict: ``graph_edges`` (edges of the whole neighbour graph), ``edges_per_part``
    (list), ``edges_evaluated`` (their sum), ``distinct_edges_evaluated``, ``redundancy``
    (``edges_evaluated / graph_edges``; 1.0 means every edge was computed once),
    ``node_redundancy`` (node-wise updates asked for per layer over atoms; 1.0 in halo mode),
    ``halo_atoms`` (summed over parts), ``num_parts``, ``empty_parts``, ``mode``, ``num_hops``.
    """
    plan = getattr(calc, "last_plan", None)
    graph = getattr(calc, "last_graph", None)
    if plan is None or graph is None:
        raise ValueError("calc: expected a DistributedCalculator that has calculated, got one with "
                         "no last_plan (run a calculation first)")
    per_part = [int(len(p.edges)) for p in plan.parts]
    all_edges = np.concatenate([p.edges for p in plan.parts]) if plan.parts else np.zeros(0, int)
    return {
        "graph_edges": int(graph.num_edges),
        "edges_per_part": per_part,
        "edges_evaluated": int(sum(per_part)),
        "distinct_edges_evaluated": int(len(np.unique(all_edges))),
        "redundancy": plan.redundancy(),
        "node_redundancy": plan.node_redundancy(),
        "halo_atoms": int(sum(p.num_halo for p in plan.parts)),
        "num_parts": plan.num_parts,
        "empty_parts": int(plan.num_parts
                           - np.count_nonzero(np.bincount(plan.owner, minlength=plan.num_parts))),
        "mode": plan.mode,
        "num_hops": plan.num_hops,
    }


def check_steps(model, atoms, dtype=None, raise_on_failure: bool = True) -> dict:
    """Check that ``model``'s layer-protocol steps (``embed``, ``step``, ``energies``, see
    ``DistributableModel``) compose to its ``forward`` on ``atoms`` (unsplit; exchanges between
    steps are the identity there).

    Returns the report of ``distmlip.models.base.compare_steps``: ``ok``, ``where`` (the first
    step that differs), the relative errors ``energies`` (per-atom energies), ``gradient`` (of
    their sum with respect to the edge vectors) and ``levels`` (per exchanged state, against what
    ``forward`` exchanges) and a printable ``message``. A model without steps gives
    ``{"ok": True, "steps": False, ...}``.

    Raises:
        AssertionError: the report's message, if a step differs and ``raise_on_failure``.
    """
    import torch
    from ase.neighborlist import neighbor_list

    if not has_steps(model):
        return {"ok": True, "steps": False, "where": None, "energies": 0.0, "gradient": 0.0,
                "levels": [], "message": f"model: {type(model).__name__} has no layer-protocol steps"}
    atoms = as_ase_atoms(atoms)
    dtype = dtype or model.dtype
    receivers, senders, vec = neighbor_list("ijD", atoms, float(model.cutoff))
    if dtype != model.dtype:  # a copy: the caller's module stays as it is
        model = copy.deepcopy(model).to(dtype)
    graph = LocalGraph.single(torch.as_tensor(atoms.numbers, dtype=torch.int64),
                              torch.as_tensor(np.stack([senders, receivers]), dtype=torch.int64),
                              torch.as_tensor(vec, dtype=dtype),
                              torch.as_tensor(np.asarray(atoms.cell), dtype=dtype))
    report = {"steps": True, **compare_steps(model, graph)}
    if raise_on_failure and not report["ok"]:
        raise AssertionError(report["message"])
    return report
