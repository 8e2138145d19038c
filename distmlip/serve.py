"""Deprecated (2026-12-02): use ``distmlip.drivers`` (``distmlip.drivers.ipi.serve_ipi``,
``distmlip.drivers.lammps.lammps_fix_external``, ...). This alias will be removed."""

import warnings

from .drivers.ipi import UNIX_PREFIX, IpiAddress, parse_address, serve_ipi
from .drivers.lammps import lammps_fix_external, lammps_instance, mpich_lib_dir

__all__ = ["UNIX_PREFIX", "IpiAddress", "lammps_fix_external", "lammps_instance", "mpich_lib_dir",
           "parse_address", "serve_ipi"]

warnings.warn("distmlip.serve is deprecated since 2026-12-02: import from distmlip.drivers "
              "(distmlip.drivers.ipi, distmlip.drivers.lammps) instead", DeprecationWarning, stacklevel=2)
