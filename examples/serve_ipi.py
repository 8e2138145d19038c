"""i-PI drives the dynamics, distmlip evaluates the forces.

i-PI (pip install ipi) owns the integrator and thermostat; distmlip connects to it as a force
client over a unix socket and answers each configuration with energy, forces and virial:

    python examples/serve_ipi.py                       # Langevin NVT of 256 Cu atoms, 20 steps
    python examples/serve_ipi.py --nbeads 4            # path-integral MD (PILE-L): 4 evaluations a step
    python examples/serve_ipi.py --port 31415          # over TCP instead of a unix socket
    mpirun -n 2 python examples/serve_ipi.py --mpi     # the same, one part per rank

The script writes i-PI's input (input.xml, init.extxyz) to --workdir, starts i-PI there, serves
it, and prints i-PI's log of the run. To serve an i-PI you started yourself, run only the call
at the end: ``serve_ipi(calculator, atoms, "unix:NAME")`` (or ``"HOST:PORT"``).
"""

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.io import write

from distmlip import DistributedCalculator
from distmlip.drivers.ipi import serve_ipi
from distmlip.models import SchNet

# i-PI's input.xml: what it writes ({outputs}), the sockets it asks for forces ({forcefields}; i-PI
# sums the forces of every <force> in {forces}), the start (init.extxyz, thermal velocities) and the
# integrator ({dynamics}). tests/cli/test_serve.py fills in the same template.
INPUT = """<simulation verbosity='low' safe_stride='100000'>
  <output prefix='sim'>
{outputs}
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
{forcefields}
  <system>
    <initialize nbeads='{nbeads}'>
      <file mode='ase'>init.extxyz</file>
      <velocities mode='thermal' units='kelvin'>{temperature}</velocities>
    </initialize>
    <forces>{forces}</forces>
    <ensemble><temperature units='kelvin'>{temperature}</temperature></ensemble>
    <motion mode='dynamics'>
      {dynamics}
    </motion>
  </system>
</simulation>
"""
# this example's output: a properties table (sim.out) and a trajectory (sim.pos_0.extxyz)
OUTPUTS = """    <properties stride='1' filename='out'>
      [ step, time{{picosecond}}, temperature{{kelvin}}, potential{{ase}}, conserved{{ase}} ]
    </properties>
    <trajectory filename='pos' stride='{stride}' format='ase'> positions </trajectory>"""
# Langevin NVT (path-integral: PILE-L), 2 fs steps
DYNAMICS = """<dynamics mode='nvt'>
        <timestep units='femtosecond'>2</timestep>
        <thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat>
      </dynamics>"""


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4, help="cubic FCC Cu repetitions (4 atoms each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--partitions", type=int, default=2, help="parts in one process")
    parser.add_argument("--mpi", action="store_true", help="launched by mpirun: one part per rank")
    parser.add_argument("--workdir", default=None, help="where i-PI runs (default: a temporary folder)")
    parser.add_argument("--port", type=int, default=None,
                        help="talk over TCP on localhost:PORT instead of a unix socket")
    parser.add_argument("--nbeads", type=int, default=1, help="path-integral beads (1: classical)")
    args = parser.parse_args()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((args.reps,) * 3)
    atoms.rattle(0.02, seed=0)
    model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0)
    calc = DistributedCalculator(model, num_parts=None if args.mpi else args.partitions)
    name = f"distmlip-example-{uuid.uuid4().hex[:8]}"  # the socket file is /tmp/ipi_<name>
    if args.port is None:
        forcefield = f"  <ffsocket name='distmlip' mode='unix'><address>{name}</address></ffsocket>"
    else:
        forcefield = (f"  <ffsocket name='distmlip' mode='inet'><address>localhost</address>"
                      f"<port>{args.port}</port></ffsocket>")
    server = None
    if calc.rank == 0:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distmlip-ipi-"))
        write(workdir / "init.extxyz", atoms)
        (workdir / "input.xml").write_text(INPUT.format(
            outputs=OUTPUTS.format(stride=max(args.steps // 4, 1)), steps=args.steps,
            forcefields=forcefield, forces="<force forcefield='distmlip'/>", nbeads=args.nbeads,
            temperature=args.temperature, dynamics=DYNAMICS))
        ipi = Path(sys.executable).parent / "i-pi"
        server = subprocess.Popen([str(ipi), "input.xml"], cwd=workdir, stdout=open(workdir / "ipi.log", "w"),  # noqa: SIM115 - open while i-PI runs
                                  stderr=subprocess.STDOUT)
        print(f"i-PI started in {workdir}; {len(atoms)} atoms, {calc.num_parts} part(s), "
              f"backend {calc.backend}", flush=True)
    if calc.world_size > 1:  # every rank must connect to the same socket name: take rank 0's
        import torch.distributed as dist

        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    t0 = time.perf_counter()
    try:
        # i-PI needs a moment to open its socket: wait for it up to 60 s
        address = f"unix:{name}" if args.port is None else f"localhost:{args.port}"
        served = serve_ipi(calc, atoms, address, timeout=60)
    except BaseException:
        if server is not None:
            server.kill()
        raise
    if calc.rank != 0:
        return
    status = server.wait(60)
    seconds = time.perf_counter() - t0
    print(f"served {served} force evaluations in {seconds:.1f} s ({seconds / max(served, 1):.2f} s each)")
    if status != 0:
        sys.exit(f"i-PI failed with status {status}; see {workdir / 'ipi.log'}")
    table = np.loadtxt(workdir / "sim.out", ndmin=2)
    print(" step   time/ps      T/K     Epot/eV     conserved/eV")
    for step, t, temp, epot, conserved in table:
        print(f"{int(step):5d} {t:9.4f} {temp:8.1f} {epot:12.5f} {conserved:14.5f}")
    print(f"i-PI finished: log {workdir / 'sim.out'}, trajectory {workdir / 'sim.pos_0.extxyz'}")


if __name__ == "__main__":
    main()
