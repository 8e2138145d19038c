"""Node-wise work of split models: SevenNet-0, MACE and SchNet, 1/2/4/8 parts in one process and
``mpirun -n 2`` (one part per rank) against one process, one part.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_node_work.py [--compare /path/to/other/checkout]

For each model and configuration, in a fresh process (mpirun: 2 fresh processes): build the
calculator, one warm-up energy + forces + stress call, then ``--repeats`` timed calls, each on a
freshly rattled copy of the structure (the same structures in every configuration); the time is
the best timed call (mpirun: the slowest rank's), the peak memory the child's ``VmHWM`` from
``/proc/self/status`` (mpirun: the largest rank's and the sum over ranks). Counted on the last call
with forward hooks on the model's modules, summed over parts (and ranks):

- node rows / atom: rows computed by the node-wise update of every interaction layer and by the
  readout, averaged over those modules, per atom of the system (1.00: no halo row is updated);
  SevenNet: ``{i}_equivariant_gate`` and ``reduce_input_to_hidden``; SchNet: ``interactions[k].lin``
  and ``readout[0]``; MACE: ``products[k]`` and ``readouts[k]``;
- conv rows / atom: rows the convolutions produce (every local row, owned + halo: the messages
  are summed into an (n, ...) tensor), same averaging; SevenNet only (SchNet sums into the needed
  rows);
- edges / atom: edges evaluated (every part's local edges) per atom.

``--compare DIR`` runs every configuration a second time with the ``distmlip`` package of another
checkout (e.g. the commit before this change, ``git worktree add /tmp/before <commit>``), right
after this tree's run, so both see the same machine load; the table shows both side by side.
Writes a section to bench/results/node_work.md (``--output`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402

RESULT = ROOT / "bench" / "results" / "node_work.md"

MODELS = {
    # name: (structure description, repetitions)
    "sevennet-0": "rutile TiO2",
    "schnet": "FCC Cu",
    "mace": "FCC Cu",
}
# (label, parts, launcher): launcher "local" (one process, one worker) or "mpi" (mpirun -n parts)
CONFIGS = [("1 part", 1, "local"), ("2 parts", 2, "local"), ("4 parts", 4, "local"),
           ("8 parts", 8, "local"), ("mpirun -n 2", 2, "mpi")]



def structure(model: str, size: tuple, seed: int):
    if model == "sevennet-0":
        from ase.spacegroup import crystal

        atoms = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                        cellpar=[4.594, 4.594, 2.959, 90, 90, 90]).repeat(size)
        atoms.rattle(0.05, seed=seed)
    else:
        from ase.build import bulk

        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(size)
        atoms.rattle(0.02, seed=seed)
    return atoms


def build_model(model: str):
    import torch

    import distmlip

    if model == "sevennet-0":
        wrapped = distmlip.load("sevennet-0")
        mods = wrapped.module._modules
        node = [m for k, m in mods.items() if k.endswith("_equivariant_gate")]
        node.append(mods["reduce_input_to_hidden"])
        conv = [m for k, m in mods.items() if k.endswith("_convolution")]
        return wrapped, node, conv
    if model == "mace":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_node_work_mace import make_model

        wrapped = distmlip.wrap(make_model())
        mace = wrapped.module
        return wrapped, list(mace.products) + list(mace.readouts), []
    from distmlip.models import SchNet

    wrapped = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=0, dtype=torch.float32)
    return wrapped, [b.lin for b in wrapped.interactions] + [wrapped.readout[0]], []


def worker(job: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import distmlip

    torch.set_num_threads(1)
    model, node_mods, conv_mods = build_model(job["model"])
    counts = {"node": 0, "conv": 0}

    def counter(kind):
        def hook(mod, inputs, out):
            # rows that went in (MACE's readouts pad their output back to every local row);
            # SevenNet's modules take and return the data dict
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else \
                out if isinstance(out, torch.Tensor) else out["x"]
            counts[kind] += int(x.shape[0])
        return hook

    for m in node_mods:  # hooks travel with the runner's deep copy of the model
        m.register_forward_hook(counter("node"))
    for m in conv_mods:
        m.register_forward_hook(counter("conv"))
    # the part count by position: the keyword was num_partitions before 2026-12-02 (--compare)
    parts = None if job["launcher"] == "mpi" else job["parts"]  # mpi: one part per rank
    calc = distmlip.DistributedCalculator(model, parts, mode="halo")
    times, cpu = [], []
    for seed in range(job["repeats"] + 1):
        atoms = structure(job["model"], tuple(job["size"]), seed)
        atoms.calc = calc
        counts.update(node=0, conv=0)
        t0, c0 = time.perf_counter(), time.process_time()
        atoms.get_potential_energy()
        atoms.get_forces()
        atoms.get_stress()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    plan = calc.last_plan
    res = {"atoms": len(atoms), "time": min(times[1:]), "cpu": min(cpu[1:]), "first": times[0],
           "peak": harness.peak_gb(),
           "node_rows": counts["node"] / max(len(node_mods), 1),
           "conv_rows": counts["conv"] / max(len(conv_mods), 1),
           "edges": int(plan.edges_evaluated()), "energy": float(atoms.get_potential_energy())}
    if job["launcher"] != "mpi":
        return res
    gathered = harness.gather_on_rank0(res, calc.world_size)
    if gathered is None:
        return None
    return {"atoms": res["atoms"], "time": max(g["time"] for g in gathered),
            "cpu": max(g["cpu"] for g in gathered),
            "first": max(g["first"] for g in gathered), "peak": max(g["peak"] for g in gathered),
            "peak_sum": sum(g["peak"] for g in gathered), "peaks": [g["peak"] for g in gathered],
            "node_rows": sum(g["node_rows"] for g in gathered),
            "conv_rows": sum(g["conv_rows"] for g in gathered),
            "edges": sum(g["edges"] for g in gathered), "energy": res["energy"]}


def model_size(model: str, args) -> list:
    return {"sevennet-0": args.sevenn_size, "schnet": args.schnet_size, "mace": args.mace_size}[model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sevenn-size", type=int, nargs=3, default=(4, 4, 5),
                        help="rutile repetitions (6 atoms per cell; 4 4 5: 480 atoms)")
    parser.add_argument("--schnet-size", type=int, nargs=3, default=(18, 18, 18),
                        help="cubic FCC Cu repetitions (4 atoms per cell; 18: 23328 atoms)")
    parser.add_argument("--mace-size", type=int, nargs=3, default=(6, 6, 6),
                        help="cubic FCC Cu repetitions for MACE (6: 864 atoms)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
    parser.add_argument("--compare", type=Path, help="another checkout to run every configuration with")
    parser.add_argument("--configs", nargs="+", help="labels of CONFIGS to run (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()

    import torch

    trees = [("this tree", ROOT)] + ([("compare", args.compare.resolve())] if args.compare else [])
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs]
    rows = []  # (model, label, tree, result or error string, load)
    for model in args.models:
        size = model_size(model, args)
        for label, parts, launcher in harness.progress(configs, f"node work: {model}"):
            for tree, code in trees:
                job = {"model": model, "size": list(size), "parts": parts, "launcher": launcher,
                       "repeats": args.repeats}
                load = os.getloadavg()[0]
                try:
                    res = harness.launch(__file__, job, procs=parts if launcher == "mpi" else None,
                                 code=code, cwd=code, timeout=args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    res = harness.failure(exc)
                rows.append((model, label, tree, res, load))
                print(model, label, tree, f"load {load:.2f}", res, flush=True)

    cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_node_work.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    heads = ", ".join(f"{tree}: `{harness.git_head(code)}`" for tree, code in trees)
    lines = ["## Node-wise work of split models (halo mode)", "", f"Command: `{cmd}`", "",
             f"Code: {heads}. Machine: {os.cpu_count()} cores shared with other jobs, Python "
             f"{platform.python_version()}, torch {torch.__version__}, one torch thread per process. "
             f"Each row is a fresh process (mpirun: 2 processes, one part each); time = best of "
             f"{args.repeats} energy + forces + stress calls after a warm-up, each on a freshly rattled "
             "structure (mpirun: slowest rank); cpu = the process's CPU time (user + system) of its "
             "best call (mpirun: the largest rank's), much less sensitive than wall time to other jobs "
             "sharing the cores (it does not count time spent waiting, e.g. for a peer); peak = `VmHWM` of the process (mpirun: largest rank, "
             "and the sum); node rows / atom = rows computed by each layer's node-wise update and by "
             "the readout, summed over parts, per atom (1.00: no halo row updated); conv rows = rows "
             "the convolutions output (SevenNet); edges / atom = edges evaluated per atom; load = "
             "1-minute load average when the row started (2 cores).", ""]
    for model in args.models:
        size = model_size(model, args)
        mine = [r for r in rows if r[0] == model]
        natoms = next((r[3]["atoms"] for r in mine if isinstance(r[3], dict)), "?")
        desc = {"sevennet-0": "SevenNet-0 (5 Å cutoff, 5 convolutions), float32",
                "schnet": "SchNet (3 interactions, 32 channels, 5 Å cutoff), float32, random weights",
                "mace": "ScaleShiftMACE (r_max 5 Å, 2 interactions, 64x0e+64x1o, correlation 3), "
                        "float64, random weights"}[model]
        lines += [f"### {desc}: {MODELS[model]} {'x'.join(map(str, size))}, {natoms} atoms", "",
                  "| configuration | code | time (s) | vs 1 part | cpu (s) | vs 1 part | peak (GB) | "
                  "vs 1 part | node rows / atom | conv rows / atom | edges / atom | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {tree: r[3] for r in mine if r[1] == "1 part" for tree in [r[2]] if isinstance(r[3], dict)}
        for _, label, tree, res, load in mine:
            if not isinstance(res, dict):
                lines.append(f"| {label} | {tree} | {res} | | | | | | | | | {load:.1f} |")
                continue
            b = base.get(tree)
            n = res["atoms"]
            peak = f"{res['peak']:.2f}" + (f" (sum {res['peak_sum']:.2f})" if "peak_sum" in res else "")
            ratio_t = f"{res['time'] / b['time']:.2f}" if b else "–"
            ratio_m = f"{res['peak'] / b['peak']:.2f}" if b else "–"
            ratio_c = f"{res['cpu'] / b['cpu']:.2f}" if b else "–"
            conv = f"{res['conv_rows'] / n:.2f}" if res["conv_rows"] else "–"
            lines.append(f"| {label} | {tree} | {res['time']:.2f} | {ratio_t} | {res['cpu']:.2f} | {ratio_c} | "
                         f"{peak} | {ratio_m} | "
                         f"{res['node_rows'] / n:.2f} | {conv} | {res['edges'] / n:.1f} | {load:.1f} |")
        lines.append("")
    harness.write_result(args.output, lines)


if __name__ == "__main__":
    harness.main_or_worker(main, worker)
