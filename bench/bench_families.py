"""The newer model families (matgl TensorNet and M3GNet, Orb v3, fairchem eSCN-MD (UMA), MatterSim)
through distmlip against each package's own ASE calculator: time and peak memory on one system of
a few hundred atoms.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_families.py [--families orb uma] [--repeats 3]

Random weights at about the published models' sizes (the pretrained weights download at run time
and are not reachable here; time and memory do not depend on the values of the weights), float32,
one torch thread per process. For each family and configuration, in a fresh process (mpirun: 2
fresh processes, one part each): build the model and the calculator, one warm-up energy + forces
+ stress call, then ``--repeats`` timed calls, each on a freshly rattled copy of the structure (the
same structures in every configuration). Configurations: the package's own calculator; distmlip in
one process with 1 part and with 4 parts (evaluated together as one union graph); ``mpirun -n 2``.
Time = the best timed call (mpirun: the slowest rank's), cpu = that call's CPU time of the process
(mpirun: the largest rank's), peak = the process's ``VmHWM`` (mpirun: the largest rank's and the sum
over ranks). ``ΔE`` is the largest energy difference per atom from the package's calculator over
the calls (float32: agreement at float32 precision is the expectation; the exact float64 checks are
in the tests).

The machine's 2 cores are shared: the 1-minute load average is recorded per row and ``uptime``
before and after the run. Wall-time ratios under load are unreliable; the CPU time is much less
sensitive (it does not count time waiting for a core, nor for a peer rank).

Writes a section to bench/results/families.md (``--output`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

RESULT = ROOT / "bench" / "results" / "families.md"

#: family: what is built (written into the results)
FAMILIES = {
    "tensornet": "matgl TensorNet (units 64, 2 blocks, 32 RBF, 5 Å; matgl's TensorNet-MatPES size), "
                 "`PESCalculator`",
    "m3gnet": "matgl M3GNet (64 units, 3 blocks, max_n = max_l = 3, 5 Å, three-body 4 Å), "
              "`PESCalculator`",
    "orb": "Orb v3 conservative (latent 256, MLP 1024, 5 message-passing steps, 6 Å, 20 neighbours: "
           "orb-v3-conservative-20's architecture), `ORBCalculator`",
    "uma": "fairchem eSCN-MD mixture of experts (UMA layout: 64 sphere channels, lmax = mmax = 2, "
           "4 blocks, 8 experts unmerged, 6 Å), a random-weight checkpoint in an `MLIPPredictUnit` "
           "with fairchem's `InferenceSettings()` defaults (experts not merged, activation "
           "checkpointing on), `FAIRChemCalculator` (task omat); distmlip wraps that calculator",
    "mattersim": "MatterSim M3GNet (128 units, 4 blocks, max_n = max_l = 4, 5 Å, three-body 4 Å: "
                 "MatterSim-v1-1M's size), `MatterSimCalculator`",
}
# (label, launcher, parts): launcher "package" (the package's calculator), "local" (distmlip in
# one process) or "mpi" (mpirun -n parts, one part per rank)
CONFIGS = [("package calculator", "package", 1), ("distmlip 1 part", "local", 1),
           ("distmlip 4 parts", "local", 4), ("distmlip mpirun -n 2", "mpi", 2)]
ELEMENTS = ("Li", "O")


def structure(size: tuple, seed: int):
    """Li2O (antifluorite), ``size`` conventional cells (12 atoms each), rattled."""
    from distmlip.testing.adapters import oxide

    return oxide(repeat=size, rattle=0.08, seed=seed)


def build(family: str, workdir: Path):
    """(the package's ASE calculator, distmlip's wrapped model) with random weights (seed 0)."""
    import warnings

    import torch

    import distmlip

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if family in ("tensornet", "m3gnet"):
        from matgl.apps.pes import Potential
        from matgl.ext.ase import PESCalculator
        from matgl.models import M3GNet, TensorNet

        if family == "tensornet":
            net = TensorNet(element_types=ELEMENTS, units=64, nblocks=2, num_rbf=32, cutoff=5.0,
                            is_intensive=False, use_warp=False)
        else:
            net = M3GNet(element_types=ELEMENTS, dim_node_embedding=64, dim_edge_embedding=64,
                         units=64, nblocks=3, max_n=3, max_l=3, cutoff=5.0, threebody_cutoff=4.0,
                         is_intensive=False)
        potential = Potential(model=net, calc_stresses=True)
        return PESCalculator(potential, stress_unit="eV/A3"), distmlip.wrap(potential)
    if family == "orb":
        from orb_models.forcefield.atomic_system import SystemConfig
        from orb_models.forcefield.calculator import ORBCalculator
        from orb_models.forcefield.pretrained import orb_v3_conservative_architecture

        model = orb_v3_conservative_architecture(
            device="cpu", system_config=SystemConfig(radius=6.0, max_num_neighbors=20)).eval()
        calc = ORBCalculator(model, device="cpu")
        return calc, distmlip.wrap(calc)
    if family == "uma":
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "adapters")]
        from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
        from fairchem.core.units.mlip_unit.predict import MLIPPredictUnit
        from test_fairchem import write_uma_checkpoint

        path = workdir / "uma-random.pt"
        write_uma_checkpoint(path, seed=0, experts=8, sphere_channels=64, edge_channels=64,
                             hidden_channels=64, num_distance_basis=64, num_layers=4, cutoff=6.0)
        unit = MLIPPredictUnit(str(path), device="cpu")
        calc = FAIRChemCalculator(unit, task_name="omat")
        return calc, distmlip.wrap(calc)
    if family == "mattersim":
        from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
        from mattersim.forcefield.potential import MatterSimCalculator, Potential

        potential = Potential(M3Gnet(num_blocks=4, units=128, max_l=4, max_n=4, cutoff=5.0,
                                     threebody_cutoff=4.0, device="cpu"), device="cpu")
        return MatterSimCalculator(potential, device="cpu"), distmlip.wrap(potential)
    raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")


def worker(job: dict) -> dict:
    import torch

    import distmlip

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        package, model = build(job["family"], Path(tmp))
        if job["launcher"] == "package":
            calc = package
        elif job["launcher"] == "mpi":
            calc = distmlip.DistributedCalculator(model)  # one part per rank
        else:
            calc = distmlip.DistributedCalculator(model, num_parts=job["parts"])
        calls = harness.timed_calls(calc, lambda seed: structure(tuple(job["size"]), seed), job["repeats"])
    best = calls[harness.best_call(calls)]
    res = {"atoms": best["atoms"], "time": best["time"], "cpu": best["cpu"], "first": calls[0]["time"],
           "peak": harness.peak_gb(), "energies": [c["energy"] for c in calls]}
    # mpirun: the slowest rank's times, the largest peak and the sum of the peaks
    return harness.gather_max(res, maximum=("time", "cpu", "first", "peak"), total=("peak",))


def table(family: str, rows: list) -> list[str]:
    """The markdown rows of one family: ratios against the package's calculator."""
    base = next((r for label, r, _ in rows if label == CONFIGS[0][0] and isinstance(r, dict)), None)
    out = ["| configuration | time (s) | vs package | cpu (s) | vs package | peak (GB) | vs package "
           "| first call (s) | ΔE vs package (eV/atom) | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, res, load in rows:
        if not isinstance(res, dict):
            out.append(f"| {label} | {res} | | | | | | | | {load:.1f} |")
            continue
        ratio = (lambda key: f"{res[key] / base[key]:.2f}") if base else (lambda key: "–")
        peak = f"{res['peak']:.2f}" + (f" (sum {res['peak_sum']:.2f})" if "peak_sum" in res else "")
        if base:
            de = max(abs(a - b) for a, b in zip(res["energies"], base["energies"], strict=True)) / res["atoms"]
            de = f"{de:.1e}"
        else:
            de = "–"
        out.append(f"| {label} | {res['time']:.2f} | {ratio('time')} | {res['cpu']:.2f} | "
                   f"{ratio('cpu')} | {peak} | {ratio('peak')} | {res['first']:.1f} | {de} | "
                   f"{load:.1f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--size", type=int, nargs=3, default=(3, 3, 3),
                        help="Li2O conventional cells (12 atoms each; 3 3 3: 324 atoms)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--configs", nargs="+", help="labels of CONFIGS to run (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()

    import torch

    before = harness.uptime()
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs]
    results: dict[str, list] = {}
    for family in args.families:
        rows = results.setdefault(family, [])
        for label, launcher, parts in harness.progress(configs, f"families: {family}"):
            job = {"family": family, "size": list(args.size), "launcher": launcher, "parts": parts,
                   "repeats": args.repeats}
            load = os.getloadavg()[0]
            try:
                res = harness.launch(__file__, job, procs=parts if launcher == "mpi" else None,
                             timeout=args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res = harness.failure(exc)
            rows.append((label, res, load))
            print(family, label, f"load {load:.2f}", res, flush=True)
    after = harness.uptime()

    cmd = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python bench/bench_families.py",
                    *(shlex.quote(a) for a in sys.argv[1:])])
    natoms = 12 * args.size[0] * args.size[1] * args.size[2]
    lines = ["## Newer model families against their packages' calculators", "",
             f"Command: `{cmd}`", "",
             f"Code: `{harness.git_head()}`. Machine: {os.cpu_count()} cores shared with other jobs, Python "
             f"{platform.python_version()}, torch {torch.__version__}, one torch thread per process, "
             f"float32, random weights. System: Li2O {'x'.join(map(str, args.size))} conventional "
             f"cells, {natoms} atoms, rattled 0.08 Å. Each row is a fresh process (mpirun: 2 "
             f"processes, one part each); time = best of {args.repeats} energy + forces + stress "
             "calls after a warm-up (first call: the warm-up, which builds the graph and, for "
             "distmlip, the partition), each on a freshly rattled structure (mpirun: the slowest "
             "rank); cpu = the process's CPU time (user + system) of that call (mpirun: the largest "
             "rank's), much less sensitive than wall time to other jobs sharing the cores; peak = "
             "`VmHWM` of the process, model and imports included (mpirun: the largest rank, and the "
             "sum); ΔE = largest energy difference from the package's calculator per atom over "
             "the calls (float32); load = 1-minute load average when the row started.", "",
             f"Machine state: before `{before}`; after `{after}`.", ""]
    for family in args.families:
        lines += [f"### {FAMILIES[family]}", ""] + table(family, results[family]) + [""]
    harness.write_result(args.output, lines)


if __name__ == "__main__":
    harness.main_or_worker(main, worker)
