"""Bounded memory and the memory model.

    .venv/bin/python bench/bench_memory.py            # writes bench/results/memory.md
    .venv/bin/python bench/bench_memory.py --quick    # smaller systems

Every configuration runs in a fresh process; "added" is the peak resident memory of that process
above its level just before the call (VmHWM after resetting it through /proc/self/clear_refs,
minus VmRSS before), the quantity ``max_memory`` bounds.

1. Memory model: ``distmlip.estimate_memory`` (calibrated on small probes) against the measured
   added peak of one unbounded evaluation (1 part), for several models and sizes.
2. Bounded evaluation: ``max_memory`` = 0.3x the unbounded added peak; measured peak, time and the
   largest deviation of forces/energies from the unbounded run.

    .venv/bin/python bench/bench_memory.py --families [--kinds nequip uma ...] [--sizes small] [--append] [--bounded-large]

3. Every family (writes bench/results/memory_families.md): the memory model's prediction against
   the measured added peak at ~1,000 atoms and one larger size (1 part, unbounded), and for the
   families with the layer protocol the prediction of the bounded peak at ``max_memory`` = 0.3x
   the measured unbounded peak against the measured bounded peak. The table is rewritten after
   every row (a run cut short keeps the rows it made).

    .venv/bin/python bench/bench_memory.py --families --paths [--output FILE] [--code DIR]

4. ``--paths``: for each kind, also the two paths a budget may take besides the steps: all at once
   under a budget of 1.2x the measured unbounded peak, and the generic replay (the layer protocol
   turned off) at 0.3x. ``--code``: the distmlip tree the workers import (another checkout, to
   compare with); ``--output``: the table's file (default bench/results/memory_families.md).
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
from _harness import launch, main_or_worker, proc_status, progress, reset_peak, write_result  # noqa: E402

#: kind -> builder of its raw model from ``support.adapters`` (the adapter tests' random-weight
#: models: NequIP float64, TensorNet/M3GNet/Orb/MatterSim float32, UMA float64 as its layer tests)
FAMILIES = {
    "nequip": lambda a: a.make_nequip(),
    "tensornet": lambda a: a.make_matgl(),
    "m3gnet": lambda a: a.make_matgl(arch="M3GNet"),
    "orb": lambda a: a.make_orb(),
    "uma": lambda a: a.make_uma().double(),
    "mattersim": lambda a: a.make_mattersim(),
}


def build(kind: str, size: int):
    """(model, atoms, dtype) of a benchmark configuration."""
    import numpy as np
    import torch
    from ase.build import bulk

    import distmlip
    from distmlip.models import SchNet

    if kind.startswith("schnet"):
        dtype = torch.float64 if kind.endswith("64") else torch.float32
        model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=64 if dtype == torch.float32 else 32,
                       seed=0, dtype=dtype)
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((size,) * 3)
    elif kind == "sevennet-0":
        from ase.spacegroup import crystal

        model, dtype = distmlip.load("sevennet-0"), None
        atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                        cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat((size, size, 2 * size))
    elif kind == "chgnet":
        from ase.spacegroup import crystal

        model, dtype = distmlip.load("chgnet-0.3.0"), None
        atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                        cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat((size, size, 2 * size))
    elif kind == "mace":
        from support.adapters import make_mace

        model, dtype = distmlip.wrap(make_mace()), torch.float64
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size,) * 3)
    elif kind in FAMILIES:
        # the random-weight models of the adapter tests (tests/support/adapters.py), on Li2O
        from distmlip.testing.adapters import oxide

        from support import adapters

        raw = FAMILIES[kind](adapters)
        model, dtype = distmlip.wrap(raw), None
        atoms = oxide(repeat=(size, size, size + 1))  # 12 atoms per cell: size 4 -> 960
    else:
        raise ValueError(kind)
    atoms.rattle(0.03, seed=1)
    np.random.seed(0)
    return model, atoms, dtype


def worker(payload: dict) -> dict:
    import numpy as np
    import torch

    from distmlip import DistributedCalculator, estimate_memory
    from distmlip.runtime.memory import _trim

    torch.set_num_threads(1)
    model, atoms, dtype = build(payload["kind"], payload["size"])
    budget = payload.get("budget")
    t0 = time.perf_counter()
    predicted = estimate_memory(model, atoms, dtype=dtype, max_memory=budget)
    calibration = time.perf_counter() - t0
    calc = DistributedCalculator(model, dtype=dtype, max_memory=budget)
    if payload.get("generic"):
        calc.runner.layer_steps = False  # the generic replay, also for a model with steps
    # free heap memory back to the system first (as the calibration's PeakMeter does): the
    # calibration leaves up to glibc's trim threshold (64 MiB) free but resident, which the call
    # would reuse unseen (Orb, 960 atoms: 1 MB "added" without this, 92 MB with it)
    _trim()
    base = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    calc.calculate(atoms)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    added = proc_status("VmHWM") - base
    np.savez(payload["out"], forces=calc.results["forces"], energies=calc.results["energies"])
    if budget is not None:  # the build's own prediction (estimate_memory's is by steps for a model with them)
        predicted = calc.last_run.predicted_peak_bytes
    return {"atoms": len(atoms), "edges": int(calc.last_graph.num_edges), "predicted": predicted,
            "added": added, "seconds": seconds, "cpu": cpu, "calibration": calibration,
            "parts": calc.last_plan.num_parts, "sequential": calc.runner.sequential,
            "energy": calc.results["energy"], "load": os.getloadavg()[0]}


def run(kind: str, size: int, budget=None, tag="", generic=False, code: Path = ROOT) -> dict:
    out = ROOT / "out" / f"bench_memory_{kind}_{size}_{tag}.npz"
    out.parent.mkdir(exist_ok=True)
    payload = {"kind": kind, "size": size, "budget": budget, "out": str(out), "generic": generic}
    print(f"  {kind} size {size} budget {budget} ...", flush=True)
    return dict(launch(__file__, payload, timeout=7200, code=code), out=str(out))


#: kind -> (size of the ~1,000-atom row, larger size or None, bounded row at 0.3x); sizes in
#: build's units: SchNet Al 864 / 10,976; rutile 768 / 1,500 (SevenNet-0), 2,592 (CHGNet); MACE Cu
#: 864; Li2O 960 / 3,024
FAMILY_SIZES = {
    "schnet32": (6, 14, True),
    "sevennet-0": (4, 5, True),
    "mace": (6, None, True),
    "nequip": (4, 6, True),
    "tensornet": (4, 6, True),
    "uma": (4, 6, True),
    "chgnet": (4, 6, False),
    "m3gnet": (4, 6, False),
    "orb": (4, 6, False),
    "mattersim": (4, 6, False),
}


RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def families(kinds: list[str], sizes: list[str], append: bool, bounded_large: bool = False,
             paths: bool = False, output: Path | None = None, code: Path = ROOT):
    """The every-family table: ~1,000 atoms unbounded and bounded (0.3x) for each kind, then the
    larger sizes (``bounded_large``: with their bounded rows too); ``output`` (default
    bench/results/memory_families.md) rewritten after each row (``append``: after the rows already
    there, the commands listed). ``paths``: at ~1,000 atoms also all at once under 1.2x and the
    generic replay under 0.3x; ``code``: the distmlip tree the workers import."""
    out = output or ROOT / "bench" / "results" / "memory_families.md"
    commands = ["`OMP_NUM_THREADS=1 .venv/bin/python bench/bench_memory.py " + " ".join(sys.argv[1:]) + "`"]
    rows: list[str] = []
    if append and out.exists():
        old = out.read_text().split("\n")
        said = next((line for line in old if line.startswith("Command: ")), "")
        commands = said[len("Command: "):].split(". Each row")[0].split(", then ") + commands
        rows = [line for line in old[old.index(RULE) + 1:] if line.startswith("| ")]
    head = ["## Memory model across the families: predicted vs measured", "",
            f"Command: {', then '.join(commands)}. Each row is a fresh process (one at a time, one thread); "
            "*measured* is the added peak resident memory of the call (VmHWM above VmRSS before it, "
            "freed heap returned first (malloc_trim), what `max_memory` bounds); *predicted* is `estimate_memory(model, atoms)` in the same process before the call "
            "(unbounded rows), the call's `last_run.predicted_peak_bytes` (bounded rows: the "
            "prediction the budget was checked against). Unbounded rows: 1 part. "
            "Bounded rows: budget = 0.3 x the measured unbounded peak of the row above. SchNet: 3 "
            "interactions, 5 Å, float32 64 channels, Al fcc; SevenNet-0, CHGNet: pretrained, rutile "
            "TiO2; MACE: random ScaleShiftMACE (128x0e+128x1o, float64), Cu fcc; NequIP (float64), "
            "TensorNet, M3GNet, Orb, UMA (float64), MatterSim: the adapter tests' random-weight models "
            "(tests/support/adapters.py) on Li2O. Load: 1-minute load average at the end of the row."
            + (" *all at once*: budget = 1.2 x the measured unbounded peak (the parts, all alive at "
               "once, fit); *generic replay*: budget = 0.3 x it, parts one at a time without the "
               "layer protocol." if paths else "")
            + (f" Workers import distmlip from `{code}`." if code != ROOT else ""),
            "",
            "| model | atoms | edges | max_memory (MB) | parts | predicted (MB) | measured (MB) | "
            "predicted / measured | calibration (s) | call (s) | load |",
            RULE]

    def row(kind, r, budget=None, error=None):
        if error is not None:
            rows.append(f"| {kind} | | | {budget / 1e6:.0f} | | | | failed: {error} | | | |"
                        if budget else f"| {kind} | | | – | | | | failed: {error} | | | |")
        else:
            rows.append(f"| {kind} | {r['atoms']} | {r['edges']} | "
                        f"{'–' if budget is None else f'{budget / 1e6:.0f}'} | {r['parts']} | "
                        f"{r['predicted'] / 1e6:.0f} | {r['added'] / 1e6:.0f} | "
                        f"{r['predicted'] / r['added']:.2f} | {r['calibration']:.1f} | "
                        f"{r['seconds']:.1f} | {r['load']:.1f} |")
        print(rows[-1], flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(head + rows) + "\n")
        tmp.replace(out)

    def attempt(kind, size, budget=None, tag="free", label=None):
        try:
            r = run(kind, size, budget=budget, tag=tag, generic=tag == "generic", code=code)
        except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others still run
            row(label or kind, None, budget, str(exc).strip().splitlines()[-1][:160].replace("|", "/"))
            return None
        row(label or kind, r, budget)
        return r

    for kind in progress(kinds if "small" in sizes else [], "families: ~1,000 atoms"):
        small, _, bounded = FAMILY_SIZES[kind]
        free = attempt(kind, small)
        if bounded and free is not None:
            attempt(kind, small, budget=int(0.3 * free["added"]), tag="bounded")
        if paths and free is not None:
            attempt(kind, small, budget=int(1.2 * free["added"]), tag="at_once", label=f"{kind}, all at once")
            attempt(kind, small, budget=int(0.3 * free["added"]), tag="generic", label=f"{kind}, generic replay")
    larger = [k for k in kinds if FAMILY_SIZES[k][1]] if "large" in sizes else []
    for kind in progress(larger, "families: larger"):
        free = attempt(kind, FAMILY_SIZES[kind][1])
        if bounded_large and FAMILY_SIZES[kind][2] and free is not None:
            attempt(kind, FAMILY_SIZES[kind][1], budget=int(0.3 * free["added"]), tag="bounded")
    write_result(out, head + rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bounded-only", action="store_true",
                        help="only the bounded-evaluation table (the model table is kept from the last run)")
    parser.add_argument("--bounded-kinds", nargs="+", default=["schnet64", "sevennet-0", "mace"],
                        help="models of the bounded-evaluation table")
    parser.add_argument("--families", action="store_true",
                        help="the every-family table (bench/results/memory_families.md) instead")
    parser.add_argument("--kinds", nargs="+", choices=list(FAMILY_SIZES),
                        help="with --families: only these kinds (default all, in this order)")
    parser.add_argument("--sizes", nargs="+", choices=["small", "large"], default=["small", "large"],
                        help="with --families: the ~1,000-atom rows (with their bounded rows), the "
                             "larger ones, or both")
    parser.add_argument("--append", action="store_true",
                        help="with --families: keep the rows of memory_families.md, add these")
    parser.add_argument("--bounded-large", action="store_true",
                        help="with --families: bounded rows (0.3x) at the larger sizes too")
    parser.add_argument("--paths", action="store_true",
                        help="with --families: rows all at once under 1.2x and by the generic replay under 0.3x")
    parser.add_argument("--output", type=Path, help="with --families: the table's file")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="with --families: the distmlip tree the workers import (default this one)")
    args = parser.parse_args()
    if args.families:
        return families(args.kinds or list(FAMILY_SIZES), args.sizes, args.append, args.bounded_large,
                        args.paths, args.output, args.code.resolve())
    import numpy as np

    quick = args.quick
    model_sizes = {
        "schnet32": [6, 14] if quick else [6, 14, 24],         # 864, 10976, 55296 Al atoms
        "sevennet-0": [1, 2] if quick else [1, 2, 3],          # 48, 384 (x2: 96/768?), rutile
        "mace": [3, 5],                                        # 108, 500 Cu atoms (5.6 GB)
        "chgnet": [1, 2],                                      # rutile
    }
    lines = ["## Memory: the memory model and bounded evaluation", "",
             "Command: `.venv/bin/python bench/bench_memory.py" + (" --quick" if quick else "") + "`. "
             "Each row is a fresh process; *added* is the peak resident memory above the level before "
             "the call (what `max_memory` bounds). SchNet: 3 interactions, 5 Å; `schnet32` float32 "
             "64 channels; `schnet64` float64 32 channels. SevenNet-0 and CHGNet: pretrained, rutile "
             "TiO2; MACE: random ScaleShiftMACE (test model, 128x0e+128x1o, float64) on Cu.", "",
             "### Memory model: `estimate_memory` vs measured (1 part, unbounded)", "",
             "| model | atoms | edges (cutoff + skin) | predicted (MB) | measured (MB) | predicted / measured | calibration (s) | load |",
             "|---|---|---|---|---|---|---|---|"]
    out = ROOT / "bench" / "results" / ("memory_quick.md" if quick else "memory.md")
    if args.bounded_only and out.exists():
        previous = out.read_text().split("\n### Bounded")[0].rstrip("\n").split("\n")
        lines = previous
        model_sizes = {}
    for kind, sizes in model_sizes.items():
        for size in progress(sizes, f"memory model: {kind}"):
            r = run(kind, size)
            lines.append(f"| {kind} | {r['atoms']} | {r['edges']} | {r['predicted'] / 1e6:.0f} | "
                         f"{r['added'] / 1e6:.0f} | {r['predicted'] / r['added']:.2f} | "
                         f"{r['calibration']:.1f} | {r['load']:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", "### Bounded evaluation: `max_memory` = 0.3 x the unbounded added peak", "",
              "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_memory.py "
              + " ".join(sys.argv[1:]) + "`", "",
              "| model | atoms | unbounded added (MB) | budget (MB) | bounded added (MB) | ratio | parts | time unbounded (s) | time bounded (s) | time ratio | CPU ratio | max rel. dev. forces | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sizes = {"schnet64": 18, "sevennet-0": 2 if quick else 3, "mace": 5}
    for kind in progress(args.bounded_kinds, "bounded runs"):
        size = sizes[kind]
        free = run(kind, size, tag="free")
        budget = int(0.3 * free["added"])
        bounded = run(kind, size, budget=budget, tag="bounded")
        f0, f1 = np.load(free["out"]), np.load(bounded["out"])
        dev = float(np.abs(f1["forces"] - f0["forces"]).max() / max(np.abs(f0["forces"]).max(), 1.0))
        lines.append(f"| {kind} | {free['atoms']} | {free['added'] / 1e6:.0f} | {budget / 1e6:.0f} | "
                     f"{bounded['added'] / 1e6:.0f} | {bounded['added'] / free['added']:.2f} | "
                     f"{bounded['parts']} | {free['seconds']:.1f} | {bounded['seconds']:.1f} | "
                     f"{bounded['seconds'] / free['seconds']:.2f} | {bounded['cpu'] / free['cpu']:.2f} | "
                     f"{dev:.1e} | {bounded['load']:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "Time of the bounded run includes nothing of the calibration (it ran in "
              "`estimate_memory` before, cached per model). CPU ratio: the same for the process's CPU "
              "time (single-threaded work: much less sensitive than wall time to other jobs sharing "
              "the 2 cores). Load: 1-minute load average at the end of the bounded run."]
    write_result(out, lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
