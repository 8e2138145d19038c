"""Names of distmlip's string options, as ``typing.Literal`` aliases for annotating your own code.

Each alias is the one definition of the values its option accepts; the tuple beside it
(``typing.get_args`` of the alias) is what the checks test against and list in their errors::

    from distmlip.typing import Mode, Partitioner

    def make_calculator(model, mode: Mode = "halo", partitioner: Partitioner = "grid"): ...
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = ["BACKENDS", "DTYPE_NAMES", "MODES", "NEIGHBORS", "PARTITIONERS", "PRETRAINED_NAMES", "Backend",
           "DTypeLike", "DTypeName", "Mode", "Neighbors", "Partitioner", "PretrainedName"]

#: How parts exchange information: ``"halo"`` (one-hop halo, node features refreshed between
#: message-passing layers, every edge evaluated once) or ``"extended"`` (a halo as deep as the
#: model's layers, no exchange, redundant work).
Mode = Literal["halo", "extended"]

#: Who owns which atom: ``"grid"`` (recursive coordinate bisection), ``"slab"`` (1-D cuts along the
#: longest axis, balanced by atom count) or ``"metis"`` (pymetis graph partitioning).
Partitioner = Literal["grid", "slab", "metis"]

#: Where the parts run: ``"auto"`` (torch.distributed under a multi-process launch, else this
#: process), ``"local"`` (this process) or ``"torch"`` (torch.distributed; needs a launch).
Backend = Literal["auto", "local", "torch"]

#: What builds the neighbour graph at a rebuild: ``"auto"`` (vesin-torch on a CUDA device when it is
#: installed, else vesin), ``"vesin"`` (vesin's NumPy front-end, on the host) or ``"vesin-torch"``
#: (vesin's torch front-end, on the model's device; ``pip install vesin-torch``).
Neighbors = Literal["auto", "vesin", "vesin-torch"]

#: Floating dtypes a model may run in, by name.
DTypeName = Literal["float32", "float64"]

#: What ``dtype=`` accepts: ``None`` (the model's own), a name or the torch dtype.
DTypeLike = DTypeName | torch.dtype | None

#: Pretrained models ``distmlip.load`` knows (their weights ship inside the PyPI packages;
#: ``distmlip.models.available_models()`` lists those installed here).
PretrainedName = Literal["sevennet-0", "sevennet-l3i5", "sevennet-mf-0", "chgnet-0.3.0", "chgnet-0.2.0",
                         "chgnet-r2scan"]

MODES: tuple[str, ...] = get_args(Mode)
PARTITIONERS: tuple[str, ...] = get_args(Partitioner)
BACKENDS: tuple[str, ...] = get_args(Backend)
NEIGHBORS: tuple[str, ...] = get_args(Neighbors)
DTYPE_NAMES: tuple[str, ...] = get_args(DTypeName)
PRETRAINED_NAMES: tuple[str, ...] = get_args(PretrainedName)
