"""Graph and plan reuse with a Verlet skin: MD step time with skin = 0 (rebuild every step) vs the
default skin (0.5 Å) and 1.0 Å; NVE, and NPT (the cell changes every step).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_reuse.py      # writes bench/results/reuse.md

For each model (Lennard-Jones on >= 50k atoms of FCC Cu, SchNet float32 on ~11k atoms of FCC Cu,
SevenNet-0 on 270 atoms of rutile TiO2) and each skin, one fresh process: build the crystal, draw
Maxwell-Boltzmann velocities at twice the target temperature (equipartition brings a harmonic
crystal to about the target), run ``--warmup`` ASE VelocityVerlet steps untimed, then ``--steps``
timed steps one at a time. Per step it records the wall time of ``dyn.run(1)``, ``calc.timings``
and whether the graph was rebuilt (``calc.graph_builds`` went up). One process, one torch thread,
``num_parts`` parts (default 1), halo mode, grid partitioner. The trajectory is the same for
every skin (same seed; forces equal to floating-point order), so rebuild counts are comparable.
Peak memory is VmHWM of the worker process (/proc/self/status).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import launch, main_or_worker, vm_hwm_mb, write_result  # noqa: E402

RESULT = ROOT / "bench" / "results" / "reuse.md"

# name -> what the worker builds; timestep in fs
MODELS = {
    "lj": {"label": "Lennard-Jones (ε 0.4 eV, σ 2.3 Å, cutoff 5 Å, float64)", "crystal": "cu",
           "reps": 24, "timestep": 2.0, "warmup": 10, "steps": 40, "skins": [0.0, 0.5, 1.0]},
    "schnet": {"label": "SchNet (3 interactions, 32 channels, cutoff 5 Å, float32, random weights)",
               "crystal": "cu", "reps": 14, "timestep": 2.0, "warmup": 3, "steps": 20,
               "skins": [0.0, 0.5, 1.0]},
    "sevennet": {"label": "SevenNet-0 (5 Å cutoff, 5 convolutions, float32)", "crystal": "tio2",
                 "reps": (3, 3, 5), "timestep": 1.0, "warmup": 6, "steps": 20, "skins": [0.0, 0.5]},
    # NPT: the cell changes every step; the graph is kept while the strain-aware bound holds
    "lj-npt": {"label": "Lennard-Jones as lj, ASE's MTKNPT at 0 GPa (tdamp 50 fs, pdamp 500 fs): "
                        "the cell changes every step", "crystal": "cu", "reps": 24, "timestep": 2.0,
               "warmup": 10, "steps": 40, "skins": [0.0, 0.5], "ensemble": "npt"},
}



def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_system(name: str, spec: dict):
    import torch
    from ase.build import bulk

    if spec["crystal"] == "cu":
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((spec["reps"],) * 3)
    else:
        from ase.spacegroup import crystal

        atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                        cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat(spec["reps"])
    if name in ("lj", "lj-npt"):
        from distmlip.models import LennardJones

        model = LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0)
    elif name == "schnet":
        from distmlip.models import SchNet

        model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float32)
    else:
        import distmlip

        model = distmlip.load("sevennet-0")
    return atoms, model


def worker(job: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from distmlip import DistributedCalculator

    torch.set_num_threads(1)
    name, skin, parts = job["model"], job["skin"], job["parts"]
    spec = dict(MODELS[name], **job.get("override", {}))
    atoms, model = build_system(name, spec)
    calc = DistributedCalculator(model, num_parts=parts, skin=skin)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=2 * job["temperature"], rng=np.random.default_rng(0))
    Stationary(atoms)
    if spec.get("ensemble") == "npt":
        from ase.md.nose_hoover_chain import MTKNPT

        dyn = MTKNPT(atoms, timestep=spec["timestep"] * units.fs, temperature_K=job["temperature"],
                     pressure_au=0.0, tdamp=50 * units.fs, pdamp=500 * units.fs)
    else:
        dyn = VelocityVerlet(atoms, timestep=spec["timestep"] * units.fs)
    tag = f"{name} skin={skin}"
    t0 = time.perf_counter()
    for i in range(spec["warmup"]):
        dyn.run(1)
        log(f"  {tag}: warm-up step {i + 1}/{spec['warmup']} {time.perf_counter() - t0:.1f} s, "
            f"T {atoms.get_temperature():.0f} K, builds {calc.graph_builds}")
    builds0 = calc.graph_builds
    steps = []
    for i in range(spec["steps"]):
        before = calc.graph_builds
        t, c = time.perf_counter(), time.process_time()
        dyn.run(1)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        steps.append({"wall": wall, "cpu": cpu, "rebuilt": calc.graph_builds > before, "timings": dict(calc.timings),
                      "T": float(atoms.get_temperature())})
        if (i + 1) % 5 == 0 or i + 1 == spec["steps"]:
            log(f"  {tag}: step {i + 1}/{spec['steps']} {wall:.3f} s, T {steps[-1]['T']:.0f} K, "
                f"rebuilds so far {calc.graph_builds - builds0}")
    graph = calc.last_graph
    pos = atoms.positions
    vec = pos[graph.senders] - pos[graph.receivers] + graph.shifts @ atoms.cell.array
    within = int((np.einsum("ij,ij->i", vec, vec) < model.cutoff ** 2).sum())
    return {"atoms": len(atoms), "steps": steps, "rebuilds": calc.graph_builds - builds0,
            "builds_total": calc.graph_builds, "graph_edges": int(graph.num_edges),
            "cutoff_edges": within, "peak_mb": vm_hwm_mb(), "timestep": spec["timestep"],
            "warmup": spec["warmup"]}


def name_of(job: dict) -> str:
    return f"{job['model']} skin={job['skin']}"


def summarise(res: dict) -> dict:
    steps = res["steps"]
    walls = [s["wall"] for s in steps]

    def share(sel):
        chosen = [s["timings"] for s in steps if sel(s)]
        if not chosen:
            return None
        return sum(t["graph"] + t["partition"] + t["edges"] for t in chosen) / sum(t["total"] for t in chosen)

    def mean(key, sel):
        chosen = [s["timings"][key] for s in steps if sel(s)]
        return sum(chosen) / len(chosen) if chosen else None

    stages = {f"{k}_rebuild": mean(k, lambda s: s["rebuilt"]) for k in ("graph", "partition", "edges")}
    stages["edges_reuse"] = mean("edges", lambda s: not s["rebuilt"])
    return {**stages, "per_step": sum(walls) / len(walls), "cpu_step": sum(s["cpu"] for s in steps) / len(steps),
            "reuse_share": share(lambda s: not s["rebuilt"]),
            "rebuild_share": share(lambda s: s["rebuilt"]),
            "T": sum(s["T"] for s in steps) / len(steps),
            "calc": sum(s["timings"]["total"] for s in steps) / len(steps)}


def stages_txt(r: dict) -> str:
    def f(x):
        return "–" if x is None else f"{x:.3f}"

    return (f"{f(r['graph_rebuild'])} / {f(r['partition_rebuild'])} / {f(r['edges_rebuild'])}; "
            f"{f(r['edges_reuse'])}")


def pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parts", type=int, default=1, help="num_parts (one process)")
    parser.add_argument("--temperature", type=float, default=300.0, help="target K (velocities drawn at twice it)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = parser.parse_args()

    import torch

    rows = []
    start = time.perf_counter()
    for name in args.models:
        for skin in MODELS[name]["skins"]:
            job = {"model": name, "skin": skin, "parts": args.parts, "temperature": args.temperature}
            load0 = os.getloadavg()
            print(f"== {name_of(job)} (load {load0[0]:.2f}) ...", flush=True)
            res = launch(__file__, job, timeout=args.timeout, capture_stderr=False)
            load1 = os.getloadavg()
            res.update(summarise(res), load=(load0[0], load1[0]))
            rows.append((name, skin, res))
            print(f"   {res['atoms']} atoms: {res['per_step']:.3f} s/step (CPU {res['cpu_step']:.3f}), rebuilds {res['rebuilds']}/"
                  f"{len(res['steps'])}, reuse share {pct(res['reuse_share'])}, rebuild share "
                  f"{pct(res['rebuild_share'])}, peak {res['peak_mb']:.0f} MB, T {res['T']:.0f} K, "
                  f"load {load0[0]:.2f}->{load1[0]:.2f} ({time.perf_counter() - start:.0f} s so far)", flush=True)

    cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_reuse.py"
    if args.models != list(MODELS):
        cmd += " --models " + " ".join(args.models)
    if args.parts != 1:
        cmd += f" --parts {args.parts}"
    if args.temperature != 300.0:
        cmd += f" --temperature {args.temperature:g}"
    lines = [
        "## Graph and plan reuse in MD (Verlet skin)", "",
        f"Command: `{cmd}`", "",
        f"ASE VelocityVerlet (lj-npt: MTKNPT) from a perfect crystal with Maxwell-Boltzmann velocities at "
        f"{2 * args.temperature:g} K (equipartition brings a real potential's crystal to about "
        f"{args.temperature:g} K); warm-up steps untimed, then timed steps one at a time. One process, "
        f"{args.parts} part{'s' if args.parts != 1 else ''}, halo mode, one torch thread; each row a fresh "
        f"process. Machine: {os.cpu_count()} cores (shared with other jobs), Python {platform.python_version()}, "
        f"torch {torch.__version__}.", "",
        "| model | atoms | dt (fs) | skin (Å) | s/step | speed-up vs skin 0 | CPU s/step | CPU speed-up | rebuilds / timed steps "
        "| graph + plan + edges share, reuse steps | same, rebuild steps | s: graph / partition / edges, rebuild steps; edges, reuse steps "
        "| graph edges / edges within cutoff | mean T (K) | peak RSS (MB) | load 1-min start→end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for name, skin, r in rows:
        if skin == 0.0:
            base[name] = (r["per_step"], r["cpu_step"])
        speed, cpu_speed = ((base[name][0] / r["per_step"], base[name][1] / r["cpu_step"]) if name in base
                            else (float("nan"), float("nan")))
        lines.append(
            f"| {name} | {r['atoms']:,} | {r['timestep']:g} | {skin:g} | {r['per_step']:.3f} | {speed:.2f}× | "
            f"{r['cpu_step']:.3f} | {cpu_speed:.2f}× | "
            f"{r['rebuilds']} / {len(r['steps'])} | {pct(r['reuse_share'])} | {pct(r['rebuild_share'])} | "
            f"{stages_txt(r)} | {r['graph_edges'] / r['cutoff_edges']:.2f} | {r['T']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['load'][0]:.2f}→{r['load'][1]:.2f} |")
    lines += [
        "",
        "Models: " + "; ".join(f"{n}: {MODELS[n]['label']}" for n in args.models) + ". "
        "Crystals: FCC Cu (a = 3.61 Å) for Lennard-Jones and SchNet, rutile TiO2 3x3x5 for SevenNet-0.",
        "",
        "s/step: mean wall time of `dyn.run(1)` over the timed steps (rebuild steps included); CPU s/step: "
        "the same in the worker's CPU time (`time.process_time`), which other jobs on the shared cores "
        "disturb much less than wall time. "
        "Share: `(graph + partition + edges) / total` from `calc.timings`, summed over the timed steps "
        "that reused the last build (where graph and partition are 0, so it is the edge-vector "
        "recomputation and cutoff filtering alone) and over those that rebuilt (with skin 0, every step). "
        "Graph edges / edges within cutoff: the graph of the last build (cutoff + skin) over the edges "
        "the model evaluates at the last step. SchNet with random weights exerts almost no force, "
        "so its atoms fly ballistically and stay near the initial temperature.",
    ]
    write_result(RESULT, lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
