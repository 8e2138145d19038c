"""The calculator's options, defined once: ``FIELDS`` (name, type, default, check, doc, CLI flag)
and ``Options``, their validated, frozen values.

Everything that takes the options derives from this table: ``DistributedCalculator``
(``default_parameters``, its constructor, ``set()``, ``todict()``), the ``Runner`` (built from an
``Options``), ``estimate_memory`` and the command line's calculator flags. A check raises the
option's error (``"<name>: expected ..., got ..."``) and returns the plain value kept in
``calc.parameters``; what is derived from the values (the devices, the torch dtype, the budget in
bytes) are properties of ``Options``::

    options = Options.from_kwargs(num_parts=4, max_memory="6GB")
    options.budget_bytes, options.devices, options.torch_dtype

Also here, because the checks need them: the parsers of ``dtype``, ``device`` and ``max_memory``
and the device memory queries a budget is measured against.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch

from .typing import (
    BACKENDS,
    DTYPE_NAMES,
    MODES,
    NEIGHBORS,
    PARTITIONERS,
    Backend,
    DTypeLike,
    Mode,
    Neighbors,
    Partitioner,
)

__all__ = ["AUTO_BUDGET_FRACTION", "DEFAULT_SKIN", "DEFAULT_TIMEOUT", "FIELDS", "NAMES", "RENAMED", "Field",
           "Options", "device_free_memory", "device_total_memory", "options_doc", "parse_budget",
           "parse_devices", "parse_dtype", "renamed", "signature", "unknown_keyword"]

#: Default Verlet skin, Å: the graph is built with cutoff + skin and reused until an atom has moved
#: more than skin / 2. 0.5 Å keeps the graph ~1.3x the edges of a 5 Å cutoff and, at room
#: temperature with 1-2 fs steps, rebuilds it every few tens of steps.
DEFAULT_SKIN = 0.5

#: Default seconds a rank waits for its peers in any collective before failing.
DEFAULT_TIMEOUT = 30.0

#: ``num_parts="auto"`` without ``max_memory``: the budget is this fraction of the device's
#: free memory.
AUTO_BUDGET_FRACTION = 0.8

_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ----------------------------------------------------------------------------- parsers
def parse_dtype(dtype) -> torch.dtype | None:
    """``dtype=``: ``None``, ``torch.float32``/``torch.float64`` or their names -> the torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected None, torch.float32/torch.float64 or one of {list(_DTYPES)}, "
                     f"got {dtype!r}")


def parse_devices(device) -> list[torch.device]:
    """``device=``: a device or a non-empty list of them, each usable by this torch."""
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("device: expected a device or a non-empty list of devices, got []")
    out = []
    for item in items:
        try:
            dev = torch.device(item)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', "
                             f"got {item!r}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"device: expected a device this torch can use, got {item!r}, but "
                    f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                    f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                    f"use device='cpu' or install a CUDA build of torch"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device: expected a GPU index below {torch.cuda.device_count()} "
                                 f"(the GPUs visible), got {item!r}")
        elif dev.type != "cpu":
            try:
                torch.empty(0, device=dev)
            except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable
                raise ValueError(f"device: expected a device this torch can use, got {item!r} "
                                 f"({type(exc).__name__}: {exc}); use device='cpu'") from None
        out.append(dev)
    return out


def device_total_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (CPU: the machine's RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_free_memory(device: torch.device) -> int:
    """Memory available on ``device`` now, bytes (CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return device_total_memory(device)  # pragma: no cover - not Linux


def parse_budget(value, device: torch.device) -> int | None:
    """``max_memory`` in bytes: ``None``, an int (bytes), a string (``"6GB"``, ``"500MB"``,
    ``"2GiB"``) or a float in (0, 1] (a fraction of the device's total memory)."""
    if value is None:
        return None
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, np.integer)) and value > 0:
        return int(value)
    elif isinstance(value, (float, np.floating)) and 0 < value <= 1:
        return int(value * device_total_memory(device))
    elif isinstance(value, (float, np.floating)) and value > 1 and float(value).is_integer():
        return int(value)  # 6e9: bytes written in float notation
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", value.upper())
        if match and match.group(2) in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(
        f"max_memory: expected None, a number of bytes (int > 0), a size such as '6GB' or '500MB', "
        f"or a fraction of the device's memory in (0, 1], got {value!r}"
    )


#: Option names that were renamed: old -> (new, the date of the rename). The old name still works
#: with a ``DeprecationWarning`` until six months after that date.
RENAMED = {"num_partitions": ("num_parts", "2026-12-02")}


def renamed(kwargs: dict) -> dict:
    """``kwargs`` with renamed options (``RENAMED``) under their new names, each warned about once
    per call; ``TypeError`` if both the old and the new name are given."""
    out = dict(kwargs)
    for old, (new, since) in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(f"{old}: expected only {new}= (the new name of {old}=), got both; "
                            f"drop {old}=")
        warnings.warn(f"{old}= is deprecated since {since} and will be removed six months later: "
                      f"use {new}= (the same values)", DeprecationWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def unknown_keyword(name: str, known) -> TypeError:
    """The error of a keyword that is not an option (``known``: the accepted ones)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{name}: expected a keyword of DistributedCalculator (one of {sorted(known)}), "
                     f"got the unknown keyword {name!r}{hint}")


# ----------------------------------------------------------------------------- checks
def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_num_parts(value):
    if value is None or isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"num_parts: expected an integer >= 1 or 'auto', got {value!r}")
    if value < 1:
        raise ValueError(f"num_parts: expected an integer >= 1, got {value}")
    return int(value)


def _one_of(name: str, allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
        return value
    return check


def _check_device(value):
    parse_devices(value)
    return tuple(str(d) for d in value) if isinstance(value, (list, tuple)) else str(value)


def _check_dtype(value):
    dtype = parse_dtype(value)
    return None if dtype is None else str(dtype).replace("torch.", "")


def _check_timeout(value):
    if not _is_real(value) or not 0 < value < float("inf"):
        raise ValueError(f"timeout: expected a positive, finite number of seconds, got {value!r}")
    return float(value)


def _check_num_threads(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"num_threads: expected None or an integer >= 1 (torch threads per "
                        f"process), got {value!r}")
    if value < 1:
        raise ValueError(f"num_threads: expected None or an integer >= 1 (torch threads per "
                         f"process), got {value}; omit it to keep torch's setting")
    return int(value)


def _check_skin(value):
    if not _is_real(value) or not 0 <= value < float("inf"):
        raise ValueError(f"skin: expected a finite number of Å >= 0 (default {DEFAULT_SKIN}), got {value!r}")
    return float(value)


def _check_max_memory(value):
    parse_budget(value, torch.device("cpu"))  # the form; the bytes depend on the device
    return value


def _check_progress(value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"progress: expected True or False, got {value!r}")
    return bool(value)


def _number_or_text(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _device_list(text: str):
    devices = [d.strip() for d in text.split(",")]
    return devices if len(devices) > 1 else devices[0]


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Field:
    """One option: its ``name``, ``type`` (the annotation of signatures), ``default``, ``check``
    (value -> the plain value kept, or the option's error), ``doc``; on the command line its
    ``flag`` (``None``: none), its short ``aliases``, ``flag_kwargs`` (argparse keywords, as pairs)
    and ``from_flag`` (the flag's text -> the value; ``None``: as argparse gives it)."""

    name: str
    type: Any
    default: Any
    check: Callable[[Any], Any]
    doc: str
    flag: str | None = None
    flag_kwargs: tuple[tuple[str, Any], ...] = ()
    from_flag: Callable[[str], Any] | None = None
    aliases: tuple[str, ...] = ()


FIELDS: tuple[Field, ...] = (
    Field("num_parts", int | Literal['auto'] | None, None, _check_num_parts,
          "number of parts (>= 1; more parts than atoms is legal). Default: 1 in one process, the "
          "number of processes under a launcher (where it must be a multiple of the number of "
          "processes: each rank evaluates ``num_parts / ranks`` parts). ``\"auto\"``: one part "
          "per device (or rank) if the evaluation is predicted to fit ``max_memory`` (default: 80% "
          "of the device's free memory), else as many parts, evaluated one at a time, as fit.",
          "--partitions", (("metavar", "P|auto"), ("help", "number of parts (num_parts; default 1, "
                                                          "or one per rank under mpirun)")),
          _number_or_text, ("-p",)),
    Field("partitioner", Partitioner, "grid", _one_of("partitioner", PARTITIONERS),
          "``\"grid\"`` (recursive coordinate bisection, default), ``\"slab\"`` (1-D cuts balanced by "
          "atom count) or ``\"metis\"`` (pymetis graph partitioning).",
          "--partitioner", (("choices", PARTITIONERS), ("help", "default grid"))),
    Field("mode", Mode, "halo", _one_of("mode", MODES),
          "``\"halo\"`` (one-hop halo, exchange between layers, zero redundancy) or ``\"extended\"`` "
          "(halo as deep as the model's layers, no exchange).",
          "--mode", (("choices", MODES),
                     ("help", "halo: exchange between layers (default); extended: deep halo, no exchange"))),
    Field("device", str | torch.device | Sequence[str | torch.device], "cpu", _check_device,
          "a device, or a list of devices the parts are spread over round-robin (one worker each).",
          "--device", (("help", "cpu (default), cuda, cuda:1, or a comma list"),), _device_list),
    Field("dtype", DTypeLike, None, _check_dtype,
          "``None`` (the model's), ``torch.float32``/``torch.float64`` or ``\"float32\"``/``\"float64\"``.",
          "--dtype", (("help", "float32 or float64 (default: the model's)"),)),
    Field("backend", Backend, "auto", _one_of("backend", BACKENDS),
          "``\"auto\"`` (torch.distributed when launched with several processes, else in this "
          "process), ``\"local\"`` or ``\"torch\"``.",
          "--backend", (("help", "auto (default), local or torch"),)),
    Field("timeout", float, DEFAULT_TIMEOUT, _check_timeout,
          f"seconds a rank waits for its peers in any collective before failing (multi-process; "
          f"default {DEFAULT_TIMEOUT:g}).",
          "--timeout", (("type", float),
                        ("help", f"seconds to wait for peer ranks (default {DEFAULT_TIMEOUT:g})"))),
    Field("num_threads", int | None, None, _check_num_threads,
          "torch threads per process (default: 1 per rank under a launcher; unchanged in one process).",
          "--threads", (("type", int), ("help", "torch threads per process (num_threads)"))),
    Field("skin", float, DEFAULT_SKIN, _check_skin,
          f"Verlet skin in Å (default {DEFAULT_SKIN}; 0 rebuilds whenever an atom moves).",
          "--skin", (("type", float), ("help", f"Verlet skin, Å (default {DEFAULT_SKIN})"))),
    Field("neighbors", Neighbors, "auto", _one_of("neighbors", NEIGHBORS),
          "what builds the neighbour graph at a rebuild: ``\"auto\"`` (default: vesin-torch on a CUDA "
          "device when it is installed, else vesin), ``\"vesin\"`` (on the host) or ``\"vesin-torch\"`` "
          "(vesin's torch front-end on the first device; ``pip install vesin-torch``). The same graph "
          "either way: same edges and shifts, sorted by receiver.",
          "--neighbors", (("choices", NEIGHBORS), ("help", "auto (default), vesin or vesin-torch"))),
    Field("max_memory", int | float | str | None, None, _check_max_memory,
          "the memory one evaluation may add on each device: ``None`` (default: every part of a "
          "device alive at once, fastest), bytes (int), a size (``\"6GB\"``, ``\"500MB\"``) or a "
          "fraction in (0, 1] of the device's total memory. distmlip then splits the system into as "
          "many parts as the budget needs (at least ``num_parts``) and evaluates each device's "
          "parts one at a time, recomputing what it must; results stay exactly those of the unbounded "
          "evaluation. A budget below one atom's neighbourhood plus the graph is a ``ValueError`` "
          "naming the smallest that would work.",
          "--max-memory", (("metavar", "SIZE"), ("help", "memory one evaluation may add per device: "
                                                          "6GB, 500MB, bytes, or a fraction")),
          _number_or_text),
    Field("progress", bool, False, _check_progress,
          "show a progress bar (tqdm, rank 0) over the parts of an evaluation that runs them one at "
          "a time (``max_memory``): a single point on a large system can take minutes."),
)

#: The options' names, in the table's order.
NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)


class _Checked:
    """The methods of ``Options`` (its fields come from ``FIELDS``)."""

    @classmethod
    def from_kwargs(cls, **kwargs) -> Options:
        """Check every option given (the rest take their defaults); ``TypeError`` for a keyword
        that is not an option, the option's own error for a value it does not allow."""
        kwargs = renamed(kwargs)
        for key in kwargs:
            if key not in NAMES:
                raise unknown_keyword(key, NAMES)
        return cls(**{f.name: f.check(kwargs[f.name]) if f.name in kwargs else f.default for f in FIELDS})

    def replace(self, **changes) -> Options:
        """These options with ``changes``, checked."""
        return Options.from_kwargs(**{**self.todict(), **changes})

    def todict(self) -> dict:
        """The values by name, in the table's order (``device``: a list when several), as
        ``calc.parameters`` holds them."""
        out = {name: getattr(self, name) for name in NAMES}
        if isinstance(out["device"], tuple):
            out["device"] = list(out["device"])
        return out

    @cached_property
    def devices(self) -> list[torch.device]:
        """``device`` as a non-empty list of torch devices."""
        device = self.device
        return [torch.device(d) for d in (device if isinstance(device, tuple) else (device,))]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a torch dtype (``None``: the model's)."""
        return None if self.dtype is None else _DTYPES[self.dtype]

    @property
    def auto(self) -> bool:
        """Whether ``num_parts="auto"``."""
        return self.num_parts == "auto"

    @cached_property
    def budget_bytes(self) -> int | None:
        """``max_memory`` in bytes on the first device (a fraction: of its total memory); with
        ``num_parts="auto"`` and no ``max_memory``, ``AUTO_BUDGET_FRACTION`` of its free
        memory (measured once); ``None``: no bound."""
        if self.max_memory is None:
            return int(AUTO_BUDGET_FRACTION * device_free_memory(self.devices[0])) if self.auto else None
        return parse_budget(self.max_memory, self.devices[0])


#: The calculator's options, checked: a frozen dataclass with one field per entry of ``FIELDS``
#: (``Options()``: the defaults; ``Options.from_kwargs(**kw)``: checked values). The values are
#: the plain ones ``calc.parameters`` holds (``device`` a tuple when several); derived values are
#: properties: ``devices``, ``torch_dtype``, ``auto`` and ``budget_bytes``.
Options = dataclasses.make_dataclass(
    "Options", [(f.name, Any, dataclasses.field(default=f.default)) for f in FIELDS],
    bases=(_Checked,), frozen=True)
Options.__module__ = __name__
Options.__doc__ = "The calculator's options, checked: one field per entry of ``FIELDS``."


def options_doc(indent: int) -> str:
    """The options' docs as an ``Args:`` list (``name: doc``), indented by ``indent`` spaces."""
    pad = " " * indent
    return "\n".join(textwrap.fill(f"{f.name}: {f.doc}", 100, initial_indent=pad,
                                   subsequent_indent=pad + "    ") for f in FIELDS)


def signature(leading: tuple[str, ...], positional: tuple[str, ...], extra: tuple[str, ...] = ()
              ) -> inspect.Signature:
    """A signature taking ``leading`` (no default), then the options (``positional``: those that
    may be given by position, first), keyword-only the rest, then the keywords ``extra``
    (default ``None``)."""
    kind = inspect.Parameter
    params = [kind(name, kind.POSITIONAL_OR_KEYWORD) for name in leading]
    by_name = {f.name: f for f in FIELDS}
    for name in positional:
        params.append(kind(name, kind.POSITIONAL_OR_KEYWORD, default=by_name[name].default,
                           annotation=by_name[name].type))
    params += [kind(f.name, kind.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in FIELDS if f.name not in positional]
    params += [kind(name, kind.KEYWORD_ONLY, default=None) for name in extra]
    return inspect.Signature(params)
