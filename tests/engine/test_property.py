"""Property-based invariance (issue 10, section 4), with hypothesis.

Random cells (cubic, triclinic, heavily skewed, smaller than the cutoff, large, none), random
periodicity, compositions, atom counts (1-400), cutoffs, layer counts, partitioners, part counts
and modes:

- the split result equals the unsplit one (LennardJones and SchNet, float64, ``rel_err`` <= 1e-10
  for energy, forces, per-atom energies and stress);
- LennardJones equals ``ase.calculators.lj.LennardJones(epsilon, sigma, rc=cutoff, smooth=False)``
  (the same truncated-and-shifted potential; tolerance 1e-8 as in tests/engine/test_equivalence.py);
- a calculator that built its graph (with a random skin) on a system and is then given the system
  strained (random 3x3 deformation of up to 6 %) with atoms moved (up to 0.3 Å) equals a new
  calculator built on the strained system, whether it kept its graph (``Runner._stale``'s bound)
  or rebuilt.

Inputs the calculator rightly refuses are avoided by construction: cells are lower-triangular with
diagonal entries >= 2 Å (never singular; no lattice vector shorter than 2 Å, so no atom is close
to its own image), every system keeps at least one atom, and atoms closer than a drawn minimum
distance (0.05-1.8 Å, far above the 0.001 Å refusal) to an earlier atom or any periodic image of it
are dropped before the system is built.

The default suite runs a few examples of each property on systems of at most ``FAST_MAX_ATOMS``
atoms, the same ones wherever the file lies (``@seed(FAST_SEED)``).
The deep profile (``-m slow``) runs ``PROPERTY_DEEP_EXAMPLES`` examples per property (default
1,000: five properties, 5,000 cases, within test-all's 45 minutes on 2 cores; the 2,600-3,000-case
runs of every property are recorded in BENCHMARKS.md, and a larger value runs more)::

    OMP_NUM_THREADS=1 python -m pytest -q -m slow tests/engine/test_property.py \
        --hypothesis-show-statistics
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list
from hypothesis import HealthCheck, assume, event, given, seed, settings
from hypothesis import strategies as st

from distmlip import DistributedCalculator
from distmlip.models import LennardJones
from distmlip.testing import evaluate, rel_err

from support import LJ_PARAMS, make_schnet

RTOL_SPLIT = 1e-10
RTOL_ASE = 1e-8
ELEMENTS = (1, 3, 6, 8, 14, 26, 29, 47, 79, 92)
DEEP_EXAMPLES = int(os.environ.get("PROPERTY_DEEP_EXAMPLES", "1000"))

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
FAST = settings(max_examples=25, **_COMMON)
#: the default suite's seed: hypothesis's pytest plugin mixes a test's node id into its derandomized
#: seed, so without a fixed seed moving or renaming the file changes the examples drawn (and once
#: turned a 2 s test into a 30-45 s one)
FAST_SEED = 0
DEEP = settings(max_examples=DEEP_EXAMPLES, **_COMMON)


# ---------------------------------------------------------------------------------- strategies

@st.composite
def cells(draw):
    """A lower-triangular cell: diagonal in [2, 40] Å, off-diagonals up to 1.5x the diagonal
    (skewed), or orthorhombic/cubic. Full rank by construction."""
    kind = draw(st.sampled_from(["cubic", "orthorhombic", "triclinic", "skewed"]))
    lengths = st.floats(2.0, 40.0, allow_nan=False)
    if kind == "cubic":
        a = draw(lengths)
        return np.diag([a, a, a])
    diag = np.array([draw(lengths) for _ in range(3)])
    cell = np.diag(diag)
    if kind == "orthorhombic":
        return cell
    skew = 0.5 if kind == "triclinic" else 1.5
    for i, j in ((1, 0), (2, 0), (2, 1)):
        cell[i, j] = draw(st.floats(-skew, skew, allow_nan=False)) * diag[j]
    return cell


@st.composite
def systems(draw, max_atoms: int = 400, min_dist_range=(0.05, 1.8)):
    """An ``ase.Atoms`` with 1..max_atoms atoms, a random cell and periodicity, no two atoms (or
    an atom and an image) closer than a drawn minimum distance."""
    cell = draw(cells())
    pbc = np.array(draw(st.tuples(st.booleans(), st.booleans(), st.booleans())))
    n = draw(st.integers(1, max_atoms))
    seed = draw(st.integers(0, 2**32 - 1))
    num_species = draw(st.integers(1, 4))
    species = draw(st.lists(st.sampled_from(ELEMENTS), min_size=num_species,
                            max_size=num_species, unique=True))
    min_dist = draw(st.floats(*min_dist_range, allow_nan=False))
    unwrapped = draw(st.booleans())          # periodic coordinates outside [0, 1)
    no_cell = not pbc.any() and draw(st.booleans())  # a molecule: zero cell

    # non-periodic directions may stick out of the cell; periodic ones too if "unwrapped"
    spread = np.where(pbc, 3.0 if unwrapped else 1.0, 1.6)
    # no more atoms than could fit at min_dist apart (keeps the filter below cheap)
    room = abs(np.linalg.det(cell)) * np.prod(np.where(pbc, 1.0, spread)) / min_dist**3
    n = int(min(n, max(1, 2 * room)))
    rng = np.random.default_rng(seed)
    frac = rng.random((n, 3))
    frac = frac * spread - np.where(pbc, 1.0 if unwrapped else 0.0, 0.3)
    atoms = Atoms(numbers=rng.choice(species, size=n), positions=frac @ cell, cell=cell, pbc=pbc)

    # drop every atom closer than min_dist to an earlier kept atom (or any image of one)
    i, j = neighbor_list("ij", atoms, min_dist)
    assert not np.any(i == j), "a lattice vector shorter than min_dist"  # diag >= 2 > min_dist
    keep = np.ones(n, dtype=bool)
    for a, b in sorted(zip(np.minimum(i, j), np.maximum(i, j), strict=True)):
        if keep[a] and keep[b]:
            keep[b] = False
    atoms = atoms[keep]
    if no_cell:
        atoms.cell[:] = 0.0
    return atoms


splits = st.tuples(
    st.sampled_from(["grid", "slab", "metis"]),
    st.one_of(st.integers(1, 8), st.sampled_from([16, 33, 500])),
    st.sampled_from(["halo", "extended"]),
)

lj_params = st.fixed_dictionaries({
    "epsilon": st.one_of(st.just(LJ_PARAMS["epsilon"]), st.floats(0.01, 2.0)),
    "sigma": st.one_of(st.just(LJ_PARAMS["sigma"]), st.floats(0.8, 3.0)),
    "cutoff": st.one_of(st.just(LJ_PARAMS["cutoff"]), st.floats(1.5, 9.0)),
})

schnet_params = st.fixed_dictionaries({
    "cutoff": st.floats(1.5, 7.0),
    "num_interactions": st.integers(1, 4),
    "seed": st.integers(0, 3),
})


# ---------------------------------------------------------------------------------- checks

def _calc(model, parts, partitioner="grid", mode="halo", **options):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='local' under")
        return DistributedCalculator(model, num_parts=parts, partitioner=partitioner,
                                     mode=mode, backend="local", **options)


def _describe(atoms):
    return (f"{len(atoms)} atoms, pbc={atoms.pbc.tolist()}, cell={np.round(atoms.cell[:], 4).tolist()}, "
            f"numbers={sorted(set(atoms.numbers.tolist()))}")


def _assert_close(got, ref, rtol, what, atoms):
    assert set(got) == set(ref), f"{what}: quantities {sorted(set(got) ^ set(ref))} differ"
    expected = {"energy", "forces", "energies"} | ({"stress"} if atoms.cell.rank == 3 else set())
    assert set(got) == expected
    for q in got:
        err = rel_err(got[q], ref[q])
        assert err <= rtol, f"{what}: {q} relative error {err:.3e} > {rtol:.0e} on {_describe(atoms)}"


#: at most this many edges (estimated) per evaluation: the first 10,000-case profile was OOM-killed
#: (22 GB) by SchNet on 143 atoms in 181 Å^3 with a 6.3 Å cutoff split into 500 parts in extended
#: mode: every part's halo is the whole system, 500 copies of its 120,000 edges
MAX_EDGES = 1_000_000


def _not_too_dense(atoms, cutoff, split):
    """Skip (``assume``) cases whose evaluation would hold more than ``MAX_EDGES`` edges: n x the
    number of atoms (images included) in a sphere of radius ``cutoff`` at the system's density (every
    pair of a molecule without a cell), times the copies extended mode makes (up to one per part)."""
    _, parts, mode = split
    n = len(atoms)
    volume = abs(np.linalg.det(atoms.cell[:])) if atoms.cell.rank == 3 else 0.0
    per_atom = n / volume * 4.0 / 3.0 * np.pi * cutoff**3 if volume > 0 else n
    copies = min(parts, n) if mode == "extended" else 1
    assume(n * per_atom * copies <= MAX_EDGES)


def _check_split(model, atoms, split):
    partitioner, parts, mode = split
    _not_too_dense(atoms, model.cutoff, split)
    ref = evaluate(_calc(model, 1), atoms)
    got = evaluate(_calc(model, parts, partitioner, mode), atoms)
    _assert_close(got, ref, RTOL_SPLIT,
                  f"{type(model).__name__} split {partitioner}/{parts}/{mode} vs unsplit", atoms)


def _check_lj_split(params, atoms, split):
    _check_split(LennardJones(**params), atoms, split)


def _check_schnet_split(params, atoms, split):
    model = make_schnet(cutoff=params["cutoff"], num_interactions=params["num_interactions"],
                        hidden_channels=8, seed=params["seed"])
    _check_split(model, atoms, split)


def _pair_at_cutoff(atoms, cutoff, tol=1e-9):
    """Whether some pair (or atom and image) is within ``tol * cutoff`` of the cutoff."""
    d = neighbor_list("d", atoms, cutoff * (1 + tol))
    return bool(np.any(np.abs(d - cutoff) <= tol * cutoff))


def _check_lj_ase(params, atoms, split, skip_near_cutoff=True):
    from ase.calculators.lj import LennardJones as AseLJ

    partitioner, parts, mode = split
    _not_too_dense(atoms, params["cutoff"], split)
    # The truncated LJ force jumps at rc, so a pair within rounding of rc is counted or not
    # depending on how its distance is rounded, and ASE (positions + offsets @ cell) and distmlip
    # (pos[s] - pos[r] + shift @ cell) round differently. Found by the deep profile: one H atom
    # periodic along x (cell 2.625 Å = rc) at x = 2.4099...: its two images are rc and rc + 1 ulp
    # away; ASE counts one (a net force on a lone atom), distmlip both (zero force). Such inputs
    # compare rounding, not physics, and are skipped (~0.4% of cases); a pair exactly at rc,
    # representable both ways, is compared in test_lennard_jones_pair_exactly_at_cutoff.
    if skip_near_cutoff:
        assume(not _pair_at_cutoff(atoms, params["cutoff"]))
    ref = evaluate(AseLJ(epsilon=params["epsilon"], sigma=params["sigma"], rc=params["cutoff"],
                         smooth=False), atoms)
    got = evaluate(_calc(LennardJones(**params), parts, partitioner, mode), atoms)
    _assert_close(got, ref, RTOL_ASE, f"LennardJones {partitioner}/{parts}/{mode} vs ASE", atoms)


deformations = st.fixed_dictionaries({
    "strain": st.lists(st.floats(-0.06, 0.06), min_size=9, max_size=9),
    "move": st.floats(0.0, 0.3),
    "skin": st.floats(0.05, 1.5),
    "seed": st.integers(0, 2**32 - 1),
})


def _check_deformed_reuse(params, atoms, split, deformation):
    """Build on ``atoms``, then evaluate ``atoms`` deformed: equal to a fresh build there."""
    partitioner, parts, mode = split
    _not_too_dense(atoms, params["cutoff"] + deformation["skin"], split)
    model = LennardJones(**params)
    kept = _calc(model, parts, partitioner, mode, skin=deformation["skin"])
    evaluate(kept, atoms)
    strained = atoms.copy()
    strain = np.eye(3) + np.reshape(deformation["strain"], (3, 3))
    strained.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
    rng = np.random.default_rng(deformation["seed"])
    strained.positions += deformation["move"] * rng.uniform(-1, 1, size=(len(atoms), 3)) / np.sqrt(3)
    # the strain and moves may bring two atoms within the calculator's refusal distance: skip
    assume(len(atoms) < 2 or neighbor_list("d", strained, 0.01).size == 0)
    got = evaluate(kept, strained)
    event("kept the graph" if kept.graph_builds == 1 else "rebuilt")
    ref = evaluate(_calc(model, 1), strained)
    _assert_close(got, ref, RTOL_SPLIT, f"LennardJones {partitioner}/{parts}/{mode}, skin "
                  f"{deformation['skin']:.3f}, deformed, vs a fresh build", strained)


# LJ with sigma up to 3 Å: keep atoms >= 0.6 Å apart so that energies stay below ~1e9 eV, where
# ASE's own float64 sums remain meaningful at 1e-8.
LJ_SYSTEMS = systems(min_dist_range=(0.6, 1.8))
SCHNET_SYSTEMS = systems(min_dist_range=(0.05, 1.8))
SMALL_SYSTEMS = systems(max_atoms=12, min_dist_range=(0.05, 1.8))  # more parts than atoms
# the default suite's systems: at most FAST_MAX_ATOMS atoms, so that its cost is bounded whatever
# the examples drawn (the deep profile keeps up to 400)
FAST_MAX_ATOMS = 100
FAST_LJ_SYSTEMS = systems(max_atoms=FAST_MAX_ATOMS, min_dist_range=(0.6, 1.8))
FAST_SCHNET_SYSTEMS = systems(max_atoms=FAST_MAX_ATOMS, min_dist_range=(0.05, 1.8))


# ---------------------------------------------------------------------------------- default suite

@FAST
@seed(FAST_SEED)
@given(params=lj_params, atoms=FAST_LJ_SYSTEMS, split=splits)
def test_lennard_jones_split_equals_unsplit(params, atoms, split):
    _check_lj_split(params, atoms, split)


@FAST
@seed(FAST_SEED)
@given(params=schnet_params, atoms=FAST_SCHNET_SYSTEMS, split=splits)
def test_schnet_split_equals_unsplit(params, atoms, split):
    _check_schnet_split(params, atoms, split)


@FAST
@seed(FAST_SEED)
@given(params=schnet_params, atoms=SMALL_SYSTEMS, split=splits)
def test_schnet_split_equals_unsplit_few_atoms(params, atoms, split):
    _check_schnet_split(params, atoms, split)


@FAST
@seed(FAST_SEED)
@given(params=lj_params, atoms=FAST_LJ_SYSTEMS, split=splits)
def test_lennard_jones_equals_ase(params, atoms, split):
    _check_lj_ase(params, atoms, split)


@FAST
@seed(FAST_SEED)
@given(params=lj_params, atoms=FAST_LJ_SYSTEMS, split=splits, deformation=deformations)
def test_deformed_cell_reuse_equals_fresh_build(params, atoms, split, deformation):
    _check_deformed_reuse(params, atoms, split, deformation)


def test_lennard_jones_pair_exactly_at_cutoff():
    """Found by the deep profile: one H atom, cell 2 Å, periodic along z only, rc = 2.0 Å — the atom
    and its images exactly rc apart. ASE's LennardJones keeps such a pair (it zeroes r > rc); so does
    distmlip's (the model declares rc widened by 1e-12 as its graph radius and keeps r**2 <= rc**2).
    Before that fix the forces/stress of such a pair differed (stress rel_err 1.0)."""
    atoms = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=[2.0, 2.0, 2.0],
                  pbc=[False, False, True])
    _check_lj_ase({"epsilon": 0.4, "sigma": 2.3, "cutoff": 2.0}, atoms, ("grid", 1, "halo"),
                  skip_near_cutoff=False)
    stress = _calc(LennardJones(epsilon=0.4, sigma=2.3, cutoff=2.0), 1, "grid", "halo")
    atoms.calc = stress
    assert abs(atoms.get_stress()[2]) > 1e-3  # the pair at the cutoff is counted


# ---------------------------------------------------------------------------------- deep profile

@pytest.mark.slow
@DEEP
@given(params=lj_params, atoms=LJ_SYSTEMS, split=splits)
def test_deep_lennard_jones_split_equals_unsplit(params, atoms, split):
    _check_lj_split(params, atoms, split)


@pytest.mark.slow
@DEEP
@given(params=schnet_params, atoms=SCHNET_SYSTEMS, split=splits)
def test_deep_schnet_split_equals_unsplit(params, atoms, split):
    _check_schnet_split(params, atoms, split)


@pytest.mark.slow
@DEEP
@given(params=schnet_params, atoms=SMALL_SYSTEMS, split=splits)
def test_deep_schnet_split_equals_unsplit_few_atoms(params, atoms, split):
    _check_schnet_split(params, atoms, split)


@pytest.mark.slow
@DEEP
@given(params=lj_params, atoms=LJ_SYSTEMS, split=splits)
def test_deep_lennard_jones_equals_ase(params, atoms, split):
    _check_lj_ase(params, atoms, split)


@pytest.mark.slow
@DEEP
@given(params=lj_params, atoms=LJ_SYSTEMS, split=splits, deformation=deformations)
def test_deep_deformed_cell_reuse_equals_fresh_build(params, atoms, split, deformation):
    _check_deformed_reuse(params, atoms, split, deformation)
