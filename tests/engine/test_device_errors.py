"""A device out of memory during a step (issue 21, bad input): one clear ``MemoryError`` naming the
device, what the step was doing and torch's own message, with the advice; other errors pass
through unchanged. (Under a launcher the failing rank stops every rank: tests/mpi's fault script
injects a ``MemoryError`` in the model on rank 1.)"""

from __future__ import annotations

import pytest
import torch

from distmlip import DistributedCalculator
from distmlip.models import SchNet

from support import salt

CUDA_SAYS = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.2 GiB total capacity)"
CPU_SAYS = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 8589934592 bytes.")


class Failing(SchNet):
    """SchNet whose forward raises ``error`` once armed (``Failing.armed``, a class attribute: the
    runner evaluates copies of the model)."""

    armed = False

    def __init__(self, error: BaseException):
        super().__init__(cutoff=4.0, num_interactions=2, hidden_channels=8, seed=0)
        self.error = error

    def forward(self, graph):
        if Failing.armed:
            raise self.error
        return super().forward(graph)


@pytest.fixture(autouse=True)
def disarmed():
    Failing.armed = False
    yield
    Failing.armed = False


def _fail_next_step(atoms):
    """The first step passed (built, calibrated); the next (no rebuild) meets the error."""
    atoms.get_potential_energy()
    atoms.positions[0] += 0.05
    Failing.armed = True


@pytest.mark.parametrize("error,said", [
    (torch.OutOfMemoryError(CUDA_SAYS), "CUDA out of memory. Tried to allocate 2.00 GiB"),
    (RuntimeError(CPU_SAYS), "you tried to allocate 8589934592 bytes"),
    (MemoryError("Unable to allocate 6.00 GiB for an array with shape (268435456, 3)"),
     "Unable to allocate 6.00 GiB"),
])
def test_out_of_memory_is_named(error, said):
    atoms = salt()
    atoms.calc = DistributedCalculator(Failing(error), num_parts=2)
    _fail_next_step(atoms)
    with pytest.raises(MemoryError) as info:
        atoms.get_forces()
    text = str(info.value)
    assert text.startswith("device cpu: out of memory while evaluating the model"), text
    assert said in text, text
    assert "max_memory=" in text and "num_parts=" in text, text
    cause = info.value.__cause__  # the model runs as a replica: its error is a copy
    assert type(cause) is type(error) and str(cause) == str(error)


def test_out_of_memory_under_a_budget_names_the_budget():
    atoms = salt()
    model = Failing(torch.OutOfMemoryError(CUDA_SAYS))
    atoms.calc = DistributedCalculator(model, max_memory="2GB")
    _fail_next_step(atoms)
    with pytest.raises(MemoryError, match=r"a smaller max_memory than 2,000,000,000 bytes"):
        atoms.get_forces()


@pytest.mark.parametrize("said", [
    "mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)",
    # a model's own error that merely mentions memory is not relabelled as the device's
    "my cache ran out of memory slots: expected at most 8 species",
])
def test_other_errors_pass_unchanged(said):
    atoms = salt()
    error = RuntimeError(said)
    atoms.calc = DistributedCalculator(Failing(error), num_parts=2)
    _fail_next_step(atoms)
    with pytest.raises(RuntimeError) as info:
        atoms.get_forces()
    assert type(info.value) is RuntimeError and str(info.value) == str(error)
