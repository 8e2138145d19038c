"""Strong scaling and per-rank memory of the multi-process runtime (mpirun, gloo on CPU).

    .venv/bin/python bench/bench_scaling.py            # writes bench/results/scaling.md

Scaling: one SchNet energy+forces+stress evaluation of a >=50k-atom Cu crystal with 1 process
(in-process, one part) and 2 processes (one part per rank); speedup and the share of the time
spent communicating (broadcast, exchange-map handshake, halo exchanges, final all-reduce).
Memory: peak RSS of each rank for P = 1, 2, 4 on a >=100k-atom crystal (P = 4 oversubscribes the
2 cores: its times are not meaningful, its memory is).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import gather_on_rank0, launch, main_or_worker, vm_hwm_mb, write_result  # noqa: E402


def worker(job: dict) -> list[dict] | None:
    """Every rank's record, on rank 0 (``None`` on the others)."""
    import numpy as np
    import torch
    from ase.build import bulk

    from distmlip import DistributedCalculator
    from distmlip.models import SchNet

    base = vm_hwm_mb()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((job["reps"],) * 3)
    atoms.rattle(0.02, seed=0)
    model = SchNet(cutoff=job["cutoff"], num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float32)
    backend = "local" if job["procs"] == 1 else "torch"
    atoms.calc = DistributedCalculator(model, backend=backend, num_threads=1, timeout=600)
    calc = atoms.calc
    times, comm = [], []
    for _ in range(job["repeat"] + 1):
        atoms.positions += 1e-4  # force a new evaluation
        t0 = time.perf_counter()
        atoms.get_forces()
        atoms.get_stress()
        times.append(time.perf_counter() - t0)
        comm.append(calc.timings.get("communication", 0.0))
    rank = calc.runner.rank if backend == "torch" else 0
    peak = vm_hwm_mb()
    record = {"rank": rank, "procs": job["procs"], "atoms": len(atoms), "time": min(times[1:]),
              "comm": comm[1 + int(np.argmin(times[1:]))], "peak_mb": peak, "base_mb": base,
              "timings": calc.timings}
    return gather_on_rank0(record, job["procs"])


def run(procs, reps, cutoff, repeat):
    job = {"procs": procs, "reps": reps, "cutoff": cutoff, "repeat": repeat}
    return launch(__file__, job, procs=procs if procs > 1 else None, timeout=3600)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=24, help="cubic FCC repetitions (4 atoms each)")
    parser.add_argument("--cutoff", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--memory-reps", type=int, default=30)
    args = parser.parse_args()
    lines = ["## Multi-process runtime: strong scaling and per-rank memory", "",
             "Command: `.venv/bin/python bench/bench_scaling.py` (SchNet float32, 3 interactions, 32 "
             f"channels, cutoff {args.cutoff} Å, FCC Cu; grid partitioner, halo mode; gloo on CPU, one "
             "torch thread per rank; best of repeated energy+forces+stress calls after a warm-up).", ""]
    scaling = {p: run(p, args.reps, args.cutoff, args.repeat) for p in (1, 2)}
    t1 = scaling[1][0]["time"]
    lines += [f"### Strong scaling, {scaling[1][0]['atoms']} atoms", "",
              "| processes | time per call (s) | speedup | communication (s, rank 0) | communication share |",
              "|---|---|---|---|---|"]
    for p, recs in scaling.items():
        t = max(r["time"] for r in recs)
        c = recs[0]["comm"]
        lines.append(f"| {p} | {t:.2f} | {t1 / t:.2f} | {c:.3f} | {c / t:.1%} |")
    memory = {p: run(p, args.memory_reps, args.cutoff, 1) for p in (1, 2, 4)}
    lines += ["", f"### Peak memory per rank, {memory[1][0]['atoms']} atoms", "",
              "| processes | peak RSS per rank (MB) | after imports (MB) | time per call (s) |", "|---|---|---|---|"]
    for p, recs in memory.items():
        peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in recs)
        lines.append(f"| {p} | {peaks} | {recs[0]['base_mb']:.0f} | {max(r['time'] for r in recs):.2f} |")
    write_result(ROOT / "bench" / "results" / "scaling.md", lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
