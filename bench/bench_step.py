"""A step between rebuilds (issue 21): the work outside the model per edge and per atom, step time
against the host path it replaced, and the bytes that cross host <-> device per step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_step.py      # writes bench/results/step.md

For each model (SchNet float32 and Lennard-Jones float64 on FCC Cu 18x18x18, 23,328 atoms;
SevenNet-0 float32 on 480 Cu atoms) and
each code (this checkout; ``--baseline REV``, default the commit before the device step, exported
with ``git archive`` into a temporary directory), one fresh process with one torch thread: build
once, then ``--steps`` timed ``Runner.evaluate`` calls at positions moved by at most 0.01 Å from
the build (no rebuild; checked). Model time: the model's forward and backward on the same local
graph (made from host arrays by ``local_graph``, present in both codes), best of ``--steps``;
outside the model = step - model. Bytes per step are counted from the sizes the code moves
(identical to the copies made on an accelerator; on the CPU ``torch.as_tensor`` shares memory):

- device path: in the positions (N, 3) and cell (3, 3) float64, out energies (N), forces (N, 3)
  and virial (3, 3) float64, plus two scalars per shard (the shortest edge, the kept count);
- host path: in the kept edges' float64 vectors (E, 3) and int64 ``edge_index`` (2, E), the rows'
  numbers, atom ids and owned mask, the cell and the composition; out the (E, 3) edge gradients
  in the compute dtype and the energies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import gather_max, launch, main_or_worker, write_result  # noqa: E402

RESULT = ROOT / "bench" / "results" / "step.md"
BASELINE = "498bb60"  # the last commit before runtime/resident.py

MODELS = {
    "schnet": "SchNet (3 interactions, 32 channels, cutoff 5 Å, float32, random weights)",
    "lj": "Lennard-Jones (ε 0.4 eV, σ 2.3 Å, cutoff 5 Å, float64)",
    "sevennet": "SevenNet-0 (pretrained, float32) on FCC Cu 4x5x6 cubic cells, 480 atoms",
}
DEFAULT_MODELS = ("schnet", "lj", "sevennet")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker(job: dict) -> dict:
    import numpy as np
    import torch
    from ase.build import bulk

    from distmlip import DistributedCalculator
    from distmlip.models import LennardJones, SchNet
    from distmlip.models.base import no_exchange
    from distmlip.runtime.local import local_edges, local_graph, run_model

    torch.set_num_threads(1)
    reps = (4, 5, 6) if job["model"] == "sevennet" else (job["reps"],) * 3
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    atoms.rattle(0.05, seed=1)
    if job["model"] == "schnet":
        model, dtype = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32, seed=1), "float32"
    elif job["model"] == "sevennet":
        import distmlip

        model, dtype = distmlip.load("sevennet-0"), "float32"
    else:
        model, dtype = LennardJones(epsilon=0.4, sigma=2.3, cutoff=5.0), "float64"
    if job.get("ranks"):
        return traffic(model, dtype, atoms)
    device = job.get("device", "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calc = DistributedCalculator(model, 1, dtype=dtype, skin=0.5, device=device)
    runner = calc.runner
    cell, pbc, numbers = atoms.cell.array, atoms.pbc, atoms.numbers
    runner.evaluate(atoms.positions, cell, pbc, numbers)
    # the model's share of each step, timed inside it: ``run_model`` and ``torch.autograd.grad``
    # as the all-at-once path calls them (the same two calls in both codes)
    import distmlip.runtime.parallel as parallel

    inside = [0.0]

    def timed(fn):
        def call(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                inside[0] += time.perf_counter() - t0
        return call

    parallel.run_model = timed(parallel.run_model)
    torch.autograd.grad = timed(torch.autograd.grad)  # this worker process only
    rng = np.random.default_rng(0)
    steps, outside_edges, outside = [], [], []
    for _ in range(job["steps"]):
        moved = atoms.positions + rng.uniform(-0.01, 0.01, atoms.positions.shape)
        inside[0] = 0.0
        t0 = time.perf_counter()
        runner.evaluate(moved, cell, pbc, numbers)
        steps.append(time.perf_counter() - t0)
        outside.append(steps[-1] - inside[0])
        outside_edges.append(runner.timings["edges"])
    if runner.graph_builds != 1:
        raise RuntimeError(f"expected no rebuild after the first, got {runner.graph_builds} builds")
    host = host_only(runner, moved, cell, pbc, numbers, parallel)
    b = runner._built
    (shard,) = b.shards
    device = runner.comm.device(shard)
    edges, edge_index, vec = local_edges(b.graph, moved, b.ids, cell, shard.edges, shard.edge_index,
                                         runner.cutoff)
    n, e, rows = len(atoms), len(edges), shard.num_rows
    model_s = []
    replica = runner.replicas[device]
    for _ in range(job["steps"]):
        local = local_graph(b.graph.numbers[shard.atoms], edge_index, vec, no_exchange, shard.atoms,
                            cell, shard.num_owned, shard.num_owned, runner.dtype, device)
        sync()
        t0 = time.perf_counter()
        out = run_model(replica, local)
        torch.autograd.grad(out.sum(), [local.edge_vec])
        sync()
        model_s.append(time.perf_counter() - t0)
    size = torch.tensor([], dtype=runner.dtype).element_size()
    if job["code"] == "device":
        into, back = 24 * n + 72, 32 * n + 72 + 2 * 8
    else:
        into = 24 * e + 16 * e + 8 * rows + 8 * rows + rows + 72 + 119 * 8
        back = size * 3 * e + size * rows
    return {"atoms": n, "edges": e, "graph_edges": int(b.graph.num_edges),
            "step": float(np.median(steps)), "step_min": float(min(steps)),
            "edges_s": float(np.median(outside_edges)), "model": float(min(model_s)),
            "outside": float(np.median(outside)), "outside_min": float(min(outside)),
            "into": into, "back": back, **host}


def host_only(runner, positions, cell, pbc, numbers, parallel) -> dict:
    """One more step under torch's profiler: the step's time outside the model less the CPU time
    of the torch operators run outside the model (their own time, dispatch included) = the
    host's Python and NumPy work between rebuilds (on a GPU the operators run on the device)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    spans, clock = [], time.perf_counter
    run_model, grad = parallel.run_model, torch.autograd.grad

    def spanned(fn):
        def call(*a, **k):
            t0 = clock()
            try:
                with torch.profiler.record_function("bench:model"):
                    return fn(*a, **k)
            finally:
                spans.append(clock() - t0)
        return call

    parallel.run_model, torch.autograd.grad = spanned(run_model), spanned(grad)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = clock()
            runner.evaluate(positions, cell, pbc, numbers)
            step = clock() - t0
    finally:
        parallel.run_model, torch.autograd.grad = run_model, grad
    inside = sum(spans)
    # the operators outside the model: top-level events other than the model's ranges (whose
    # operators are their children), their inclusive CPU time
    ops = sum(e.cpu_time_total for e in prof.events()
              if e.cpu_parent is None and e.name != "bench:model") * 1e-6
    return {"host_only": max(step - inside - ops, 0.0), "ops_outside": ops, "profiled_step": step}


def traffic(model, dtype, atoms) -> dict | None:
    """Under ``mpirun -n 2``: the result bytes each rank sends a step (``Runner.result_bytes_sent``)
    against the (4N + 9) float64 all-reduce it replaced (a ring all-reduce sends
    2 (P - 1) / P of the buffer per rank)."""
    from distmlip import DistributedCalculator

    calc = DistributedCalculator(model, dtype=dtype, skin=0.5)
    runner = calc.runner
    runner.evaluate(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
    runner.evaluate(atoms.positions + 0.01, atoms.cell.array, atoms.pbc, atoms.numbers)
    p, n = runner.world_size, len(atoms)
    res = {"atoms": n, "ranks": p, "sent": int(getattr(runner, "result_bytes_sent", 0)),
           "allreduce": int(2 * (p - 1) / p * 8 * (4 * n + 9))}
    return gather_max(res, maximum=("sent",))


def baseline_tree(rev: str, where: str) -> Path:
    """The source of ``rev`` exported into ``where`` (no worktree registered)."""
    archive = subprocess.run(["git", "archive", rev, "distmlip"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    return Path(where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=18, help="FCC cells per side (18: 23,328 atoms)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--baseline", default=BASELINE, help="the host-path commit to compare with")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--render", action="store_true",
                        help="rewrite step.md from the last run's step.json, running nothing")
    args = parser.parse_args()
    if args.render:
        rows = json.loads(RESULT.with_suffix(".json").read_text())
    else:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            old = baseline_tree(args.baseline, tmp)
            import torch

            # the GPU section: the same rows on CUDA where there is one (not on this machine)
            devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
            for device, name in ((d, m) for d in devices for m in args.models):
                res = {}
                for code, tree in (("host", old), ("device", ROOT)):
                    job = {"model": name, "reps": args.reps, "steps": args.steps, "code": code,
                           "device": device}
                    res[code] = launch(__file__, job, timeout=args.timeout, code=tree)
                    log(f"{name} {device} {code}: {res[code]}")
                rows.append((name if device == "cpu" else f"{name} ({device})", res))
            job = {"model": "lj", "reps": args.reps, "steps": 1, "ranks": 2}
            rows.append(("traffic", launch(__file__, job, timeout=args.timeout, procs=2)))
            log(f"traffic: {rows[-1][1]}")
        RESULT.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    render(rows, args)


def render(rows: list, args) -> None:
    """step.md from the results ``rows`` ((model, {code: result}))."""
    load = os.getloadavg()[0]
    lines = [
        "## A step between rebuilds: host work, step time, bytes host <-> device (issue 21)", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_step.py --steps {args.steps}`", "",
        f"FCC Cu {args.reps}x{args.reps}x{args.reps}, rattled 0.05 Å, skin 0.5 Å, one part, one "
        f"process, one torch thread; {args.steps} timed steps between rebuilds (positions moved "
        f"≤ 0.01 Å); s/step is the best of them (the shared cores' load varies by tens of percent "
        f"between calls; the median is in step.json). host: commit {args.baseline} (edge vectors "
        f"and forces in NumPy); "
        f"device: this checkout (runtime/resident.py). Machine: {os.cpu_count()} cores shared "
        f"with other jobs (1-min load {load:.2f} at the end), Python {platform.python_version()}.",
        "",
        "| model | code | atoms | edges (kept / graph) | s/step | vs host | model s | outside s "
        "| outside ns/edge | outside µs/atom | host-only µs/atom | edge stage s "
        "| bytes in / out per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    moved = None
    for name, res in rows:
        if name == "traffic":
            moved = res
            continue
        for code in ("host", "device"):
            r = res[code]
            outside = r["outside"]
            host = f"{1e6 * r['host_only'] / r['atoms']:.2f}" if "host_only" in r else "-"
            lines.append(
                f"| {name} | {code} | {r['atoms']:,} | {r['edges']:,} / {r['graph_edges']:,} | "
                f"{r['step_min']:.3f} | {r['step_min'] / res['host']['step_min']:.3f}× | {r['model']:.3f} | "
                f"{outside:.3f} | {1e9 * outside / r['edges']:.1f} | {1e6 * outside / r['atoms']:.2f} | "
                f"{host} | {r['edges_s']:.3f} | {r['into']:,} / {r['back']:,} |")
    if not any(name.endswith("(cuda)") for name, _ in rows):
        lines += ["", "GPU section: not run (no CUDA device on this machine); where torch sees one, "
                  "the same rows run again with `device='cuda'` (named `<model> (cuda)`)."]
    if moved:
        lines += ["", f"Results over ranks (`mpirun -n {moved['ranks']}`, Lennard-Jones, "
                  f"{moved['atoms']:,} atoms, one part per rank): each rank sends "
                  f"{moved['sent']:,} bytes of results a step (its owned rows, its halo atoms' "
                  f"forces, its virial; the largest over ranks) against {moved['allreduce']:,} for "
                  f"the (4N + 9) float64 all-reduce it replaced (ring: 2 (P - 1) / P of the buffer): "
                  f"{moved['sent'] / moved['allreduce']:.2f}×."]
    lines += ["", "Models: " + "; ".join(f"{k}: {MODELS[k]}" for k in args.models) + ".", "",
              "model s: forward + backward of the model alone on the same graph (best of the "
              "steps); outside s: each step's time less the time spent in the model's forward and "
              "backward during it (`run_model` and `torch.autograd.grad`, timed in the step), "
              "median (edge vectors, cutoff mask, coincident check, graph assembly, force scatter "
              "and virial, the copies, the runner). host-only: one more step under torch's profiler, the "
              "outside time less the CPU time of the torch operators run outside the model (the "
              "host's Python and NumPy work between rebuilds; on a GPU the operators run on the "
              "device). edge stage s: "
              "the runner's `timings['edges']` (making the local graphs). Bytes: counted from the "
              "sizes each code moves (see the module docstring); on a CPU they are not copied."]
    write_result(RESULT, lines)


if __name__ == "__main__":
    main_or_worker(main, worker)
