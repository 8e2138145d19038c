"""The layer protocol in bounded memory: CPU time of one energy + forces call, unbounded vs bounded
(``max_memory`` = 0.3 x the unbounded added peak), the generic replay vs the model's steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py             # 23,328 Al atoms
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --size 10   # 4,000 atoms
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py --family sevenn   # SevenNet-0, 256 Cu

SchNet as in bench/bench_memory.py's ``schnet64`` (3 interactions, 32 channels, 50 Gaussians,
5 Å, float64) on fcc Al (4 size^3 atoms, rattled). Every configuration runs in a fresh process
with one torch thread; CPU time is ``time.process_time`` of ``calc.calculate`` (the memory
calibration runs before, in ``estimate_memory``, and is not counted); "added" is the peak resident
memory above the level before the call. Writes bench/results/layers.md.

``--family sevenn``: SevenNet-0 (pretrained, shipped in the sevenn wheel; 5 interaction blocks,
5 Å) cast to float64, on fcc Cu (4 size^3 atoms, default size 4: 256 atoms, rattled); writes
bench/results/layers_sevenn.md.
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
    from ase.build import bulk

    from distmlip import DistributedCalculator, estimate_memory
    from distmlip.models import SchNet
    from distmlip.runtime.steps import uses_steps

    torch.set_num_threads(1)
    if payload.get("family", "schnet") == "sevenn":
        import warnings

        import distmlip

        warnings.filterwarnings("ignore", message=".*accelerat.*")  # sevenn: "no cuEq/flash" notice
        model, dtype = distmlip.load("sevennet-0"), "float64"
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((payload["size"],) * 3)
    else:
        model, dtype = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0,
                              dtype=torch.float64), None
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((payload["size"],) * 3)
    atoms.rattle(0.03, seed=1)
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
    np.savez(payload["out"], forces=calc.results["forces"], energies=calc.results["energies"],
             stress=calc.results["stress"])
    return {"atoms": len(atoms), "added": added, "seconds": seconds, "cpu": cpu,
            "parts": calc.last_plan.num_parts, "sequential": calc.runner.sequential,
            "steps": bool(calc.runner.sequential and uses_steps(calc.runner)),
            "energy": float(calc.results["energy"]), "load": os.getloadavg()[0]}


def run(size: int, path: str, budget=None, family: str = "schnet") -> dict:
    out = ROOT / "out" / f"bench_layers_{family}_{size}_{path}.npz"
    out.parent.mkdir(exist_ok=True)
    print(f"  {family} size {size} {path} budget {budget} ...", flush=True)
    return dict(launch(__file__, {"size": size, "path": path, "budget": budget, "out": str(out),
                                  "family": family}, timeout=7200), out=str(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("schnet", "sevenn"), default="schnet",
                        help="schnet (default) or sevenn (SevenNet-0, float64, fcc Cu)")
    parser.add_argument("--size", type=int, default=None,
                        help="fcc repeats: 4 size^3 atoms (default: schnet 18, 23,328 Al; sevenn 4, 256 Cu)")
    parser.add_argument("--fraction", type=float, default=0.3, help="budget / unbounded added peak")
    args = parser.parse_args()
    import numpy as np

    default_size = 18 if args.family == "schnet" else 4
    size = args.size if args.size is not None else default_size
    uptime = os.popen("uptime").read().strip()
    free = run(size, "unbounded", family=args.family)
    budget = int(args.fraction * free["added"])
    rows = [("unbounded", free)]
    for path in ("generic", "steps"):
        rows.append((f"bounded, {path}", run(size, path, budget, args.family)))
    what = (f"SchNet, 3 interactions, 32 channels, float64, 5 Å, on {free['atoms']} Al atoms"
            if args.family == "schnet" else
            f"SevenNet-0 (pretrained, 5 interaction blocks, 5 Å) in float64, on {free['atoms']} Cu atoms")
    ref = np.load(free["out"])
    lines = ["## Layer protocol: bounded memory by steps vs the generic replay", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layers.py "
             f"{' '.join(sys.argv[1:])}`. {what}; one torch thread, each row a fresh process; budget "
             f"{budget / 1e6:.0f} MB = {args.fraction} x the unbounded added peak. `uptime` before: "
             f"{uptime}.", "",
             "| configuration | parts | path | CPU (s) | CPU / unbounded | wall (s) | added (MB) | "
             "max rel. dev. energy / forces / stress / per-atom | load (end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        got = np.load(r["out"])

        def dev(key, got=got):
            return float(np.abs(got[key] - ref[key]).max() / max(np.abs(ref[key]).max(), 1.0))

        de = abs(r["energy"] - free["energy"]) / max(abs(free["energy"]), 1.0)
        path = "steps" if r["steps"] else ("generic replay" if r["sequential"] else "all at once")
        lines.append(f"| {name} | {r['parts']} | {path} | {r['cpu']:.1f} | {r['cpu'] / free['cpu']:.2f} | "
                     f"{r['seconds']:.1f} | {r['added'] / 1e6:.0f} | {de:.1e} / {dev('forces'):.1e} / "
                     f"{dev('stress'):.1e} / {dev('energies'):.1e} | {r['load']:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "CPU: `time.process_time` of one `calc.calculate` (energy, forces, stress), the "
              "memory calibration excluded. Deviations: max|a - ref| / max(max|ref|, 1) against the "
              "unbounded run."]
    stem = "layers" if args.family == "schnet" else f"layers_{args.family}"
    name = f"{stem}.md" if size == default_size else f"{stem}_{size}.md"
    write_result(ROOT / "bench" / "results" / name, lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
