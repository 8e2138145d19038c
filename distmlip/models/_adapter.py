"""What every adapter of a third-party package shares: the protocol, lazy imports, element tables.

An adapter is a module ``distmlip/models/<name>.py`` with a row in ``registry.ADAPTER_TABLE`` that
provides (the ``Adapter`` protocol below):

- ``PACKAGES``: the top-level packages whose objects it may accept (``wrap`` only asks adapters
  whose packages match the object's module, so nothing is imported to reject an object);
- ``supports(obj) -> bool``: whether ``obj`` is something it wraps (``False``, never an error,
  when its package is not installed);
- ``wrap(obj, **options) -> DistributableModel``: the wrapped model, ``XModel(module, *, ...)``,
  holding the package's module under ``.module``;
- ``OPTIONS``: the keyword options ``wrap`` and ``load`` accept (anything else: ``check_options``'s
  error);
- ``PRETRAINED``: ``{name: one-line description}`` of the weights ``load`` can give without
  downloading (may be empty), and ``load(name, **options)`` (``ValueError`` ``"name: expected
  ..."`` for a name it does not ship, ``no_pretrained`` when it ships none).

Every adapter is described by one row of ``registry.ADAPTER_TABLE`` (``AdapterInfo``: its
packages, pip distribution and extra, description, pretrained names, dtype, whether its node
updates are restricted to owned rows); ``tests/adapters/test_wrap.py`` checks that each module agrees with
its row and satisfies the protocol.

Adapters import their package lazily with ``optional_import`` (one error format), answer
``supports`` with ``supported`` (nothing imported for another package's object), refuse an unknown
option with ``check_options`` (one error format, naming the closest valid option; ``wrap_with``
builds the usual ``wrap``), raise ``no_pretrained`` from ``load`` when their package ships no
weights (``no_pretrained_load``), and map atomic numbers to the model's type indices with
``ElementTable`` (one error for an element the model does not cover).

Copy policy: **an adapter never modifies the caller's module.** When it must change the module
(forward hooks: MACE, NequIP; merged experts and expert state: fairchem; a rebuilt layer, or state
from the last call that ``copy.deepcopy`` refuses: matgl) it works on its own deep copy
(``private_copy``); when it only reads it (SevenNet, CHGNet, Orb, MatterSim), it holds the
caller's module without copying. Hooks are therefore only ever registered on the adapter's own
copy. The runtime deep-copies the wrapped model once per device (and casts the copy) anyway, so
holding the caller's module costs nothing and a copy is made only where it is needed. The shared
test battery (``distmlip.testing.battery``) checks that the caller's module is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import difflib
import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from .base import unknown_elements

__all__ = ["Adapter", "ElementTable", "HookState", "RunRows", "check_options", "no_pretrained",
           "no_pretrained_load", "optional_import", "private_copy", "supported", "wrap_with"]


@runtime_checkable
class Adapter(Protocol):
    """The module-level interface of an adapter (see the module docstring)."""

    PACKAGES: tuple[str, ...]
    OPTIONS: tuple[str, ...]
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


def check_options(options: Mapping, allowed, what: str) -> None:
    """``TypeError`` for the first key of ``options`` not in ``allowed``: the one unknown-option
    error of every adapter's ``wrap`` and ``load``.

    ``allowed``: the option names the adapter takes; ``what``: the models they are for (e.g.
    ``"SevenNet models"``). The message names the closest valid option (``difflib``)."""
    unknown = sorted(k for k in options if k not in allowed)
    if not unknown:
        return
    allowed = sorted(allowed)
    name = unknown[0]
    close = difflib.get_close_matches(name, allowed, n=1)
    valid = f"one of {allowed}" if allowed else "no options"
    fix = (f"did you mean {close[0]}=...?" if close
           else f"remove it (the options of {what}: {', '.join(allowed) or 'none'})")
    raise TypeError(f"{name}: expected {valid} for {what}, got an unexpected keyword argument "
                    f"{name!r}; {fix}")


def no_pretrained(name, package: str):
    """``ValueError`` for ``load(name)`` of an adapter whose package ships no weights inside its
    wheel (they download at run time): build the model with the package and wrap it."""
    return ValueError(f"name: expected a pretrained model shipped in an installed package, got "
                      f"{name!r}: {package}'s weights download at run time; build the model with "
                      f"{package} and pass it to distmlip.wrap")


def supported(obj, packages, check, errors=(ImportError,)) -> bool:
    """An adapter's ``supports``: ``False`` without importing anything for an object from another
    package than ``packages``, ``bool(check(obj))`` otherwise, ``False`` if that raises ``errors``
    (the package is not installed)."""
    if type(obj).__module__.split(".")[0] not in packages:
        return False
    try:
        return bool(check(obj))
    except errors:
        return False


def wrap_with(model_cls, allowed, what: str):
    """An adapter's ``wrap(obj, **options)``: the options checked against ``allowed``, then
    ``model_cls(obj, **options)``."""

    def wrap(obj, **options):
        check_options(options, allowed, what)
        return model_cls(obj, **options)

    wrap.__doc__ = (f"``{model_cls.__name__}(obj, **options)`` (options: "
                    f"{', '.join(allowed) or 'none'}).")
    return wrap


def no_pretrained_load(package: str, allowed, what: str):
    """An adapter's ``load(name, **options)`` when its package ships no weights: the options
    checked against ``allowed``, then ``no_pretrained``'s ``ValueError``."""

    def load(name, **options):
        check_options(options, allowed, what)
        raise no_pretrained(name, package)

    load.__doc__ = (f"No {package} weights ship inside the installed package: ``ValueError`` "
                    f"(build or load the model with {package} and ``wrap`` it).")
    return load


def private_copy(module, memo: dict | None = None):
    """A deep copy of ``module`` for an adapter that must change it (see the copy policy in the
    module docstring). Non-leaf tensors a package keeps from its last call (matgl's
    ``feature_dict``, fairchem's expert state), which ``copy.deepcopy`` refuses, are copied
    detached."""
    memo = {} if memo is None else memo
    for sub in module.modules() if isinstance(module, torch.nn.Module) else ():
        for value in _tensor_attributes(sub):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def _tensor_attributes(value, depth: int = 0):
    """Tensors held in plain attributes of a submodule, looking into dicts, lists, tuples and plain
    objects (a few levels deep; submodules are walked by ``private_copy`` itself)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 3 or isinstance(value, type):
        return
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensor_attributes(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensor_attributes(v, depth + 1)
    elif isinstance(value, torch.nn.Module):
        if depth == 0:  # the submodule itself: its own attributes (not its children)
            for key, v in vars(value).items():
                if key not in ("_modules", "_parameters", "_buffers"):
                    yield from _tensor_attributes(v, depth + 1)
    elif hasattr(value, "__dict__"):
        for v in vars(value).values():
            yield from _tensor_attributes(v, depth + 1)


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


            known = sorted(self.numbers)
            if len(known) > 3 and known[-1] - known[0] == len(known) - 1:  # a range
                known = (f"atomic numbers {known[0]}-{known[-1]} "
                         f"({chemical_symbols[known[0]]}-{chemical_symbols[known[-1]]})")
            else:
                known = ", ".join(chemical_symbols[z] for z in known)
            raise unknown_elements(self.name, numbers[types < 0].tolist(), known)
        return types
