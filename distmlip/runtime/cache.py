"""The on-disk cache of what a process learns about a model and is worth keeping for the next:
memory calibrations (``runtime/memory.py`` writes them under ``memory/``) and passed checks (the
layer protocol's composition probe, ``checks/``). One directory (``cache_dir``), files named by a
hash of what they are valid for (``model_fingerprint``: the model's type and weights; the dtype,
device and distmlip and torch versions), written atomically so that ranks may write at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path

import numpy as np
import torch

from ..models.base import DistributableModel, has_steps

__all__ = ["cache_dir", "cache_file", "calibration_key", "check_passed", "model_fingerprint",
           "remember_check", "write_json"]

log = logging.getLogger("distmlip")

try:
    VERSION = _dist_version("distmlip")
except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    VERSION = "0+unknown"


def cache_dir() -> Path | None:
    """The directory of the cache: ``$DISTMLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/distmlip``,
    else ``~/.cache/distmlip``. ``DISTMLIP_CACHE_DIR=off`` (or ``0``, ``none``, empty) turns the
    disk cache off: ``None``."""
    given = os.environ.get("DISTMLIP_CACHE_DIR")
    if given is not None:
        return None if given.strip().lower() in ("", "0", "off", "none", "false") else Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distmlip"


def model_fingerprint(model: DistributableModel) -> str:
    """A hash of what a model is: its type, ``repr`` (the layers' sizes), cutoff and layers, and
    every parameter and buffer (name, shape, dtype and the bytes of its values; blake2b, about
    1 GB/s: a 1M-parameter model in a few ms)."""
    h = hashlib.blake2b(digest_size=20)
    for text in (f"{type(model).__module__}.{type(model).__qualname__}", repr(model),
                 repr(getattr(model, "cutoff", None)), repr(getattr(model, "num_layers", None))):
        h.update(text.encode())
        h.update(b"\0")
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\0".encode())
        try:
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        except (RuntimeError, TypeError):  # pragma: no cover - an exotic tensor (quantized, sparse)
            h.update(repr(t.tolist()).encode())
    return h.hexdigest()


def calibration_key(model: DistributableModel, atoms, dtype: torch.dtype, device: torch.device) -> dict:
    """What a disk calibration is valid for. The probes are built from the system: its elements
    and periodic directions are part of the key (a cluster and a bulk crystal have different edges
    per atom); its size and positions are not. Nor its code, but for a model with the layer
    protocol the layout of the steps' state (steps, exchanged and edge entries), whose widths the
    calibration measures: a layout changed within a version is measured again (Orb's edge ids,
    added as two edge entries, were priced by the widths of its edge features alone)."""
    key = {"model": model_fingerprint(model), "type": type(model).__qualname__,
           "dtype": str(dtype), "device": torch.device(device).type, "distmlip": VERSION,
           "torch": torch.__version__,
           "elements": sorted({int(z) for z in np.asarray(atoms.numbers)}),
           "periodic": int(np.asarray(atoms.pbc).sum())}
    if has_steps(model):
        key["steps"] = [int(model.num_steps), sorted(int(e) for e in model.exchanged),
                        sorted(int(e) for e in getattr(model, "edge_entries", ()) or ())]
    return key


def cache_file(kind: str, key: dict) -> Path | None:
    """The file of ``key`` under ``cache_dir()/kind`` (``None``: the disk cache is off)."""
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    return root / kind / f"{digest}.json"


def write_json(path: Path | None, data: dict) -> None:
    """Write atomically (a temporary file, then ``os.replace``: a reader sees the old file or the
    new one, never half of one). A failure (read-only, full) is a debug note only."""
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.debug("distmlip: cannot write the cache file %s: %s", path, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _check_key(model: DistributableModel, dtype: torch.dtype, check: str) -> dict:
    return {"check": check, "model": model_fingerprint(model), "type": type(model).__qualname__,
            "dtype": str(dtype), "distmlip": VERSION, "torch": torch.__version__}


def check_passed(model: DistributableModel, dtype: torch.dtype, check: str) -> bool:
    """Whether ``check`` (a name) passed for this model (``model_fingerprint``: type and weights)
    and dtype, with this distmlip and torch, in an earlier process on this machine (a file under
    ``cache_dir()/checks``; ``remember_check`` writes it)."""
    key = _check_key(model, dtype, check)
    path = cache_file("checks", key)
    try:
        return path is not None and json.loads(path.read_text()) == key
    except (OSError, ValueError):
        return False


def remember_check(model: DistributableModel, dtype: torch.dtype, check: str) -> None:
    """Record that ``check`` passed (atomically; an unwritable cache is a debug note)."""
    key = _check_key(model, dtype, check)
    write_json(cache_file("checks", key), key)
