"""Other programs driving a ``DistributedCalculator``: i-PI over its socket protocol
(``distmlip.drivers.ipi``) and LAMMPS through ``fix external`` in this process
(``distmlip.drivers.lammps``)."""

from .ipi import UNIX_PREFIX, IpiAddress, parse_address, serve_ipi
from .lammps import lammps_fix_external, lammps_instance, mpich_lib_dir, write_lammps_data

__all__ = ["UNIX_PREFIX", "IpiAddress", "lammps_fix_external", "lammps_instance", "mpich_lib_dir",
           "parse_address", "serve_ipi", "write_lammps_data"]
