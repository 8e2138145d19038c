"""Benchmark: neighbour graph, owner assignment and plan building for FCC Cu (5 Å cutoff).

    OMP_NUM_THREADS=1 python bench/bench_partition.py                 # 10k, 100k, 1M atoms
    OMP_NUM_THREADS=1 python bench/bench_partition.py --sizes 14 29   # n^3 cubic cells (4 n^3 atoms)
    OMP_NUM_THREADS=1 python bench/bench_partition.py --profile 63 --parts 64  # cProfile at 1M atoms

Each system size runs in its own subprocess, so the peak RSS reported is that size's own. For
every size: ``NeighborGraph.from_arrays`` time; then for 8 and 64 parts and each partitioner
(METIS only up to ``--metis-max`` atoms) the owner-assignment time (``assign_owners``), the
plan-building time (``PartitionPlan.from_owner``, halo mode, one hop), the halo fraction (halo
atoms summed over parts / atoms) and the largest part's share of edges. Writes
``bench/results/partition.md`` (markdown table plus the command) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import WorkerFailed, launch, main_or_worker, peak_gb  # noqa: E402

CUTOFF = 5.0



def _crystal(n: int, seed: int = 0):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def run_one(n: int, parts_list, metis_max: int) -> dict:
    """Measure one system size (in this process)."""
    from distmlip import NeighborGraph, PartitionPlan
    from distmlip.partition import assign_owners

    atoms = _crystal(n)
    pos, cell, pbc, numbers = atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers
    rss_before = peak_gb()
    t = time.perf_counter()
    graph = NeighborGraph.from_arrays(pos, cell, pbc, numbers, CUTOFF)
    t_graph = time.perf_counter() - t
    rss_graph = peak_gb()
    out = {"n": n, "atoms": len(atoms), "edges": graph.num_edges, "graph_s": t_graph,
           "rss_start_gb": rss_before, "rss_graph_gb": rss_graph, "rows": []}
    for parts in parts_list:
        for partitioner in ("slab", "grid", "metis"):
            if partitioner == "metis" and len(atoms) > metis_max:
                continue
            t = time.perf_counter()
            owner = assign_owners(graph, parts, partitioner)
            t_owner = time.perf_counter() - t
            t = time.perf_counter()
            plan = PartitionPlan.from_owner(graph, owner, parts, mode="halo", num_hops=1)
            t_plan = time.perf_counter() - t
            edges = np.array([len(p.edges) for p in plan.parts])
            out["rows"].append({
                "parts": parts, "partitioner": partitioner, "owner_s": t_owner, "plan_s": t_plan,
                "halo_fraction": plan.halo_fraction(),
                "empty_parts": int(sum(p.num_owned == 0 for p in plan.parts)),
                "max_edge_share": float(edges.max() / max(edges.mean(), 1)),
                "rss_gb": peak_gb(),
            })
            del plan, owner
    out["rss_peak_gb"] = peak_gb()
    return out


def profile_one(n: int, parts: int) -> str:
    """cProfile of graph building and of plan building (grid owners) for one size, as markdown."""
    import cProfile
    import io
    import pstats

    from distmlip import NeighborGraph, PartitionPlan
    from distmlip.partition import assign_owners

    def stats(prof, count):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(count)
        text = buf.getvalue()
        keep = text[text.index("ncalls"):] if "ncalls" in text else text
        return "\n".join(line for line in keep.splitlines() if line.strip())

    atoms = _crystal(n)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    graph = NeighborGraph.from_arrays(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers, CUTOFF)
    prof.disable()
    t_graph = time.perf_counter() - t
    graph_stats = stats(prof, 8)
    t = time.perf_counter()
    owner = assign_owners(graph, parts, "grid")
    t_owner = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    PartitionPlan.from_owner(graph, owner, parts)
    prof.disable()
    t_plan = time.perf_counter() - t
    plan_stats = stats(prof, 12)
    return "\n".join([
        f"## Profile: where graph and plan building spend their time ({len(atoms):,} atoms, "
        f"{parts} parts)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python bench/bench_partition.py --profile {n} --parts {parts}`",
        "",
        f"`NeighborGraph.from_arrays`: {t_graph:.2f} s (under cProfile); `grid_owners`: "
        f"{t_owner:.2f} s; `PartitionPlan.from_owner`: {t_plan:.2f} s (under cProfile). Numpy "
        "calls made from C (sort, lexsort, fancy indexing) are counted in the calling function's "
        "own time (`tottime`).",
        "",
        "```", f"NeighborGraph.from_arrays ({graph.num_edges:,} edges)", graph_stats, "```",
        "",
        "```", "PartitionPlan.from_owner", plan_stats, "```",
        "",
    ])


def _table(results, command: str) -> str:
    lines = [
        "## Partition benchmark: graph, owner assignment, plan building (FCC Cu, 5 Å cutoff)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"Python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        f"one process per size; times are wall-clock seconds of one run.",
        "",
        "| atoms | edges | graph (s) | parts | partitioner | owners (s) | plan (s) | halo fraction | "
        "empty parts | max/mean edges | peak RSS (GB) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = True
        for row in r["rows"]:
            lead = (f"| {r['atoms']:,} | {r['edges']:,} | {r['graph_s']:.2f} " if first
                    else "| | | ")
            first = False
            lines.append(
                f"{lead}| {row['parts']} | {row['partitioner']} | {row['owner_s']:.3f} | "
                f"{row['plan_s']:.2f} | {row['halo_fraction']:.3f} | {row['empty_parts']} | "
                f"{row['max_edge_share']:.2f} | {row['rss_gb']:.2f} |"
            )
    lines += [
        "",
        "owners: `assign_owners` (slab/grid: `slab_owners`/`grid_owners`, positions only; metis: "
        "pymetis on the graph). plan: `PartitionPlan.from_owner`, halo mode, one-hop halo. "
        "halo fraction: halo atoms summed over parts / atoms. max/mean edges: the largest part's "
        "edges over the mean (load balance). peak RSS: the process's high-water mark after that "
        "row (graph included).",
        "",
        "Graph-building peak RSS per size: " + ", ".join(
            f"{r['atoms']:,} atoms {r['rss_graph_gb']:.2f} GB" for r in results) + ".",
        "",
    ]
    return "\n".join(lines)


def measure(job: dict) -> dict:
    """A child's job: one size."""
    return run_one(job["n"], job["parts"], job["metis_max"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[14, 29, 63],
                   help="n of the n^3 cubic-cell crystals (4 n^3 atoms): 14 -> 10,976; "
                        "29 -> 97,556; 63 -> 1,000,188")
    p.add_argument("--parts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--metis-max", type=int, default=150_000, help="largest system METIS is run on")
    p.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    p.add_argument("--output", default=str(HERE / "results" / "partition.md"))
    p.add_argument("--profile", type=int, metavar="N", help="profile plan building for size N and exit")
    args = p.parse_args(argv)

    if args.profile:
        text = profile_one(args.profile, max(args.parts))
        print(text)
        if not args.no_write:
            out = Path(args.output)
            old = out.read_text() if out.exists() else ""
            head = old.split("## Profile:")[0].rstrip("\n")
            out.write_text((head + "\n\n" if head else "") + text)
            print(f"appended the profile to {out}")
        return 0

    results = []
    for n in args.sizes:
        t = time.perf_counter()
        try:
            r = launch(__file__, {"n": n, "parts": args.parts, "metis_max": args.metis_max},
                       timeout=3600)
        except WorkerFailed as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(f"size {n} failed (exit {exc.returncode})") from None
        results.append(r)
        print(f"{r['atoms']:>9,} atoms, {r['edges']:>11,} edges: graph {r['graph_s']:.2f} s, "
              f"peak RSS {r['rss_peak_gb']:.2f} GB ({time.perf_counter() - t:.0f} s in all)", flush=True)
        for row in r["rows"]:
            print(f"    {row['parts']:>3} parts {row['partitioner']:<6} owners {row['owner_s']:7.3f} s  "
                  f"plan {row['plan_s']:7.2f} s  halo {row['halo_fraction']:.3f}  "
                  f"max/mean edges {row['max_edge_share']:.2f}", flush=True)
    command = "OMP_NUM_THREADS=1 python bench/bench_partition.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    text = _table(results, command)
    print()
    print(text)
    if not args.no_write:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text() if out.exists() else ""
        profile = old[old.index("## Profile:"):] if "## Profile:" in old else ""
        out.write_text(text + ("\n" + profile if profile else ""))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_or_worker(main, measure))
