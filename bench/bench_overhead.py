"""In-process cost of partitioning: one process, one device, SchNet evaluated whole vs split.

    .venv/bin/python bench/bench_overhead.py      # writes bench/results/overhead.md

For each configuration (fresh subprocess, so peak RSS is its own): time per energy+forces+stress
call (best of 3 after a warm-up), the share of that time spent building the graph and the plan,
peak RSS, and edges evaluated / graph edges (1.00 = no redundant work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import launch, main_or_worker, progress, vm_hwm_mb, write_result  # noqa: E402

CONFIGS = [(1, "halo", "grid"), (4, "halo", "grid"), (4, "halo", "metis"), (4, "halo", "slab"),
           (8, "halo", "grid"), (4, "extended", "grid"), (16, "halo", "grid"), (16, "extended", "grid")]
PAIRED = (1, 8)  # part counts timed in turn in one process (--paired)



def system(reps: int):
    import torch
    from ase.build import bulk

    from distmlip.models import SchNet

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((reps,) * 3)
    atoms.rattle(0.02, seed=0)
    model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float32)
    return atoms, model


def paired_worker(reps: int, rounds: int) -> dict:
    """One process, a calculator of each part count in PAIRED, one call of each per round (after a
    warm-up): per round the time relative to the 1-part call, so both see the same load."""
    import numpy as np
    import torch

    from distmlip import DistributedCalculator

    torch.set_num_threads(1)
    atoms, model = system(reps)
    calcs = {p: DistributedCalculator(model, num_parts=p) for p in PAIRED}
    ratios = {p: [] for p in PAIRED}
    cpu_ratios = {p: [] for p in PAIRED}
    for r in range(rounds + 1):
        wall, cpu = {}, {}
        for p, calc in calcs.items():
            a = atoms.copy()
            a.positions += 1e-4 * (r + 1)
            a.calc = calc
            t0, c0 = time.perf_counter(), time.process_time()
            a.get_forces()
            a.get_stress()
            wall[p], cpu[p] = time.perf_counter() - t0, time.process_time() - c0
        if r:
            for p in PAIRED:
                ratios[p].append(wall[p] / wall[PAIRED[0]])
                cpu_ratios[p].append(cpu[p] / cpu[PAIRED[0]])
    return {"wall": {p: float(np.median(v)) for p, v in ratios.items()},
            "cpu": {p: float(np.median(v)) for p, v in cpu_ratios.items()}, "rounds": rounds}


def worker(parts, mode, partitioner, reps, repeat):
    import torch

    from distmlip import DistributedCalculator

    torch.set_num_threads(1)
    atoms, model = system(reps)
    atoms.calc = DistributedCalculator(model, num_parts=parts, mode=mode, partitioner=partitioner)
    best, first = None, None
    for _ in range(repeat + 1):
        atoms.positions += 1e-4
        t0, c0 = time.perf_counter(), time.process_time()
        atoms.get_forces()
        atoms.get_stress()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if first is None:  # the call that builds graph and plan
            first = dict(atoms.calc.timings)
        elif best is None or elapsed < best[0]:
            best = (elapsed, cpu, dict(atoms.calc.timings))
    plan = atoms.calc.last_plan
    return {"atoms": len(atoms), "edges": plan.num_edges, "time": best[0], "cpu": best[1],
            "timings": best[2], "first": first,
            "redundancy": plan.redundancy(), "halo": plan.halo_fraction(), "peak_mb": vm_hwm_mb()}


def child(job: dict) -> dict:
    """What a child process runs: the paired timing or one configuration."""
    if job.get("paired"):
        return paired_worker(job["reps"], job["paired"])
    return worker(job["parts"], job["mode"], job["partitioner"], job["reps"], job["repeat"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=16, help="cubic FCC Cu repetitions (4 atoms each)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--paired", type=int, default=5, metavar="ROUNDS",
                        help="rounds of the 1-vs-8-parts paired timing (0: skip)")
    args = parser.parse_args()
    rows = []
    for parts, mode, partitioner in progress(CONFIGS, "overhead configurations"):
        job = {"parts": parts, "mode": mode, "partitioner": partitioner, "reps": args.reps,
               "repeat": args.repeat}
        rows.append(((parts, mode, partitioner), launch(__file__, job, timeout=3600)))
        print(rows[-1], flush=True)
    paired = None
    if args.paired:
        paired = launch(__file__, {"paired": args.paired, "reps": args.reps}, timeout=7200)
        print(paired, flush=True)
    base = rows[0][1]
    load = os.getloadavg()[0]
    lines = ["## In-process overhead of partitioning (one device)", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_overhead.py --reps {args.reps} "
             f"--repeat {args.repeat} --paired {args.paired}` — SchNet float32 "
             f"(3 interactions, 32 channels, cutoff 5 Å), FCC Cu, {base['atoms']} atoms, "
             f"{base['edges']} edges; one process, one torch thread; best of {args.repeat} calls "
             "(energy + forces + stress) after a warm-up (atoms moved 1e-4 Å: graph and plan reused); "
             "each row in its own process; CPU = the best call's process time (single-threaded work: "
             "much less sensitive than wall time to other jobs on the 2 cores; 1-minute load average "
             f"{load:.1f} at the end); *graph + plan at a rebuild*: their share of the first call, "
             "which builds them.", "",
             "| parts | mode | partitioner | time (s) | vs 1 part | CPU (s) | vs 1 part | graph + plan at a rebuild | peak RSS (MB) | vs 1 part | edges evaluated / edges | halo atoms / atoms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (parts, mode, partitioner), r in rows:
        t = r["first"]
        share = (t["graph"] + t["partition"]) / t["total"]
        lines.append(f"| {parts} | {mode} | {partitioner} | {r['time']:.2f} | {r['time'] / base['time']:.2f} | "
                     f"{r['cpu']:.2f} | {r['cpu'] / base['cpu']:.2f} | "
                     f"{share:.1%} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | "
                     f"{r['redundancy']:.2f} | {r['halo']:.2f} |")
    lines += ["", "Halo mode evaluates every edge once, so its time stays close to the unsplit model's; "
              "extended mode pays for the redundant L-hop halo. In one process all parts are alive at "
              "once, so peak memory is not expected to fall here (that is what several processes or "
              "devices are for; see the scaling section)."]
    if paired:
        lines += ["", f"Paired timing (one process holding a 1-part and an 8-part calculator, one call of "
                  f"each per round, {paired['rounds']} rounds after a warm-up; median over rounds of the "
                  "time relative to the same round's 1-part call):", "",
                  "| parts | wall time vs 1 part | CPU time vs 1 part |", "|---|---|---|"]
        lines += [f"| {p} | {paired['wall'][str(p)]:.2f} | {paired['cpu'][str(p)]:.2f} |" for p in PAIRED]
    write_result(ROOT / "bench" / "results" / "overhead.md", lines)


if __name__ == "__main__":
    main_or_worker(main, child)
