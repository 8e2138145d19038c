"""The physics of a run (``MDSettings``), its ASE integrator, the integrator's own state and the
initial velocities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BAROSTATS", "ENSEMBLES", "MDSettings", "dynamics_state", "initial_velocities",
           "make_dynamics", "restore_dynamics_state"]

ENSEMBLES = ("nve", "nvt", "npt")
#: npt barostats: berendsen (weak coupling, isotropic: relaxes the volume, does not sample NPT);
#: mtk (Martyna-Tobias-Klein with Nosé-Hoover chains, all 9 cell degrees of freedom) and mtk-iso
#: (MTK, isotropic volume only) sample the isothermal-isobaric ensemble
BAROSTATS = ("berendsen", "mtk", "mtk-iso")


@dataclass(frozen=True)
class MDSettings:
    """The physics of a run (kept in its checkpoint; a restart cannot change them).

    Units: timestep fs, temperature K, friction 1/ps (Langevin), pressure GPa, taut/taup fs (the
    thermostat and barostat times: Berendsen's, or MTK's tdamp/pdamp), compressibility 1/GPa
    (Berendsen NPT only). ``barostat``: one of ``BAROSTATS`` (npt only).

    Raises ``ValueError`` naming the field (``temperature_K: expected ..., got ...``)."""

    model: str
    ensemble: str = "nve"
    timestep_fs: float = 1.0
    temperature_K: float = 300.0
    seed: int = 0
    friction_per_ps: float = 1.0
    pressure_GPa: float = 0.0
    taut_fs: float = 100.0
    taup_fs: float = 1000.0
    compressibility_per_GPa: float = 0.01
    barostat: str = "berendsen"

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble: expected one of {list(ENSEMBLES)}, got {self.ensemble!r}")
        if self.barostat not in BAROSTATS:
            raise ValueError(f"barostat: expected one of {list(BAROSTATS)}, got {self.barostat!r}")
        for field in ("timestep_fs", "friction_per_ps", "taut_fs", "taup_fs", "compressibility_per_GPa"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field}: expected a positive number, got {value!r}")
        if not (math.isfinite(self.temperature_K) and self.temperature_K >= 0):
            raise ValueError(f"temperature_K: expected a number of K >= 0, got {self.temperature_K!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}; pass e.g. 0")
        if not math.isfinite(self.pressure_GPa):
            raise ValueError(f"pressure_GPa: expected a finite number of GPa, got {self.pressure_GPa!r}")
        if self.mtk and self.temperature_K <= 0:
            raise ValueError(f"temperature_K: the {self.barostat} barostat needs a temperature > 0 K "
                             f"(its thermostat and barostat masses scale with kT), got "
                             f"{self.temperature_K!r}")

    @property
    def mtk(self) -> bool:
        """Whether the run is NPT with an MTK barostat (Nosé-Hoover chains, checkpointed state)."""
        return self.ensemble == "npt" and self.barostat.startswith("mtk")


def make_dynamics(atoms, s: MDSettings):
    """The ASE integrator for ``s`` and its random generator (``None`` when it draws nothing).

    nve: velocity Verlet; nvt: Langevin (friction ``s.friction_per_ps``); npt with barostat
    berendsen: Berendsen thermostat and barostat, which rescales the cell from the stress
    (isotropic); npt with mtk / mtk-iso: ASE's ``MTKNPT`` / ``IsotropicMTKNPT`` (Nosé-Hoover chain
    thermostat, time ``taut``; MTK barostat, time ``taup``), which sample the NPT ensemble."""
    from ase import units
    from ase.parallel import DummyMPI

    dt = s.timestep_fs * units.fs
    if s.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt), None
    if s.ensemble == "nvt":
        from ase.md.langevin import Langevin

        rng = np.random.default_rng([s.seed, 1])
        # every rank draws the same numbers from the same seed: no broadcast (DummyMPI)
        return Langevin(atoms, timestep=dt, temperature_K=s.temperature_K, fixcm=False, rng=rng,
                        friction=s.friction_per_ps / (1000 * units.fs), comm=DummyMPI()), rng
    if atoms.cell.rank < 3 or not atoms.pbc.all():
        raise ValueError("ensemble: npt needs a periodic cell with three lattice vectors, got "
                         f"pbc={atoms.pbc.tolist()}; use nve or nvt for molecules and slabs")
    if s.mtk:
        from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

        if atoms.constraints:
            names = sorted({type(c).__name__ for c in atoms.constraints})
            raise ValueError(f"barostat: {s.barostat} (ASE's MTK integrator) does not support "
                             f"constraints, got {', '.join(names)} from the structure; use the "
                             f"berendsen barostat, or remove the constraints")
        cls = MTKNPT if s.barostat == "mtk" else IsotropicMTKNPT
        return cls(atoms, timestep=dt, temperature_K=s.temperature_K,
                   pressure_au=s.pressure_GPa * units.GPa, tdamp=s.taut_fs * units.fs,
                   pdamp=s.taup_fs * units.fs), None
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(atoms, timestep=dt, temperature_K=s.temperature_K,
                        pressure_au=s.pressure_GPa * units.GPa, taut=s.taut_fs * units.fs,
                        taup=s.taup_fs * units.fs, fixcm=False,
                        compressibility_au=s.compressibility_per_GPa / units.GPa), None


#: the state of ASE's MTK integrators beyond positions, momenta and cell: attribute paths
_MTK_STATE = {"mtk": ("_p_g", "_thermostat._eta", "_thermostat._p_eta", "_barostat._xi",
                      "_barostat._p_xi"),
              "mtk-iso": ("_eps", "_p_eps", "_cell0", "_volume0", "_thermostat._eta",
                          "_thermostat._p_eta", "_barostat._xi", "_barostat._p_xi")}


def dynamics_state(dyn, settings: MDSettings) -> dict | None:
    """What ``dyn`` holds beyond the atoms (MTK: cell momenta, thermostat and barostat chains), as
    ``{path: array}``; ``{}`` for integrators that hold nothing; ``None`` if this ASE's MTK
    integrator keeps its state elsewhere (a restart is then refused, not done wrong)."""
    if not settings.mtk:
        return {}
    out = {}
    for path in _MTK_STATE[settings.barostat]:
        obj = dyn
        for name in path.split("."):
            if not hasattr(obj, name):
                return None
            obj = getattr(obj, name)
        out[path] = np.array(obj, dtype=float)
    return out


def restore_dynamics_state(dyn, settings: MDSettings, state: dict | None) -> None:
    """Put a checkpoint's ``dynamics_state`` back into a new integrator; ``ValueError``
    (``checkpoint: ...``) if the checkpoint lacks it."""
    if not settings.mtk:
        return
    paths = _MTK_STATE[settings.barostat]
    if state is None or sorted(state) != sorted(paths):
        raise ValueError(f"checkpoint: this run's {settings.barostat} barostat state is not in its "
                         f"checkpoint (this ASE's MTK integrator keeps it elsewhere), so it cannot "
                         f"continue exactly; start a new run from its last frame instead")
    for path in paths:
        *parents, name = path.split(".")
        obj = dyn
        for parent in parents:
            obj = getattr(obj, parent)
        old = getattr(obj, name)
        value = state[path]
        setattr(obj, name, float(value) if np.ndim(old) == 0 else value.reshape(np.shape(old)).copy())


def initial_velocities(atoms, temperature_K: float, seed: int, rescale: bool = True) -> float:
    """Maxwell-Boltzmann momenta at ``temperature_K`` from ``seed``, zero total momentum (the
    same on every rank); ``rescale`` (default): scaled after removing the centre-of-mass momentum
    so that the starting temperature (``atoms.get_temperature()``) is ``temperature_K`` exactly,
    else the raw draw (whose temperature fluctuates by ~sqrt(2/3N)). At 0 K the structure's
    momenta, if any, are kept. Returns the starting temperature, K."""
    if temperature_K <= 0:
        return float(atoms.get_temperature()) if len(atoms) else 0.0
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    now = atoms.get_temperature()
    if rescale and now > 0:
        atoms.set_momenta(atoms.get_momenta() * math.sqrt(temperature_K / now), apply_constraint=False)
    return float(atoms.get_temperature())
