"""Serve a ``DistributedCalculator``'s forces to i-PI (the i-PI socket protocol; ``serve_ipi``).
 i-PI, and any code that speaks its protocol, is the
*server*: it owns the dynamics (thermostats, path integrals, barostats) and sends positions and
cell to *clients*, which answer with energy, forces and virial. ``serve_ipi`` makes distmlip such a
client. The wire format and the unit conversions (i-PI talks in Bohr and Hartree) are ASE's
``ase.calculators.socketio.IPIProtocol``; the loop around it is ASE's ``SocketClient`` loop, with
what distmlip adds: a bounded connection (retried while the server is not up yet), clear errors
naming the address, a check of the atom count, and the multi-process case — under ``mpirun`` /
``torchrun`` rank 0 alone talks to the socket and each step it broadcasts the positions and cell
(or the end of the run, or its own failure) to every rank, so every rank evaluates its parts and
none is left waiting.

The virial sent is i-PI's, ``-dE/d(strain) = -volume * stress`` (ASE's stress sign), and only for
periodic systems with a full-rank cell; zero otherwise.

LAMMPS' ``fix ipi`` makes LAMMPS an i-PI *client* too, so LAMMPS and distmlip meet under an
i-PI server, which sums the forces of both (see docs/serve.md); for LAMMPS integrating with
distmlip's forces in this process see ``distmlip.drivers.lammps``.
"""

from __future__ import annotations

import datetime
import math
import socket
import time
from dataclasses import dataclass

import numpy as np

from ..graph.neighbors import as_ase_atoms

__all__ = ["UNIX_PREFIX", "IpiAddress", "parse_address", "serve_ipi"]

#: Where a ``unix:NAME`` socket lives: i-PI and LAMMPS ``fix ipi`` put it at ``/tmp/ipi_NAME``.
UNIX_PREFIX = "/tmp/ipi_"

#: How long the other ranks wait for rank 0's next step (it waits on the server meanwhile).
_FOLLOW_TIMEOUT = datetime.timedelta(hours=24)

# control codes rank 0 broadcasts before each step
_EVALUATE, _EXIT, _ABORT = 0.0, 1.0, 2.0


@dataclass(frozen=True)
class IpiAddress:
    """Where an i-PI server listens.

    Attributes:
        text: the address as given (``HOST:PORT`` or ``unix:NAME``).
        host: the host name or IP of an INET socket (``None`` for a unix socket).
        port: the TCP port, 1-65535 (``None`` for a unix socket).
        path: the socket file of a unix socket: ``/tmp/ipi_NAME`` as i-PI and LAMMPS name it, or
            ``NAME`` itself if it is an absolute path (``None`` for an INET socket).
    """

    text: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def family(self) -> int:
        return socket.AF_UNIX if self.path is not None else socket.AF_INET

    def __str__(self) -> str:
        return f"{self.text} (socket file {self.path})" if self.path is not None else self.text


def parse_address(address: str) -> IpiAddress:
    """Parse ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) or ``unix:NAME``; raise ``ValueError``
    ``address: expected HOST:PORT or unix:NAME, got ...`` otherwise."""

    def bad(why: str) -> ValueError:
        return ValueError(f"address: expected HOST:PORT or unix:NAME (for example localhost:31415 "
                          f"or unix:distmlip), got {address!r}{why}")

    if not isinstance(address, str):
        raise bad(f" of type {type(address).__name__}")
    if address.startswith("unix:"):
        name = address[len("unix:"):]
        if not name or any(c.isspace() for c in name):
            raise bad(": the socket name is empty or has spaces")
        path = name if name.startswith("/") else UNIX_PREFIX + name
        if len(path.encode()) > 107:
            raise bad(f": the socket file {path!r} is longer than the 107 bytes a unix socket "
                      f"path may have")
        return IpiAddress(text=address, path=path)
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise bad("")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host):
        raise bad(": empty host")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise bad(f": the port must be an integer from 1 to 65535, got {port!r}")
    return IpiAddress(text=address, host=host, port=int(port))


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) \
            or not 0 < timeout < math.inf:
        raise ValueError(f"timeout: expected None or a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def _connect(where: IpiAddress, timeout: float | None) -> socket.socket:
    """Connect to the server; with a timeout, retry while it is not listening yet."""
    deadline = None if timeout is None else time.monotonic() + timeout
    target = where.path if where.path is not None else (where.host, where.port)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise ConnectionError(
                f"address: no i-PI server accepted a connection at {where} within the timeout of "
                f"{timeout:g} s; start the server (i-pi input.xml) first, or check the address")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if where.path is not None else None
        try:
            if sock is not None:
                sock.settimeout(left)
                sock.connect(target)
            else:
                sock = socket.create_connection(target, timeout=left)
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = exc
        if isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
            if deadline is None:
                raise ConnectionError(
                    f"address: no i-PI server listens at {where} ({type(error).__name__}); start "
                    f"the server first, or pass a timeout to wait for it") from None
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        elif isinstance(error, socket.gaierror):
            raise ConnectionError(f"address: cannot resolve the host of {where} ({error})") from None
        elif isinstance(error, TimeoutError):
            raise ConnectionError(
                f"address: the connection to {where} timed out"
                f"{'' if timeout is None else f' after {timeout:g} s'}; check that the server is "
                f"reachable") from None
        else:
            raise ConnectionError(f"address: cannot connect to {where}: {error}") from None


class _Control:
    """Rank 0's per-step message to the other ranks: ``[code, cell (9), positions (3N)]``,
    broadcast in place on a gloo group of its own (a long timeout: the other ranks wait there
    while rank 0 waits on the server)."""

    def __init__(self, calculator, natoms: int):
        self.buffer = np.zeros(10 + 3 * natoms)
        self.group = None
        if getattr(calculator, "world_size", 1) > 1:  # any ASE calculator serves in one process
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=_FOLLOW_TIMEOUT)

    def send(self, code: float, cell=None, positions=None) -> None:
        self.buffer[0] = code
        if cell is not None:
            self.buffer[1:10] = np.ravel(cell)
            self.buffer[10:] = np.ravel(positions)
        self._broadcast()

    def receive(self) -> float:
        self._broadcast()
        return float(self.buffer[0])

    def _broadcast(self) -> None:
        if self.group is None:
            return
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.from_numpy(self.buffer), src=0, group=self.group)


def _evaluate(atoms, buffer: np.ndarray):
    """Set ``atoms`` to the step in ``buffer`` and evaluate: energy (eV), forces (eV/Å), virial
    (eV). Every rank holds the same atoms, so ASE's cache decides the same everywhere."""
    atoms.set_cell(buffer[1:10].reshape(3, 3))
    atoms.positions[:] = buffer[10:].reshape(-1, 3)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    if atoms.cell.rank == 3 and atoms.pbc.any():
        virial = -atoms.get_volume() * atoms.get_stress(voigt=False)
    else:
        virial = np.zeros((3, 3))
    return energy, forces, virial


def serve_ipi(calculator, atoms, address: str, *, timeout: float | None = None,
              on_step=None) -> int:
    """Answer an i-PI server's force requests with ``calculator`` until it ends the run.

    Connects to the server at ``address`` (``HOST:PORT`` or ``unix:NAME``, the socket file
    ``/tmp/ipi_NAME`` as i-PI and LAMMPS name it), then evaluates every configuration the server
    sends — positions and cell replace those of ``atoms``; species, atom count and periodicity
    stay ``atoms``'s — and returns energy, forces and virial. Returns the number of evaluations
    served once the server sends EXIT or closes the connection.

    Under ``mpirun``/``torchrun`` (a calculator with ``backend`` torch) call it on every rank with
    the same structure: rank 0 talks to the server and each step broadcasts positions and cell,
    every rank evaluates its parts, and every rank returns the same count. If rank 0 fails (lost
    connection, protocol error), the other ranks raise ``RuntimeError`` instead of waiting.

    Args:
        calculator: a ``distmlip.DistributedCalculator`` (any ASE calculator works in one process).
        atoms: the structure i-PI simulates (``ase.Atoms`` or pymatgen), in i-PI's atom order;
            not modified (a copy is evaluated).
        address: ``HOST:PORT`` or ``unix:NAME``.
        timeout: seconds to wait for the server — to accept the connection (retried while it
            is not listening yet) and then for each of its messages. ``None`` (default): one
            connection attempt, then wait as long as the server takes.
        on_step: called on rank 0 after each evaluation as ``on_step(count, energy)`` (a sign
            of life: a progress bar); ``on_step(0, None)`` once connected.

    Raises:
        ValueError: a malformed address or timeout, or a server sending another atom count.
        ConnectionError: nothing listening at the address (within ``timeout``).
        TimeoutError: the server was silent for longer than ``timeout`` mid-run.
    """
    where = parse_address(address)
    timeout = _check_timeout(timeout)
    atoms = as_ase_atoms(atoms).copy()
    atoms.calc = calculator
    control = _Control(calculator, len(atoms))
    rank = getattr(calculator, "rank", 0)
    if rank != 0:
        return _follow(atoms, control)
    return _lead(atoms, control, where, timeout, on_step)


def _follow(atoms, control: _Control) -> int:
    served = 0
    while True:
        code = control.receive()
        if code == _EXIT:
            return served
        if code == _ABORT:
            raise RuntimeError("serve_ipi: rank 0 stopped serving with an error (its message is on "
                               "its stderr); this rank stops too")
        _evaluate(atoms, control.buffer)
        served += 1


def _lead(atoms, control: _Control, where: IpiAddress, timeout: float | None, on_step=None) -> int:
    from ase.calculators.socketio import IPIProtocol

    try:
        sock = _connect(where, timeout)
    except BaseException:
        control.send(_ABORT)
        raise
    session = _Session(IPIProtocol(sock), atoms, control, where, timeout)
    session.on_step = on_step
    if on_step is not None:
        on_step(0, None)
    try:
        return session.run()
    except BaseException:
        # The other ranks wait for the next step unless the failure came from inside an
        # evaluation, where they fail too (the calculator's collectives time out).
        if not session.told and not session.evaluating:
            try:
                control.send(_ABORT)
            except Exception:  # noqa: BLE001, S110 - the original error matters more
                pass
        raise
    finally:
        sock.close()


class _Session:
    """Rank 0's side of one connection: the client loop of ASE's ``SocketClient.irun``, with
    the other ranks told of every step and of the end."""

    def __init__(self, protocol, atoms, control: _Control, where: IpiAddress, timeout: float | None):
        self.protocol, self.atoms, self.control = protocol, atoms, control
        self.where, self.timeout = where, timeout
        self.told = self.evaluating = False
        self.served = 0
        self.on_step = None

    def run(self) -> int:
        from ase.calculators.socketio import SocketClosed

        try:
            return self._loop()
        except (SocketClosed, TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            if self.evaluating:  # the calculator's own error: not the socket's
                raise
            if isinstance(exc, SocketClosed):
                raise ConnectionError(f"address: the i-PI server at {self.where} closed the "
                                      f"connection in the middle of a message") from None
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"address: the i-PI server at {self.where} sent nothing for "
                                   f"{self.timeout:g} s (the timeout); it may have hung or died") from None
            if isinstance(exc, UnicodeDecodeError):
                raise RuntimeError(f"address: the server at {self.where} sent a message header that "  # noqa: TRY004
                                   f"is not ASCII: not the i-PI protocol") from None
            raise ConnectionError(f"address: lost the connection to the i-PI server at {self.where} "
                                  f"({type(exc).__name__}: {exc})") from None

    def _loop(self) -> int:
        from ase.calculators.socketio import SocketClosed

        protocol, atoms, state, result = self.protocol, self.atoms, "READY", None
        while True:
            try:
                message = protocol.recvmsg().upper()
            except SocketClosed:
                message = "EXIT"  # the server closed the connection between steps: the run is over
            if message == "EXIT":
                self.told = True
                self.control.send(_EXIT)
                return self.served
            if message == "STATUS":
                protocol.sendmsg(state)
            elif message == "INIT":
                protocol.recvinit()  # bead index and an init string: nothing to set up
                state = "READY"
            elif message == "POSDATA" and state == "READY":
                cell, _, positions = protocol.recvposdata()
                if len(positions) != len(atoms):
                    raise ValueError(
                        f"atoms: expected the server at {self.where} to send the {len(atoms)} "
                        f"atoms of the structure served, got {len(positions)}; give serve_ipi the "
                        f"structure the server simulates, in its atom order")
                self.control.send(_EVALUATE, cell, positions)
                self.evaluating = True
                result = _evaluate(atoms, self.control.buffer)
                self.evaluating = False
                self.served += 1
                if self.on_step is not None:
                    self.on_step(self.served, float(result[0]))
                state = "HAVEDATA"
            elif message == "GETFORCE" and state == "HAVEDATA":
                protocol.sendforce(*result)
                state = "READY"
            else:
                raise RuntimeError(f"address: the server at {self.where} sent {message!r} while "
                                   f"this client was {state}: not the i-PI protocol")
