"""The shared test battery of adapters: what every adapter test asserts, written once.

An adapter test subclasses ``AdapterBattery`` in a class named ``Test...`` and provides four
pytest fixtures (module or session scoped where they load a model, so the battery adds no load)::

    from distmlip.testing.battery import AdapterBattery

    @pytest.fixture(scope="module")
    def battery_source():            # the package's object, as a user holds it
        return build_my_package_model()

    @pytest.fixture(scope="module")
    def battery_model(battery_source):   # the wrapped model the battery evaluates
        return wrap(battery_source)

    @pytest.fixture(params=["oxide", "metal", "slab"])
    def battery_case(request):        # (name, atoms, partitioner), one test per structure
        return request.param, BUILDERS[request.param](), "grid"

    @pytest.fixture(scope="module")
    def battery_reference(calc):     # (name, atoms) -> the package's own results, or None
        return lambda name, atoms: calculator_reference(calc, atoms)

    class TestBattery(AdapterBattery):
        split_parts = (2, 3, 5)      # configuration: class attributes (see below)

and inherits these tests (each one names what failed; nothing here imports pytest until a test
needs to skip):

- ``test_battery_matches_calculator_and_split``: on every ``battery_case``, the wrapped model
  split into ``calculator_parts`` parts (``calculator_modes``) equals the package's calculator
  within ``tolerance(quantity)`` (energy per atom, forces, stress, per-atom energies when the
  reference has them; and within ``calculator_rtol`` relative, ``rel_err``, if set), every run
  equals the first (unsplit) one to ``runs_rtol`` relative if set, the per-atom energies sum to
  the energy (``energies_sum_atol`` + ``energies_sum_rtol`` x |E|), and split into ``split_parts``
  parts (``split_modes``, the case's partitioner) equals the unsplit model to ``split_rtol``
  relative (float64: 1e-10; float32: 1e-5) in ``split_dtype``;
- ``test_battery_finite_difference_forces``: forces equal minus the energy's numerical gradient
  on ``small_structure()`` (skipped when it returns ``None``), in float64;
- ``test_battery_source_unchanged``: wrapping ``battery_source`` again and evaluating it split
  (on ``small_structure()``)
  leaves the caller's module as it was (parameters, buffers, dtype, submodules, hooks): the copy
  policy of ``distmlip/models/_adapter.py``;
- ``test_battery_unknown_option_refused``: ``wrap(source, <unknown>=...)`` raises the
  one unknown-option ``TypeError`` (``"<option>: expected ..."``).

Hooks for adapter-specific checks: ``check_run(calc, model, parts, mode)`` after each run
compared with the calculator, ``check_split_report(report, model)`` on the split report,
``tolerance(quantity, reference)`` for tolerances that depend on the reference.
"""

from __future__ import annotations

import numpy as np

from ..calculators import DistributedCalculator
from ..models import wrap
from .checks import assert_partition_invariant, check_forces_finite_difference, evaluate, rel_err

__all__ = ["AdapterBattery", "module_snapshot"]

_UNITS = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å^3", "energies": "eV"}


def _torch_modules(obj, depth: int = 0):
    """The ``torch.nn.Module``s of a package object: itself, or what a calculator, potential or
    predict unit holds (``model``, ``potential``, ``predictor``, ``module``)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = []
    if depth < 3:
        for name in ("model", "potential", "predictor", "module"):
            inner = getattr(obj, name, None)
            if inner is not None and inner is not obj:
                found += _torch_modules(inner, depth + 1)
    return found


def module_snapshot(obj) -> dict:
    """What the copy policy promises to keep: every parameter and buffer (cloned), its dtype,
    the submodule names and the number of forward (pre-)hooks of each submodule."""
    out = {}
    for i, module in enumerate(_torch_modules(obj)):
        for name, tensor in module.state_dict(keep_vars=False).items():
            out[f"{i}:{name}"] = tensor.detach().clone()
        for name, sub in module.named_modules():
            out[f"{i}:{name}#hooks"] = (type(sub).__name__, len(sub._forward_hooks),
                                        len(sub._forward_pre_hooks), len(sub._backward_hooks))
    return out


def _assert_same_snapshot(before: dict, after: dict) -> None:
    if before.keys() != after.keys():
        changed = sorted(before.keys() ^ after.keys())[:5]
        raise AssertionError(f"the caller's module changed: entries added or removed {changed}")
    for key, value in before.items():
        now = after[key]
        if hasattr(value, "dtype"):
            if value.dtype != now.dtype or value.shape != now.shape or not bool((value == now).all()):
                raise AssertionError(f"the caller's module changed: {key} ({value.dtype} -> {now.dtype})")
        elif value != now:
            raise AssertionError(f"the caller's module changed: {key} {value} -> {now}")


def _skip(reason: str):
    import pytest  # only when a test runs: distmlip.testing does not need pytest

    pytest.skip(reason)


class AdapterBattery:
    """The shared adapter tests (see the module docstring); configure with class attributes."""

    #: parts, modes and dtype of the runs compared with the package's calculator
    calculator_parts: tuple = (1,)
    calculator_modes: tuple = ("halo",)
    calculator_dtype = None
    #: largest differences from the calculator (energy per atom, forces, stress, per-atom energies)
    tolerances: dict = {"energy": 1e-6, "forces": 1e-5, "stress": 1e-6, "energies": 1e-6}
    #: the reference's largest force must exceed this (the comparison measures real forces)
    min_reference_force: float = 0.05
    #: relative difference (``rel_err``) from the calculator, per quantity (None: not checked)
    calculator_rtol = None
    #: relative difference of every run from the first of its mode (None: not checked)
    runs_rtol = None
    #: |sum of per-atom energies - energy| <= atol + rtol * |energy| (eV; atol None: not checked)
    energies_sum_atol = 1e-9
    energies_sum_rtol: float = 0.0
    #: split == unsplit: parts, modes, dtype and relative tolerance
    split_parts: tuple = (2, 3, 5)
    split_modes: tuple = ("halo", "extended")
    split_dtype = None
    split_rtol: float = 1e-10
    #: options passed to ``distmlip.wrap`` by the source checks
    wrap_options: dict = {}
    #: finite differences: parts, atoms displaced, step (Å), tolerance (eV/Å)
    fd_parts: int = 1
    fd_num_atoms: int = 1
    fd_delta: float = 1e-3
    fd_atol: float = 1e-6

    # ---------------------------------------------------------------- hooks
    def small_structure(self):
        """A small structure of the model's elements for the finite-difference and source checks
        (``None``: both are skipped)."""
        return None

    #: whether to run the finite-difference check on ``small_structure()``
    finite_differences: bool = True

    def tolerance(self, quantity: str, reference: dict) -> float:
        return self.tolerances[quantity]

    def check_run(self, calc, model, parts: int, mode: str) -> None:
        """Called after each run compared with the calculator."""

    def check_split_report(self, report: list, model) -> None:
        """Called with ``assert_partition_invariant``'s report."""

    # ---------------------------------------------------------------- tests
    def test_battery_matches_calculator_and_split(self, battery_model, battery_case, battery_reference):

        name, atoms, partitioner = battery_case
        n = max(len(atoms), 1)
        if battery_reference is not None:
            ref = battery_reference(name, atoms)
            top = float(np.abs(ref["forces"]).max(initial=0.0))
            assert top > self.min_reference_force, f"{name}: reference forces {top:.2e} too small"
            for mode in self.calculator_modes:
                first = None
                for parts in self.calculator_parts:
                    calc = DistributedCalculator(battery_model, num_parts=parts, mode=mode,
                                                 dtype=self.calculator_dtype)
                    ours = evaluate(calc, atoms)
                    for q in ("energy", "forces", "stress", "energies"):
                        if q not in ref or q not in ours:
                            continue
                        diff = float(np.max(np.abs(np.asarray(ours[q]) - np.asarray(ref[q])), initial=0.0))
                        if q == "energy":
                            diff /= n
                        tol = self.tolerance(q, ref)
                        assert diff <= tol, (f"{name}, {parts} parts, {mode}: {q} differs from the "
                                             f"package's calculator by {diff:.2e} {_UNITS[q]} > {tol:.1e}")
                        if self.calculator_rtol is not None:
                            err = rel_err(ours[q], ref[q])
                            assert err <= self.calculator_rtol, (
                                f"{name}, {parts} parts, {mode}: {q} differs from the package's "
                                f"calculator by relative error {err:.2e} > {self.calculator_rtol:.0e}")
                    if first is None:
                        first = ours
                    elif self.runs_rtol is not None:
                        for q in first:
                            err = rel_err(ours[q], first[q])
                            assert err <= self.runs_rtol, (
                                f"{name}, {parts} parts, {mode}: {q} differs from the first run by "
                                f"relative error {err:.2e} > {self.runs_rtol:.0e}")
                    if self.energies_sum_atol is not None:
                        total = abs(float(ours["energies"].sum()) - float(ours["energy"]))
                        bound = self.energies_sum_atol + self.energies_sum_rtol * abs(float(ours["energy"]))
                        assert total <= bound, f"{name}: per-atom energies sum off by {total:.2e} eV"
                    self.check_run(calc, battery_model, parts, mode)
        if self.split_parts:
            report = assert_partition_invariant(battery_model, atoms, num_parts=self.split_parts,
                                                partitioners=(partitioner,), modes=self.split_modes,
                                                dtype=self.split_dtype, rtol=self.split_rtol)
            self.check_split_report(report, battery_model)

    def test_battery_finite_difference_forces(self, battery_model):

        atoms = self.small_structure()
        if atoms is None or not self.finite_differences:
            _skip("no finite-difference check configured (small_structure, finite_differences)")
        calc = DistributedCalculator(battery_model, num_parts=self.fd_parts, dtype="float64")
        check_forces_finite_difference(calc, atoms, delta=self.fd_delta, atol=self.fd_atol,
                                       num_atoms=self.fd_num_atoms)

    def test_battery_source_unchanged(self, battery_source):


        atoms = self.small_structure()
        if atoms is None:
            _skip("no small_structure configured")
        before = module_snapshot(battery_source)
        assert before, "battery_source holds no torch module"
        model = wrap(battery_source, **self.wrap_options)
        evaluate(DistributedCalculator(model, num_parts=2, mode="halo"), atoms)
        _assert_same_snapshot(before, module_snapshot(battery_source))

    def test_battery_unknown_option_refused(self, battery_source):

        option = "not_an_option"
        try:
            wrap(battery_source, **self.wrap_options, **{option: 1})
        except TypeError as exc:
            message = str(exc)
            assert message.startswith(f"{option}: expected "), message
            assert "unexpected keyword argument" in message, message
        else:
            raise AssertionError(f"distmlip.wrap accepted the unknown option {option}=1")
