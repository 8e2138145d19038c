"""The layer protocol in bounded memory: CPU time of an energy + forces call, unbounded vs bounded
(``max_memory`` = 0.3 x the unbounded added peak), the generic replay vs the model's steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py                    # SchNet, 23,328 Al
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --size 10          # SchNet, 4,000 Al
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family sevenn    # SevenNet-0, 256 Cu
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family mace      # MACE, 500 Cu/Al
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family tensornet # TensorNet, 1,500 Li2O
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family uma       # UMA MoE, 324 Li2O
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family chgnet    # CHGNet 0.3.0, 324 Li2O
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family mattersim # MatterSim, 768 Li2O
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family m3gnet    # matgl M3GNet, 768 Li2O
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family orb       # Orb v3, 6,144 Li2O

Families (``--family``; every one float64, a fresh process per configuration, one torch thread):

- ``schnet``: as in bench/bench_memory.py's ``schnet64`` (3 interactions, 32 channels, 50
  Gaussians, 5 Å) on fcc Al (4 size^3 atoms, default size 18, rattled); bench/results/layers.md.
- ``sevenn``: SevenNet-0 (pretrained, shipped in the sevenn wheel; 5 interaction blocks, 5 Å) on
  fcc Cu (default size 4: 256 atoms); bench/results/layers_sevenn.md.
- ``mace``: the tests' MACE (MP-medium width: 128x0e+128x1o, 2 interactions, 6 Å, random
  weights, tests/support/adapters.py) on fcc Cu with every fifth atom Al (default size 5: 500).
- ``tensornet``: the tests' matgl TensorNet (16 units, 2 blocks, 4 Å, random weights) on
  antifluorite Li2O (default size 5: 1,500 atoms).
- ``uma``: the tests' fairchem eSCN-MD mixture of experts (UMA's architecture: 16 sphere channels,
  lmax = mmax = 2, 2 blocks, 4 experts mixed by the composition and the task "omat", 5 Å, random
  weights, tests/support/adapters.py) on antifluorite Li2O (default size 3: 324 atoms).
- ``chgnet``: CHGNet 0.3.0 (pretrained, shipped in the chgnet wheel; 4 layers, 6 Å atom graph, 3 Å
  bond graph, bond and angle features carried as edge entries) in float64 on antifluorite Li2O
  (default size 3: 324 atoms).
- ``mattersim``: the tests' MatterSim M3GNet (2 blocks, 16 units, 5 Å, three-body 4 Å, random
  weights, tests/support/adapters.py; bond features as an edge entry) in float64 on antifluorite
  Li2O (default size 4: 768 atoms).
- ``m3gnet``: the tests' matgl M3GNet (16 units, 2 blocks, 5 Å, three-body 4 Å, random weights;
  bond features as an edge entry) in float64 on antifluorite Li2O (default size 4: 768 atoms).
- ``orb``: the tests' Orb v3 conservative (latent 32, MLPs 64/32, 2 message-passing steps, 6 Å,
  neighbour cap 8, ZBL, random weights, tests/support/adapters.py) in float64 on antifluorite Li2O
  (default size 8: 6,144 atoms). Its readout's ``global_sum`` is summed over the parts by the steps
  (``readout_sum``).

CPU time is ``time.process_time`` of ``calc.calculate``: the first call (graph, partition, the
layer protocol's probe unless a passed one is on record) and the next one (atoms moved 1e-3 Å:
the build reused, as in MD). The memory calibration runs before, in ``estimate_memory``, and is
not counted; "added" is the peak resident memory above the level before the first call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from _harness import launch, main_or_worker, proc_status, reset_peak, write_result  # noqa: E402


def worker(payload: dict) -> dict:
    import numpy as np
    import torch

    from distmlip import DistributedCalculator, estimate_memory
    from distmlip.runtime.steps import uses_steps

    torch.set_num_threads(1)
    model, atoms, dtype = _system(payload.get("family", "schnet"), payload["size"])
    budget = payload.get("budget")
    if budget is not None:
        estimate_memory(model, atoms, max_memory=budget, dtype=dtype)  # the calibration, cached per model
    calc = DistributedCalculator(model, max_memory=budget, dtype=dtype)
    if payload["path"] == "generic":
        calc.runner.layer_steps = False
    base = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    calc.calculate(atoms)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    added = proc_status("VmHWM") - base
    atoms.positions += 1e-3  # within the skin: the next call reuses the build
    c1 = time.process_time()
    calc.calculate(atoms)
    again = time.process_time() - c1
    np.savez(payload["out"], forces=calc.results["forces"], energies=calc.results["energies"],
             stress=calc.results["stress"])
    return {"atoms": len(atoms), "added": added, "seconds": seconds, "cpu": cpu, "again": again,
            "parts": calc.last_plan.num_parts, "sequential": calc.runner.sequential,
            "steps": bool(calc.runner.sequential and uses_steps(calc.runner)),
            "energy": float(calc.results["energy"]), "load": os.getloadavg()[0]}


def _system(family: str, size: int):
    """(model, atoms, dtype) of a family (see the module docstring)."""
    import torch
    from ase.build import bulk

    if family == "schnet":
        from distmlip.models import SchNet

        model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float64)
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((size,) * 3)
        atoms.rattle(0.03, seed=1)
        return model, atoms, None
    import warnings

    import distmlip

    warnings.filterwarnings("ignore")  # the packages' notices (accelerators, deprecations)
    if family == "sevenn":
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size,) * 3)
        atoms.rattle(0.03, seed=1)
        return distmlip.load("sevennet-0"), atoms, "float64"
    if family == "chgnet":
        atoms = bulk("Li2O", "fluorite", a=4.61, cubic=True).repeat((size,) * 3)
        atoms.rattle(0.03, seed=1)
        return distmlip.load("chgnet-0.3.0"), atoms, "float64"
    from support.adapters import make_mace, make_matgl, make_mattersim, make_orb, make_uma_moe

    if family == "mace":
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size,) * 3)
        atoms.numbers[::5] = 13
        atoms.rattle(0.05, seed=1)
        return distmlip.wrap(make_mace()), atoms, "float64"
    atoms = bulk("Li2O", "fluorite", a=4.61, cubic=True).repeat((size,) * 3)
    atoms.rattle(0.03, seed=1)
    if family == "uma":
        return distmlip.wrap(make_uma_moe().double(), task="omat"), atoms, "float64"
    if family == "mattersim":
        return distmlip.wrap(make_mattersim()).double(), atoms, "float64"
    if family == "m3gnet":
        return distmlip.wrap(make_matgl(arch="M3GNet")), atoms, "float64"
    if family == "orb":
        return distmlip.wrap(make_orb().double()), atoms, "float64"
    return distmlip.wrap(make_matgl()), atoms, "float64"


FAMILIES = {"schnet": (18, "SchNet, 3 interactions, 32 channels, float64, 5 Å, on {n} Al atoms"),
            "sevenn": (4, "SevenNet-0 (pretrained, 5 interaction blocks, 5 Å) in float64, on {n} Cu atoms"),
            "mace": (5, "MACE (128x0e+128x1o, 2 interactions, 6 Å, random weights) in float64, on "
                        "{n} Cu/Al atoms"),
            "tensornet": (5, "matgl TensorNet (16 units, 2 blocks, 4 Å, random weights) in float64, "
                             "on {n} Li2O atoms"),
            "uma": (3, "fairchem eSCN-MD mixture of experts (UMA's architecture: 16 sphere channels, "
                       "lmax = mmax = 2, 2 blocks, 4 experts, 5 Å, random weights) in float64, task "
                       "omat, on {n} Li2O atoms"),
            "chgnet": (3, "CHGNet 0.3.0 (pretrained, 4 layers, 6 Å atom graph, 3 Å bond graph; bond "
                          "and angle features as edge entries) in float64, on {n} Li2O atoms"),
            "mattersim": (4, "MatterSim M3GNet (2 blocks, 16 units, 5 Å, three-body 4 Å, random "
                             "weights; bond features as an edge entry) in float64, on {n} Li2O atoms"),
            "m3gnet": (4, "matgl M3GNet (16 units, 2 blocks, 5 Å, three-body 4 Å, random weights; "
                          "bond features as an edge entry) in float64, on {n} Li2O atoms"),
            "orb": (8, "Orb v3 conservative (latent 32, MLPs 64/32, 2 message-passing steps, 6 Å, "
                       "neighbour cap 8, ZBL, random weights) in float64, on {n} Li2O atoms (the "
                       "readout's global_sum summed by the steps)")}


def run(size: int, path: str, budget=None, family: str = "schnet") -> dict:
    out = ROOT / "out" / f"bench_layers_{family}_{size}_{path}.npz"
    out.parent.mkdir(exist_ok=True)
    print(f"  {family} size {size} {path} budget {budget} ...", flush=True)
    return dict(launch(__file__, {"size": size, "path": path, "budget": budget, "out": str(out),
                                  "family": family}, timeout=7200), out=str(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(FAMILIES), default="schnet",
                        help="the model and system (see above; default schnet)")
    parser.add_argument("--size", type=int, default=None,
                        help="cubic cell repeats per direction (default: schnet 18, sevenn 4, mace 5, "
                             "tensornet 5, uma 3, chgnet 3, mattersim 4, m3gnet 4, orb 8)")
    parser.add_argument("--fraction", type=float, default=0.3, help="budget / unbounded added peak")
    args = parser.parse_args()
    import numpy as np

    default_size, what = FAMILIES[args.family]
    size = args.size if args.size is not None else default_size
    uptime = os.popen("uptime").read().strip()
    free = run(size, "unbounded", family=args.family)
    budget = int(args.fraction * free["added"])
    rows = [("unbounded", free)]
    for path in ("generic", "steps"):
        rows.append((f"bounded, {path}", run(size, path, budget, args.family)))
    what = what.format(n=free["atoms"])
    ref = np.load(free["out"])
    lines = ["## Layer protocol: bounded memory by steps vs the generic replay", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py "
             f"{' '.join(sys.argv[1:])}`. {what}; one torch thread, each row a fresh process; budget "
             f"{budget / 1e6:.0f} MB = {args.fraction} x the unbounded added peak. `uptime` before: "
             f"{uptime}.", "",
             "| configuration | parts | path | CPU (s) | CPU / unbounded | next call CPU (s) | next / "
             "unbounded | wall (s) | added (MB) | max rel. dev. energy / forces / stress / per-atom | "
             "load (end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        got = np.load(r["out"])

        def dev(key, got=got):
            return float(np.abs(got[key] - ref[key]).max() / max(np.abs(ref[key]).max(), 1.0))

        de = abs(r["energy"] - free["energy"]) / max(abs(free["energy"]), 1.0)
        path = "steps" if r["steps"] else ("generic replay" if r["sequential"] else "all at once")
        lines.append(f"| {name} | {r['parts']} | {path} | {r['cpu']:.1f} | {r['cpu'] / free['cpu']:.2f} | "
                     f"{r['again']:.1f} | {r['again'] / free['again']:.2f} | {r['seconds']:.1f} | {r['added'] / 1e6:.0f} | {de:.1e} / {dev('forces'):.1e} / "
                     f"{dev('stress'):.1e} / {dev('energies'):.1e} | {r['load']:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "CPU: `time.process_time` of the first `calc.calculate` (energy, forces, stress; "
              "graph, partition and the steps' probe included, the memory calibration excluded) and "
              "of the next one (atoms moved 1e-3 Å: the build reused, as in MD). Deviations (of the "
              "second call): max|a - ref| / max(max|ref|, 1) against the unbounded run."]
    stem = "layers" if args.family == "schnet" else f"layers_{args.family}"
    name = f"{stem}.md" if size == default_size else f"{stem}_{size}.md"
    write_result(ROOT / "bench" / "results" / name, lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
