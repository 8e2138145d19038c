"""Molecular dynamics and optimisation with the calculator unchanged: a partitioned NVE
trajectory follows the unpartitioned one step by step.

Tolerance of the trajectory comparison: 1e-9 Å on positions and 1e-9 eV on energies, at every
step. The two runs differ only in the order of floating-point sums (forces agree to ~1e-16
relative at step 0); over 100 velocity-Verlet steps of 2 fs the difference grows with the
system's chaotic divergence but stays many orders of magnitude below 1e-9 Å (the measured
maximum is printed). A wrong halo, a missed edge or a double-counted energy moves atoms by
~1e-3 Å within a few steps, so 1e-9 Å separates rounding from a bug by six orders of magnitude
either way.
"""

from __future__ import annotations

import time

import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from distmlip import DistributedCalculator
from distmlip.testing.structures import fcc_bulk

from support import make_schnet, one_at_a_time

TOL_POS = 1e-9  # Å
TOL_E = 1e-9  # eV


def _thermalize(atoms, temperature_K, seed):
    """Maxwell-Boltzmann momenta with zero total momentum (done by hand: the ASE helper's name
    changed across versions)."""
    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    p = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    p -= masses * p.sum(axis=0) / masses.sum()
    atoms.set_momenta(p)


def _trajectory(atoms, calc, dyn_factory, steps):
    atoms = atoms.copy()
    atoms.calc = calc
    dyn = dyn_factory(atoms)
    record = {"pos": [], "epot": [], "ekin": []}

    def observe():
        record["pos"].append(atoms.get_positions().copy())
        record["epot"].append(atoms.get_potential_energy())
        record["ekin"].append(atoms.get_kinetic_energy())

    dyn.attach(observe, interval=1)
    dyn.run(steps)
    return {k: np.array(v) for k, v in record.items()}


def _compare(a, b, steps):
    assert len(a["pos"]) == len(b["pos"]) == steps + 1
    dpos = np.abs(a["pos"] - b["pos"]).max(axis=(1, 2))
    depot = np.abs(a["epot"] - b["epot"])
    dekin = np.abs(a["ekin"] - b["ekin"])
    for step in range(steps + 1):
        assert dpos[step] <= TOL_POS, f"step {step}: positions differ by {dpos[step]:.2e} Å"
        assert depot[step] <= TOL_E, f"step {step}: potential energy differs by {depot[step]:.2e} eV"
        assert dekin[step] <= TOL_E, f"step {step}: kinetic energy differs by {dekin[step]:.2e} eV"
    return dpos.max(), depot.max()


def test_nve_partitioned_matches_unpartitioned():
    model = make_schnet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    atoms = fcc_bulk(size=5, seed=1)  # 500 atoms
    assert len(atoms) >= 500
    _thermalize(atoms, 300, seed=0)
    steps = 100

    def verlet(a):
        return VelocityVerlet(a, timestep=2.0 * units.fs)

    t0 = time.perf_counter()
    ref = _trajectory(atoms, DistributedCalculator(model, 1), verlet, steps)
    t1 = time.perf_counter()
    calc = DistributedCalculator(model, 4, partitioner="grid", mode="halo")
    got = _trajectory(atoms, calc, verlet, steps)
    t2 = time.perf_counter()
    assert calc.last_plan.num_parts == 4 and all(p.num_owned for p in calc.last_plan.parts)
    dpos, de = _compare(got, ref, steps)
    etot = ref["epot"] + ref["ekin"]
    drift = np.abs(etot - etot[0]).max()
    moved = np.abs(ref["pos"][-1] - ref["pos"][0]).max()
    print(f"\nNVE 500 atoms x {steps} steps: max |dpos| {dpos:.2e} Å, max |dE| {de:.2e} eV, "
          f"Etot drift {drift:.2e} eV, max displacement {moved:.3f} Å; "
          f"unpartitioned {t1 - t0:.1f} s, 4 parts {t2 - t1:.1f} s")
    # the dynamics did something and conserved energy
    assert moved > 0.05
    assert drift < 1e-3 * len(atoms)


def test_nve_extended_and_threaded_match():
    """Shorter runs of the other execution paths: extended mode, and threaded workers."""
    model = make_schnet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    atoms = fcc_bulk(size=4, seed=2)
    _thermalize(atoms, 300, seed=1)
    steps = 20

    def verlet(a):
        return VelocityVerlet(a, timestep=2.0 * units.fs)

    ref = _trajectory(atoms, DistributedCalculator(model, 1), verlet, steps)
    for kwargs in ({"mode": "extended", "partitioner": "metis"},
                   {"mode": "halo", "partitioner": "slab", "device": ["cpu", "cpu"]}):
        got = _trajectory(atoms, DistributedCalculator(model, 4, **kwargs), verlet, steps)
        _compare(got, ref, steps)


def test_langevin_runs_and_matches(schnet_model):
    atoms = fcc_bulk(size=3, seed=3)
    steps = 10

    def langevin(a):
        return Langevin(a, timestep=1.0 * units.fs, temperature_K=300, friction=0.02 / units.fs,
                        fixcm=False, rng=np.random.default_rng(7))

    ref = _trajectory(atoms, DistributedCalculator(schnet_model, 1), langevin, steps)
    got = _trajectory(atoms, DistributedCalculator(schnet_model, 3, partitioner="metis"), langevin, steps)
    _compare(got, ref, steps)
    assert np.abs(ref["pos"][-1] - ref["pos"][0]).max() > 1e-3


def test_bfgs_relaxation(lj_model):
    atoms = fcc_bulk(size=3, seed=4)
    results = []
    for parts in (1, 3):
        a = atoms.copy()
        a.calc = DistributedCalculator(lj_model, parts, partitioner="grid")
        f0 = np.abs(a.get_forces()).max()
        e0 = a.get_potential_energy()
        opt = BFGS(a, logfile=None)
        opt.run(fmax=0.05, steps=60)
        results.append((a.get_positions(), a.get_potential_energy(), opt.get_number_of_steps()))
        assert a.get_potential_energy() < e0
        assert np.abs(a.get_forces()).max() < min(0.05, f0)
    (p1, e1, n1), (p3, e3, n3) = results
    assert n1 == n3
    assert abs(e1 - e3) <= 1e-9 and np.abs(p1 - p3).max() <= 1e-9


def test_npt_barostat_follows_unpartitioned(lj_model):
    """A Berendsen NPT run rescales the cell from the stress: split and whole runs agree in
    positions, cell and energy at every step, and the cell really changes."""
    from ase.md.nptberendsen import NPTBerendsen

    atoms = fcc_bulk(size=3, a=3.5)  # compressed: the barostat must expand the cell
    _thermalize(atoms, 300, seed=4)
    runs = []
    for parts in (1, 3):
        a = atoms.copy()
        a.calc = DistributedCalculator(lj_model, num_parts=parts, partitioner="grid")
        dyn = NPTBerendsen(a, timestep=2 * units.fs, temperature_K=300, pressure_au=0.0,
                           taut=100 * units.fs, taup=200 * units.fs, compressibility_au=1e-2 / units.GPa)
        frames = []
        dyn.attach(lambda: frames.append((a.positions.copy(), a.cell.array.copy(),
                                          a.get_potential_energy())), interval=1)
        dyn.run(20)
        runs.append(frames)
    for (x1, c1, e1), (x2, c2, e2) in zip(*runs, strict=True):
        assert np.abs(x1 - x2).max() <= TOL_POS
        assert np.abs(c1 - c2).max() <= TOL_POS
        assert abs(e1 - e2) <= TOL_E
    assert abs(np.linalg.det(runs[0][-1][1]) - np.linalg.det(runs[0][0][1])) > 1e-3


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1.0)


def test_graph_reuse_equals_fresh_build_every_step():
    """With a skin the graph and plan are kept across MD steps (only edge vectors recomputed) until
    an atom moves more than skin / 2: every step equals a fresh build (skin=0) at 1e-10, through
    several rebuilds and across a cell change (NPT); halo and extended mode, threaded workers."""
    model = make_schnet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=2)
    base = fcc_bulk(size=4, seed=5)
    _thermalize(base, 1500, seed=3)
    for kwargs in ({"mode": "halo", "partitioner": "grid"},
                   {"mode": "extended", "partitioner": "metis"},
                   {"mode": "halo", "partitioner": "slab", "device": ["cpu", "cpu"]}):
        atoms = base.copy()
        atoms.calc = DistributedCalculator(model, 3, skin=0.6, **kwargs)
        fresh = DistributedCalculator(model, 3, skin=0.0, **kwargs)
        dyn = VelocityVerlet(atoms, timestep=4.0 * units.fs)
        worst = []

        def check():
            other = atoms.copy()
            other.calc = fresh
            pairs = [(atoms.get_potential_energy(), other.get_potential_energy()),
                     (atoms.get_forces(), other.get_forces()),
                     (atoms.get_stress(), other.get_stress()),
                     (atoms.get_potential_energies(), other.get_potential_energies())]
            worst.append(max(_rel(a, b) for a, b in pairs))

        dyn.attach(check, interval=1)
        dyn.run(30)
        builds = atoms.calc.graph_builds
        assert fresh.graph_builds == 31  # every step moved the atoms: a fresh build each
        assert 2 < builds < 20, f"{kwargs}: expected several rebuilds in 30 steps, got {builds}"
        # compressing by 15 % brings pairs listed beyond cutoff + skin within the cutoff
        atoms.set_cell(atoms.cell.array @ np.diag([0.85, 1.0, 1.0]), scale_atoms=True)
        check()
        assert atoms.calc.graph_builds == builds + 1, "a large compression must rebuild"
        assert max(worst) <= 1e-10, f"{kwargs}: worst relative difference {max(worst):.2e}"


def test_deformed_cell_reuses_the_graph_exactly():
    """A small deformation of the cell (NPT, cell relaxation) keeps the graph and plan while
    the bound of ``Runner._stale`` holds (every pair within the cutoff is still listed): each
    evaluation equals a fresh build (skin=0) at 1e-10 (energy, forces, stress, per-atom energies),
    in halo and extended mode and one part at a time, and for a slab (whose vacuum vector may change
    freely); a compression beyond the bound rebuilds."""
    model = make_schnet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=4)
    base = fcc_bulk(size=4, seed=6)
    rng = np.random.default_rng(7)
    strains = [np.eye(3) + 0.004 * (e + e.T) for e in rng.uniform(-1, 1, size=(8, 3, 3))]
    moves = [0.04 * rng.uniform(-1, 1, size=(len(base), 3)) for _ in strains]

    def compare(calc, fresh, atoms) -> float:
        other = atoms.copy()
        atoms.calc, other.calc = calc, fresh
        pairs = [(atoms.get_potential_energy(), other.get_potential_energy()),
                 (atoms.get_forces(), other.get_forces()), (atoms.get_stress(), other.get_stress()),
                 (atoms.get_potential_energies(), other.get_potential_energies())]
        return max(_rel(a, b) for a, b in pairs)

    for make in (lambda skin: DistributedCalculator(model, 3, skin=skin),
                 lambda skin: DistributedCalculator(model, 4, skin=skin, mode="extended",
                                                    partitioner="metis"),
                 lambda skin: one_at_a_time(model, 3, skin=skin, device=["cpu", "cpu"])):
        calc, fresh = make(0.6), make(0.0)
        worst = [compare(calc, fresh, base)]
        for strain, move in zip(strains, moves, strict=True):
            atoms = base.copy()
            atoms.set_cell(base.cell.array @ strain, scale_atoms=True)
            atoms.positions += move
            worst.append(compare(calc, fresh, atoms))
        assert calc.graph_builds == 1, f"small deformations rebuilt: {calc.graph_builds} builds"
        assert fresh.graph_builds == len(strains) + 1
        atoms.set_cell(atoms.cell.array @ np.diag([1.0, 0.85, 1.0]), scale_atoms=True)
        worst.append(compare(calc, fresh, atoms))
        assert calc.graph_builds == 2, "a compression beyond the bound must rebuild"
        assert max(worst) <= 1e-10, f"worst relative difference {max(worst):.2e}"

    # a slab (open along z): the in-plane strain counts, the vacuum vector does not
    slab = base.copy()
    slab.pbc = [True, True, False]
    calc, fresh = DistributedCalculator(model, 3, skin=0.6), DistributedCalculator(model, 3, skin=0.0)
    worst = [compare(calc, fresh, slab)]
    for strain in strains[:3]:
        in_plane = np.eye(3)
        in_plane[:2, :2] = strain[:2, :2]  # what a cell filter masked to the surface does
        slab.set_cell(slab.cell.array @ in_plane, scale_atoms=True)
        worst.append(compare(calc, fresh, slab))
    slab.set_cell(slab.cell.array @ np.diag([1.0, 1.0, 3.0]), scale_atoms=False)  # more vacuum
    worst.append(compare(calc, fresh, slab))
    assert calc.graph_builds == 1, f"a slab's small strains rebuilt: {calc.graph_builds} builds"
    slab.set_cell(slab.cell.array @ np.diag([0.85, 1.0, 1.0]), scale_atoms=True)
    worst.append(compare(calc, fresh, slab))
    assert calc.graph_builds == 2, "an in-plane compression beyond the bound must rebuild"
    assert max(worst) <= 1e-10


def test_npt_reuses_the_graph(lj_model):
    """ASE's MTK NPT (cell and positions change every step) with graph reuse equals a fresh build
    every step, split in 3, with far fewer builds than steps."""
    from ase.md.nose_hoover_chain import MTKNPT

    atoms = fcc_bulk(size=3, a=3.5)
    _thermalize(atoms, 300, seed=8)
    from ase.calculators.calculator import Calculator

    class Fresh(Calculator):
        """A new calculator (a fresh build) at every evaluation."""

        implemented_properties = ["energy", "forces", "stress"]
        graph_builds = 0

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            calc = DistributedCalculator(lj_model, num_parts=3)
            calc.calculate(self.atoms.copy(), ["energy", "forces", "stress"])
            self.results = dict(calc.results)
            self.graph_builds += calc.graph_builds

    runs = []
    for calc in (DistributedCalculator(lj_model, num_parts=3, skin=0.5), Fresh()):
        a = atoms.copy()
        a.calc = calc
        dyn = MTKNPT(a, timestep=2 * units.fs, temperature_K=300, pressure_au=1.0 * units.GPa,
                     tdamp=50 * units.fs, pdamp=200 * units.fs)
        frames = []
        dyn.attach(lambda a=a, frames=frames: frames.append(
            (a.positions.copy(), a.cell.array.copy(), a.get_potential_energy(), a.get_stress())),
            interval=1)
        dyn.run(40)
        runs.append((frames, a.calc.graph_builds))
    (reuse, builds), (fresh, fresh_builds) = runs
    assert fresh_builds >= 41 and builds <= 3, (builds, fresh_builds)
    for (x1, c1, e1, s1), (x2, c2, e2, s2) in zip(reuse, fresh, strict=True):
        assert np.abs(x1 - x2).max() <= TOL_POS and np.abs(c1 - c2).max() <= TOL_POS
        assert abs(e1 - e2) <= TOL_E and np.abs(s1 - s2).max() <= 1e-10
    assert abs(np.linalg.det(reuse[-1][1]) - np.linalg.det(reuse[0][1])) > 1e-3
