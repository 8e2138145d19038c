"""What every adapter of a third-party package shares: the protocol, lazy imports, element tables.

An adapter is a module ``distmlip/models/<name>.py`` listed in ``registry.ADAPTERS`` that provides
(the ``Adapter`` protocol below):

- ``PACKAGES``: the top-level packages whose objects it may accept (``wrap`` only asks adapters
  whose packages match the object's module, so nothing is imported to reject an object);
- ``supports(obj) -> bool``: whether ``obj`` is something it wraps (``False``, never an error,
  when its package is not installed);
- ``wrap(obj, **options) -> DistributableModel``: the wrapped model, ``XModel(module, *, ...)``,
  holding the package's module under ``.module``;
- ``PRETRAINED``: ``{name: one-line description}`` of the weights ``load`` can give without
  downloading (may be empty), and ``load(name, **options)``.

Adapters import their package lazily with ``optional_import`` (one error format) and map atomic
numbers to the model's type indices with ``ElementTable`` (one error for an element the model
does not cover).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Adapter", "ElementTable", "HookState", "RunRows", "optional_import"]


@runtime_checkable
class Adapter(Protocol):
    """The module-level interface of an adapter (see the module docstring)."""

    PACKAGES: tuple[str, ...]
    PRETRAINED: dict[str, str]

    def supports(self, obj) -> bool: ...

    def wrap(self, obj, **options): ...

    def load(self, name: str, **options): ...


def optional_import(module: str, extra: str, what: str):
    """Import ``module`` (a dotted name) or raise ``ImportError`` naming the extra to install.

    ``extra``: the ``distmlip[...]`` extra that brings it; ``what``: what it is needed for.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module.split('.')[0]}: expected the package installed to {what}, got "
            f"{type(exc).__name__}: {exc}. Install it with `pip install 'distmlip[{extra}]'` "
            f"(or `make install`)"
        ) from exc


class HookState:
    """The state an adapter's forward hooks read during one forward call: a ``ContextVar`` per
    adapter, so worker threads (one per device) never see each other's call.

    ``with state.active(RunRows(graph)): model(...)`` installs it for the call; a hook reads
    ``state.get()`` (``None`` outside a distmlip call: the hooked package then runs unchanged)."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)

    def get(self):
        return self._var.get()

    @contextlib.contextmanager
    def active(self, value):
        token = self._var.set(value)
        try:
            yield value
        finally:
            self._var.reset(token)


class RunRows:
    """What an adapter's forward hooks need during one forward call (kept in a ``ContextVar`` of the
    adapter module, so that worker threads do not see each other's): the exchange, the local rows
    and the rows node-wise blocks compute (``needed``; ``needed == rows``: nothing is sliced)."""

    __slots__ = ("exchange", "rows", "needed")

    def __init__(self, graph):
        self.exchange = graph.halo_exchange
        self.rows = graph.num_nodes
        # the exchange takes every row or the owned rows: only those can be left out
        self.needed = graph.num_needed if graph.num_needed == graph.num_owned else self.rows


class ElementTable(torch.nn.Module):
    """Atomic number -> the model's type index, with one error for elements it does not cover.

    Args:
        numbers: the atomic number of each type index, in type order (``numbers[t]`` is type t), or a
            mapping ``{atomic number: type index}`` (several elements may share a type).
        name: the model's name, for the error message.
    """

    def __init__(self, numbers, name: str):
        super().__init__()
        mapping = ({int(z): int(t) for z, t in numbers.items()} if isinstance(numbers, Mapping)
                   else {int(z): t for t, z in enumerate(numbers)})
        table = torch.full((max(mapping, default=0) + 1,), -1, dtype=torch.long)
        for z, t in mapping.items():
            table[z] = t
        self.name = name
        self.numbers = tuple(mapping)
        self.num_types = max(mapping.values(), default=-1) + 1
        self.register_buffer("table", table, persistent=False)

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:
        numbers = numbers.to(torch.long)
        size = self.table.shape[0]
        types = torch.where((numbers >= 0) & (numbers < size),
                            self.table[numbers.clamp(0, size - 1)], -1)
        if bool((types < 0).any()):
            from ase.data import chemical_symbols

            from .base import unknown_elements

            known = ", ".join(chemical_symbols[z] for z in sorted(self.numbers))
            raise unknown_elements(self.name, numbers[types < 0].tolist(), known)
        return types
