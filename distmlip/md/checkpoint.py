"""A run's checkpoint: written atomically, read back exactly.

The checkpoint holds the positions, momenta, cell, masses, the structure's constraints (FixAtoms,
FixCartesian, ...), ``info`` and other per-atom arrays (charges, magnetic moments, tags), the step,
the run's settings, the random state of the Langevin thermostat, the state of the MTK barostat and
thermostat and the sizes of the log and trajectory when it was written. It is written to a
temporary file, flushed, synced and renamed over the old one, so a crash leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from .dynamics import MDSettings

__all__ = ["CHECKPOINT", "load_checkpoint", "unsaved_info", "write_checkpoint"]

CHECKPOINT = "checkpoint.npz"

#: per-atom arrays the checkpoint stores as such; every other numeric array goes in as ``array:NAME``
_STANDARD_ARRAYS = ("numbers", "positions", "momenta", "masses")


def _structure_meta(atoms) -> dict:
    """Constraints and ``info`` of ``atoms`` as JSON text (ASE's encoding); ``info`` entries JSON
    cannot hold are left out (named in ``dropped_info``)."""
    from ase.io.jsonio import encode

    info, dropped = {}, []
    for key, value in atoms.info.items():
        try:
            encode(value)
        except (TypeError, ValueError):
            dropped.append(str(key))
            continue
        info[str(key)] = value
    return {"constraints": encode([c.todict() for c in atoms.constraints]), "info": encode(info),
            "dropped_info": dropped}


def unsaved_info(atoms) -> list[str]:
    """The keys of ``atoms.info`` a checkpoint (and an extxyz frame) leaves out: not JSON."""
    return _structure_meta(atoms)["dropped_info"]


def _restore_structure(atoms, meta: dict) -> None:
    from ase.constraints import dict2constraint
    from ase.io.jsonio import decode

    if meta.get("constraints"):
        atoms.set_constraint([dict2constraint(d) for d in decode(meta["constraints"])])
    if meta.get("info"):
        atoms.info.update(decode(meta["info"]))


def write_checkpoint(path: Path, atoms, step: int, settings: MDSettings, rng, sizes: dict,
                     calculator: dict, output: dict, dynamics: dict | None = None,
                     build: dict | None = None) -> None:
    """Write the checkpoint atomically: a temporary file, flushed and synced, then renamed.
    ``calculator``: the calculator options; ``output``: ``write_every`` and ``log_every``;
    ``dynamics``: the integrator's own state (``dynamics_state``); ``build``: the positions and
    cell the calculator's current neighbour graph was built from (``build_reference``), so a
    restart rebuilds the same graph and reproduces the run bit for bit in any dtype."""
    path = Path(path)
    meta = {"format": 2, "step": int(step), "settings": dataclasses.asdict(settings),
            "rng": None if rng is None else rng.bit_generator.state, "sizes": sizes,
            "calculator": calculator, "output": output, **_structure_meta(atoms),
            "dynamics": None if dynamics is None else sorted(dynamics)}
    extra = {f"array:{k}": v for k, v in atoms.arrays.items()
             if k not in _STANDARD_ARRAYS and np.issubdtype(v.dtype, np.number)}
    state = {f"dynamics:{k}": v for k, v in (dynamics or {}).items()}
    state.update({f"build:{k}": v for k, v in (build or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _savez(f, positions=atoms.positions, momenta=atoms.get_momenta(), cell=atoms.cell.array,
               pbc=atoms.pbc, numbers=atoms.numbers, masses=atoms.get_masses(),
               meta=np.array(json.dumps(meta)), **extra, **state)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def _savez(f, **arrays) -> None:  # one seam, so tests can crash a write half-way
    np.savez(f, **arrays)


def load_checkpoint(directory) -> dict:
    """The checkpoint in ``directory``: ``atoms`` (with momenta, constraints, ``info`` and the
    other per-atom arrays), ``step``, ``settings``, ``rng`` (a bit-generator state or None),
    ``sizes``, ``calculator``, ``output``, ``dynamics`` (the integrator's state, see
    ``dynamics_state``), ``build`` (the graph's reference positions and cell, or None).

    Raises ``ValueError``: ``directory: ...`` when it holds no checkpoint, ``checkpoint: ...``
    when the checkpoint cannot be read."""
    from ase import Atoms

    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"directory: expected a run directory holding {CHECKPOINT}, got "
                         f"{str(directory)!r}, which has none")
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            atoms = Atoms(numbers=z["numbers"], positions=z["positions"], cell=z["cell"],
                          pbc=z["pbc"], masses=z["masses"])
            for key in z.files:
                if key.startswith("array:"):
                    atoms.set_array(key[len("array:"):], z[key])
            _restore_structure(atoms, meta)
            atoms.set_momenta(z["momenta"], apply_constraint=False)
            build = {k[len("build:"):]: z[k] for k in z.files if k.startswith("build:")} or None
            dynamics = None
            if meta.get("dynamics") is not None:
                dynamics = {k: z[f"dynamics:{k}"] for k in meta["dynamics"]}
            elif meta.get("format", 1) < 2:  # written before the MTK barostat existed
                dynamics = {}
    except Exception as exc:  # noqa: BLE001 - any damage
        raise ValueError(f"checkpoint: expected a readable {CHECKPOINT} in {str(directory)!r}, got "
                         f"{type(exc).__name__}: {exc}") from None
    return {"atoms": atoms, "step": meta["step"], "settings": MDSettings(**meta["settings"]),
            "rng": meta["rng"], "sizes": meta["sizes"], "calculator": meta["calculator"],
            "output": meta["output"], "dynamics": dynamics, "build": build}
