"""Scale: large single points within a memory budget, and the memory model from 1,000 to 100,000
atoms.

    .venv/bin/python bench/bench_scale.py                      # everything (about an hour here)
    .venv/bin/python bench/bench_scale.py --only sevennet-20k  # one job (see JOBS)

Every job runs in a fresh process with one torch thread; the table is written to
bench/results/scale.md (rows already there for jobs not re-run are kept). For each job:

- predicted: what distmlip predicts one evaluation adds (``estimate_memory`` for an unbounded run;
  for a bounded run, the prediction the runner made when it chose the number of parts);
- added: the measured peak resident memory of the process above its level just before the call
  (VmHWM after a reset through /proc/self/clear_refs, minus VmRSS before): what ``max_memory``
  bounds;
- peak RSS: the process's whole peak resident memory (model, Python, torch included);
- seconds: the energy + forces + stress call (graph, partition and evaluation; the memory model's
  calibration runs before it and is reported apart).

A progress bar (tqdm, ``progress=True``) runs over the parts of bounded evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _harness import (  # noqa: E402
    WorkerFailed,
    launch,
    main_or_worker,
    proc_status,
    progress,
    reset_peak,
)

RESULT = ROOT / "bench" / "results" / "scale.md"

# name: (model kind, size argument of bench_memory.build, max_memory or None)
JOBS = {
    "sevennet-20k": ("sevennet-0", 12, "8GB"),     # rutile 12x12x24 cells: 20,736 atoms
    "schnet-1M": ("schnet32", 63, "10GB"),         # FCC Al 63^3 cubic cells: 1,000,188 atoms
    "schnet-5M": ("schnet-c32", 108, "16GB"),      # FCC Al 108^3 cubic cells: 5,038,848 atoms
    "schnet-1k": ("schnet32", 7, None),            # 1,372
    "schnet-10k": ("schnet32", 14, None),          # 10,976
    "schnet-100k": ("schnet32", 29, "4GB"),        # 97,556
    "sevennet-1k": ("sevennet-0", 5, None),        # 1,500
    "sevennet-6k": ("sevennet-0", 8, "4GB"),       # 6,144
    "sevennet-100k": ("sevennet-0", 21, "8GB"),    # rutile 21x21x42 cells: 111,132 atoms
    "mace-1k": ("mace64", 7, None),                # 1,372
    "mace-11k": ("mace64", 14, "3GB"),             # 10,976
    "chgnet-1k": ("chgnet", 5, None),              # 1,500
    "chgnet-12k": ("chgnet", 10, "3GB"),           # 12,000
}
DESCRIPTION = {
    "schnet32": "SchNet (3 interactions, 64 channels, 5 Å, float32, random weights), FCC Al",
    "schnet-c32": "SchNet (3 interactions, 32 channels, 5 Å, float32, random weights), FCC Al",
    "sevennet-0": "SevenNet-0 (pretrained, float32), rutile TiO2",
    "mace64": "ScaleShiftMACE (r_max 5 Å, 2 interactions, 64x0e+64x1o, correlation 3, float64, "
              "random weights), FCC Cu",
    "chgnet": "CHGNet 0.3.0 (pretrained, float32), rutile TiO2",
}



def build(kind: str, size: int):
    if kind == "schnet-c32":
        import torch
        from ase.build import bulk

        from distmlip.models import SchNet

        model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float32)
        return model, bulk("Al", "fcc", a=4.05, cubic=True).repeat((size,) * 3), torch.float32
    if kind == "mace64":
        import torch
        from ase.build import bulk

        import distmlip

        from bench_node_work_mace import make_model

        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size,) * 3)
        atoms.rattle(0.03, seed=1)
        return distmlip.wrap(make_model()), atoms, torch.float64
    from bench_memory import build as build_memory

    return build_memory(kind, size)


def worker(job: dict) -> dict:
    import numpy as np
    import torch

    from distmlip import DistributedCalculator, estimate_memory

    torch.set_num_threads(1)
    kind, size, budget = JOBS[job["name"]]
    t0 = time.perf_counter()
    model, atoms, dtype = build(kind, size)
    print(f"{job['name']}: {len(atoms)} atoms built in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    predicted = None if budget else estimate_memory(model, atoms, dtype=dtype)
    calc = DistributedCalculator(model, dtype=dtype, max_memory=budget, progress=True)
    if budget:  # calibrate before the measured call (cached per model), as estimate_memory does
        calc.runner._memory(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
    calibration = time.perf_counter() - t0
    print(f"{job['name']}: memory model calibrated in {calibration:.1f} s; evaluating", file=sys.stderr,
          flush=True)
    base = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    calc.calculate(atoms)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    added = proc_status("VmHWM") - base
    if budget:
        predicted = calc.runner.predicted_peak
    forces = calc.results["forces"]
    return {
        "atoms": len(atoms), "edges": int(calc.last_graph.num_edges), "predicted": predicted,
        "added": added, "peak_rss": proc_status("VmHWM"), "seconds": seconds, "cpu": cpu, "calibration": calibration,
        "parts": calc.last_plan.num_parts, "sequential": calc.runner.sequential, "budget": budget,
        "energy_per_atom": calc.results["energy"] / len(atoms),
        "max_force": float(np.abs(forces).max()), "net_force": float(np.abs(forces.sum(0)).max()),
        "timings": {k: round(v, 2) for k, v in calc.timings.items()},
        "load": os.getloadavg()[0]}


def run(name: str, timeout: float) -> dict:
    try:
        return launch(__file__, {"name": name}, timeout=timeout, capture_stderr=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    except WorkerFailed as exc:  # its stderr went to the terminal
        return {"error": f"exit {exc.returncode}"}


def row(name: str, r: dict) -> str:
    kind, size, budget = JOBS[name]
    if "error" in r:
        return f"| {name} | {kind} | | {budget or 'none'} | failed: {r['error']} | | | | | | | | | |"
    ratio = r["predicted"] / r["added"] if r["added"] else float("nan")
    return (f"| {name} | {kind} | {r['atoms']:,} | {budget or 'none'} | {r['parts']} | "
            f"{r['predicted'] / 1e9:.2f} | {r['added'] / 1e9:.2f} | {ratio:.2f} | "
            f"{r['peak_rss'] / 1e9:.2f} | {r['seconds']:.0f} | {r['cpu']:.0f} | "
            f"{1e3 * r['seconds'] / r['atoms']:.2f} | "
            f"{r['energy_per_atom']:.5f} | {r['load']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(JOBS), help="jobs to run (default: all)")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()

    import torch

    rows = {}
    if args.output.exists():  # keep the rows of jobs not re-run
        for line in args.output.read_text().splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 2 and cells[1] in JOBS:
                if len(cells) == 15:  # a row from before the CPU column: none recorded
                    cells.insert(11, "")
                rows[cells[1]] = " | ".join(cells).strip()
    for name in progress(args.only or list(JOBS), "bench_scale jobs"):
        print(f"== {name}", flush=True)
        r = run(name, args.timeout)
        rows[name] = row(name, r)
        print(rows[name], json.dumps(r.get("timings", {})), flush=True)
        write(args.output, rows, torch.__version__)


def write(path: Path, rows: dict, torch_version: str) -> None:
    lines = [
        "## Scale: large single points within a budget, and the memory model (1k-1M atoms)", "",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py [--only JOB ...]` "
        f"(Python {platform.python_version()}, torch {torch_version}, one torch thread, 2 cores "
        "shared with other work: *load* is the 1-minute load average at the end of the job).", "",
        "Models: " + "; ".join(f"`{k}`: {v}" for k, v in DESCRIPTION.items()) + ".", "",
        "*budget*: `max_memory` (none: unbounded, every part at once); *parts*: parts the runner "
        "chose (evaluated one at a time when bounded); *predicted*: distmlip's prediction of the "
        "memory the call adds (`estimate_memory`, or the runner's prediction for the parts it "
        "chose); *added*: measured peak RSS above the level before the call; *peak RSS*: the "
        "process's whole peak (Python, torch, model, graph); *s*: wall seconds of the energy + "
        "forces + stress call (graph build included, calibration not); *CPU s*: the process's "
        "CPU seconds of that call (blank in rows run before it was recorded); *ms/atom*: s per 1,000 "
        "atoms.", "",
        "| job | model | atoms | budget | parts | predicted (GB) | added (GB) | predicted / added | "
        "peak RSS (GB) | s | CPU s | ms/atom | energy/atom (eV) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [rows[name] for name in JOBS if name in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main_or_worker(main, worker)
