"""What the commands share: reading structures, resolving ``--model``, the calculator options."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from ..calculators import DistributedCalculator
from ..models import registry
from ..options import FIELDS
from ..runtime.launch import detect_launch

__all__ = ["CLIError", "add_calculator_options", "add_model_option", "build_calculator",
           "calculator_kwargs", "check_output_file", "check_writable_dir", "is_root", "load_model",
           "parse_max_memory", "read_structure", "parse_supercell", "repeat_structure", "translate"]


class CLIError(Exception):
    """A mistake on the command line: printed as one line, never with a traceback. ``prog``: the
    command to name (default: the one that ran)."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


# DistributedCalculator option -> the flag that sets it (error messages name the flag)
FLAGS = {"num_parts": "--partitions", "partitioner": "--partitioner", "mode": "--mode",
         "device": "--device", "dtype": "--dtype", "backend": "--backend", "timeout": "--timeout",
         "num_threads": "--threads", "skin": "--skin", "neighbors": "--neighbors",
         "max_memory": "--max-memory"}


def translate(message: str) -> str:
    """An error of ``DistributedCalculator`` (``num_parts: expected ...``) with the flag in
    front (``--partitions (num_parts): expected ...``)."""
    key, sep, rest = message.partition(":")
    if sep and key in FLAGS:
        return f"{FLAGS[key]} ({key}):{rest}"
    return message


# ----------------------------------------------------------------------------- structures
def read_structure(path: str, verbose: bool = False):
    """The structure in ``path`` as ``ase.Atoms`` (the last frame of a trajectory): any format
    ``ase.io.read`` reads, else pymatgen's ``Structure.from_file`` / ``Molecule.from_file``.
    Warnings of the readers are folded into the error line (a failure) or printed as notes with
    ``verbose`` (a success)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"STRUCTURE: expected a structure file, got {path!r}, which does not exist")
    if not p.is_file():
        raise CLIError(f"STRUCTURE: expected a structure file, got {path!r}, which is a directory")
    with warnings.catch_warnings(record=True) as caught:  # third-party warnings: folded
        warnings.simplefilter("always")
        atoms, errors = _read(p)
    if atoms is not None:
        if verbose:
            for w in caught:
                print(f"{STRUCTURE_NOTE}{w.category.__name__}: {str(w.message).splitlines()[0]}",
                      file=sys.stderr)
        return atoms
    notes = sorted({str(w.message).strip().splitlines()[0][:120] for w in caught if str(w.message).strip()})
    detail = "; ".join(e.splitlines()[0][:120] for e in errors)
    if notes:
        detail += f"; {len(notes)} warning(s), the first: {notes[0]}"
    raise CLIError(f"STRUCTURE: expected a file ASE or pymatgen can read (CIF, POSCAR, extxyz, ...), "
                   f"got {path!r}, which neither could read ({detail}); check the file is complete")


STRUCTURE_NOTE = "distmlip: note: while reading the structure: "


def _read(p: Path):
    """``(atoms, [])`` or ``(None, errors)``: ASE, then pymatgen."""
    import ase.io

    errors = []
    try:
        atoms = ase.io.read(p)
        if len(atoms):
            return atoms, errors
        errors.append("ase: no atoms")
    except Exception as exc:  # noqa: BLE001 - any reader failure: try pymatgen next
        errors.append(f"ase: {type(exc).__name__}: {exc}".strip())
    try:
        from pymatgen.core import Molecule, Structure
        from pymatgen.io.ase import AseAtomsAdaptor
    except ImportError as exc:  # pragma: no cover - pymatgen is a dependency
        errors.append(f"pymatgen: {exc}")
    else:
        for cls in (Structure, Molecule):
            try:
                return AseAtomsAdaptor.get_atoms(cls.from_file(str(p))), errors
            except Exception as exc:  # noqa: BLE001
                errors.append(f"pymatgen {cls.__name__}: {type(exc).__name__}: {exc}".strip())
    return None, errors


def parse_supercell(text: str | None) -> tuple[int, int, int] | None:
    """``"4x4x2"`` -> ``(4, 4, 2)``."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or min(int(g) for g in match.groups()) < 1:
        raise CLIError(f"--supercell: expected AxBxC with integers >= 1, got {text!r}; pass e.g. "
                       f"--supercell 4x4x2")
    return tuple(int(g) for g in match.groups())


def repeat_structure(atoms, supercell: tuple[int, int, int] | None):
    """``atoms`` repeated ``supercell`` times (``None``: as is). ASE repeats the constraints that
    name atoms (FixAtoms, FixCartesian, FixScaled, ...) with them and ``info`` as is; a structure
    whose constraints cannot be repeated is refused rather than repeated without them."""
    if not supercell or tuple(supercell) == (1, 1, 1):
        return atoms
    try:
        return atoms.repeat(supercell)
    except NotImplementedError:
        names = sorted({type(c).__name__ for c in atoms.constraints})
        raise CLIError(f"--supercell: the structure's constraints ({', '.join(names)}) cannot be "
                       f"repeated by ASE; repeat the structure and set its constraints yourself, or "
                       f"drop --supercell") from None
    except ValueError as exc:  # a lattice direction the structure does not have
        raise CLIError(f"--supercell: {exc}") from None


# ----------------------------------------------------------------------------- models
def load_model(spec: str):
    """``--model``: ``distmlip.models.registry.load_spec`` (a name ``distmlip.load`` accepts,
    ``lj``/``schnet`` with ``:key=value,...`` options, or a saved model file), its refusals as
    command-line errors."""
    try:
        return registry.load_spec(spec, option="--model")
    except registry.ModelSpecError as exc:
        raise CLIError(str(exc)) from None


def add_model_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, default=None, metavar="NAME|FILE",
                        help="a name from `distmlip models` (e.g. sevennet-0), lj/schnet[:k=v,...] "
                             "(reference models), or a saved model file (SevenNet .pth, CHGNet, "
                             "torch.save-d module)")


# ----------------------------------------------------------------------------- calculator
def add_calculator_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``DistributedCalculator`` that have a flag (``distmlip.options.FIELDS``),
    one flag each (its own checks validate them)."""
    g = parser.add_argument_group("calculator (DistributedCalculator options)")
    for field in FIELDS:
        if field.flag is not None:
            g.add_argument(field.flag, *field.aliases, default=None, **dict(field.flag_kwargs))


def calculator_kwargs(args) -> dict:
    """The ``DistributedCalculator`` keywords given on the command line (the rest keep their
    defaults)."""
    out = {}
    for field in FIELDS:
        # argparse's name of the flag's value: --max-memory -> max_memory
        value = getattr(args, field.flag.lstrip("-").replace("-", "_")) if field.flag else None
        if value is not None and field.name == "max_memory":
            out[field.name] = parse_max_memory(value)
        elif value is not None:
            out[field.name] = field.from_flag(value) if field.from_flag is not None else value
    return out


def parse_max_memory(text: str):
    """``--max-memory``: a size with a unit (``6GB``, ``500MB``, ``2GiB``) -> that text, or a
    fraction in (0, 1] of the device's memory -> a float; anything else (a bare number above 1:
    bytes or gigabytes?) is refused."""
    value = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?i?B)", value, re.IGNORECASE)
    if match and float(match.group(1)) > 0 and match.group(2).upper() in (
            "B", "KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB"):
        return value
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if 0 < fraction <= 1:
        return fraction
    raise CLIError(f"--max-memory: expected a size with a unit (6GB, 500MB, 2GiB) or a fraction of the "
                   f"device's memory in (0, 1], got {text!r}; pass e.g. --max-memory 2GB or "
                   f"--max-memory 0.5")


def build_calculator(model, options: dict, **extra):
    try:
        return DistributedCalculator(model, **options, **extra)
    except (TypeError, ValueError) as exc:
        raise CLIError(translate(str(exc))) from exc


def is_root() -> bool:
    """Whether this process prints and writes: rank 0 of a launch, or the only process."""
    launch = detect_launch()
    return launch is None or launch.rank == 0


#: picture formats matplotlib writes (``--plot``)
PICTURES = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "svgz", "pgf")


def check_output_file(path: str, flag: str, kind: str = "structure") -> Path:
    """Before any work: ``path`` can be written by ``flag`` — its directory exists and is writable,
    and its format is known from the name (``kind``: ``structure`` (a format ``ase.io.write``
    writes) or ``picture`` (one matplotlib writes))."""
    from ase.io.formats import filetype, ioformats

    p = Path(path)
    if kind == "picture":
        if p.suffix.lstrip(".").lower() not in PICTURES:
            raise CLIError(f"{flag}: expected a picture file named .png, .pdf, .svg, ..., got "
                           f"{str(path)!r}; pass e.g. {flag} parts.png")
    else:
        try:
            fmt = filetype(str(p), read=False)
            ok = ioformats[fmt].can_write
        except Exception:  # noqa: BLE001 - ASE cannot tell the format from the name
            fmt, ok = None, False
        if not ok:
            raise CLIError(f"{flag}: expected a file whose name tells ASE a format it writes (.extxyz, "
                           f".cif, .vasp, POSCAR, .traj, ...), got {str(path)!r}"
                           + (f" (format {fmt}, which ASE reads only)" if fmt else "")
                           + f"; pass e.g. {flag} {p.stem or 'out'}.extxyz")
    parent = p.parent
    if not parent.is_dir():
        raise CLIError(f"{flag}: expected a file in an existing directory, got {str(path)!r} "
                       f"({str(parent)!r} does not exist); create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIError(f"{flag}: expected a file distmlip can write, got {str(path)!r} (permission "
                       f"denied); pick another path")
    return p


def check_writable_dir(path: str, flag: str = "--output") -> Path:
    """Create ``path`` (a directory) if needed and check a file can be written in it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".distmlip-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"{flag}: expected a directory distmlip can write, got {path!r} "
                       f"({type(exc).__name__}: {exc.strerror or exc})") from None
    return p
