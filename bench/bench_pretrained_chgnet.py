"""CHGNet 0.3.0: chgnet's own ASE calculator vs distmlip (1 part, 4 parts), time and peak memory.

System: olivine LiFePO4 (Pnma, 28 atoms per cell), 1x2x3 cells = 168 atoms, rattled; CHGNet 0.3.0
(6 Å atom graph, 3 Å bond graph, 4 layers), float32 as shipped; one energy + forces + stress
evaluation per call. Every configuration runs in a fresh Python process (peak RSS is its own): it
builds the calculator, evaluates once (warm-up), then ``--repeats`` more times on freshly rattled
positions; time = best repeat, peak RSS = ``VmHWM`` of the whole process (Python, torch,
model, graphs, autograd tape). The mpirun configuration runs 4 processes, one part each, and
reports the largest and the summed per-rank peaks.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pretrained_chgnet.py [--repeats 2]
Writes bench/results/pretrained_chgnet.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "pretrained_chgnet.md"
REPEAT = (1, 2, 3)

# (label, kind, calculator options)
CONFIGS = [
    ("CHGNetCalculator (chgnet 0.3.0)", "chgnet", {}),
    ("distmlip, 1 part", "distmlip", {"num_parts": 1, "mode": "halo"}),
    ("distmlip, 4 parts, halo (1 process)", "distmlip", {"num_parts": 4, "mode": "halo"}),
    ("distmlip, 4 parts, extended (1 process)", "distmlip", {"num_parts": 4, "mode": "extended"}),
    ("distmlip, 4 parts, halo (mpirun -n 4, 1 part per rank)", "mpi", {"num_parts": 4, "mode": "halo"}),
]


def structure(seed: int = 0):
    """Olivine LiFePO4 (Pnma; cell and Wyckoff positions of the experimental structure)."""
    from ase.spacegroup import crystal

    atoms = crystal(
        ["Li", "Fe", "P", "O", "O", "O"],
        basis=[(0.0, 0.0, 0.0), (0.2822, 0.25, 0.9747), (0.0950, 0.25, 0.4182),
               (0.0967, 0.25, 0.7428), (0.4571, 0.25, 0.2060), (0.1656, 0.0464, 0.2848)],
        spacegroup=62, cellpar=[10.332, 6.010, 4.692, 90, 90, 90],
    ).repeat(REPEAT)
    atoms.rattle(0.03, seed=seed)
    return atoms



def worker(kind: str, options: dict, repeats: int) -> dict:
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    if kind == "chgnet":
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):
            calc = CHGNetCalculator(use_device="cpu")
    else:
        import distmlip

        calc = distmlip.DistributedCalculator(distmlip.load("chgnet-0.3.0"), **options)
    rss_loaded = harness.peak_gb()
    calls = harness.timed_calls(calc, structure, repeats, quiet=True)
    last = calls[-1]  # compared with the package's last call (the same structure)
    return {"atoms": last["atoms"], "time": calls[harness.best_call(calls)]["time"], "first": calls[0]["time"],
            "rss_loaded": rss_loaded, "rss_peak": harness.peak_gb(), "energy": last["energy"],
            "forces": last["forces"].tolist(), "stress": last["stress"].tolist(), **harness.plan_figures(calc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations after the warm-up")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    args = parser.parse_args()

    import chgnet
    import numpy as np
    import torch

    rows = harness.run_configs(__file__, CONFIGS, args.repeats, args.timeout)

    ref = rows[0][1]
    lines = [
        "## CHGNet 0.3.0: chgnet's calculator vs distmlip",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pretrained_chgnet.py --repeats {args.repeats}`",
        "",
        f"System: rattled olivine LiFePO4, {'x'.join(map(str, REPEAT))} cells, "
        f"{ref['atoms'] if ref else '?'} atoms; CHGNet 0.3.0 (6 Å atom graph, 3 Å bond graph, 4 "
        f"layers), float32, one energy + forces + stress evaluation. Machine: {os.cpu_count()} cores "
        f"(shared with other jobs), Python {platform.python_version()}, torch {torch.__version__}, "
        f"chgnet {chgnet.__version__}, 1 torch thread per process. Each row is a fresh process "
        f"(mpirun: 4 processes); time = best of {args.repeats} evaluations after a warm-up; peak RSS = "
        f"`VmHWM` of the whole process; 'loaded' = RSS before the first evaluation.",
        "",
        "| configuration | time (s) | vs CHGNet | peak RSS (GB) | RSS loaded (GB) | edges evaluated / graph edges | halo atoms / atoms | max abs ΔF vs CHGNet (eV/Å) | abs ΔE vs CHGNet (eV/atom) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res, note in rows:
        if res is None:
            lines.append(f"| {label} | – | – | – | – | – | – | – | {note} |")
            continue
        speed = f"{res['time'] / ref['time']:.2f}×" if ref else "–"
        halo = f"{res['halo']:.2f}" if "halo" in res else "–"
        if ref:
            dforce = f"{np.abs(np.array(res['forces']) - np.array(ref['forces'])).max():.1e}"
            denergy = f"{abs(res['energy'] - ref['energy']) / res['atoms']:.1e}"
        else:
            dforce = denergy = "–"
        lines.append(f"| {label} | {res['time']:.2f} | {speed} | {harness.peak_cell(res)} | {res['rss_loaded']:.2f} | "
                     f"{harness.edges_cell(res)} | {halo} | {dforce} | {denergy} |")
    lines += [
        "",
        "Notes: CHGNet's calculator always runs its full task (energy, forces, stress, magnetic "
        "moments) and builds its force graph with `create_graph=True` (kept for training). "
        "distmlip evaluates every atom-graph edge once in halo mode and exchanges atom features plus "
        "each atom's partial bond messages (64 slots x 64 floats) after every layer but the last "
        "(3 exchanges). In extended mode every part holds a 4-hop halo; at this size that is the "
        "whole system, so each part repeats the calculation. The mpirun row runs 4 processes on "
        "2 cores (oversubscribed); its time is the slowest rank's. ΔE/ΔF: float32 rounding (two "
        "float32 evaluations summing in different orders).",
        "",
    ]
    harness.write_result(RESULT, lines)


if __name__ == "__main__":
    harness.main_or_worker(main, harness.config_worker(worker))
