"""Run the benchmarks and write BENCHMARKS.md from their result sections.

    .venv/bin/python bench/run.py                 # run every benchmark, then collect
    .venv/bin/python bench/run.py --only scaling  # run one (name = bench_<name>.py)
    .venv/bin/python bench/run.py --collect       # only rebuild BENCHMARKS.md from bench/results/

Each benchmark writes its own section to bench/results/<name>.md (with the command that made it);
BENCHMARKS.md is those sections in a fixed order. Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ORDER = ["partition", "overhead", "scaling", "parts_per_rank", "reuse", "step", "node_work", "node_work_mpi",
         "node_work_mace", "memory", "scale", "longrun", "property", "pretrained_sevenn",
         "pretrained_chgnet", "families", "lammps"]

HEADER = """# Benchmarks

Measured on the project's machine: 2 CPU cores, 24 GB, no GPU, Python 3.11, torch 2.13.0 (CPU).
Figures on this shared machine vary by about ±30% between runs; ratios within one table were
measured in the same run. Each section names the command that produced it; `make bench` reruns all.
"""


def scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted((ROOT / "bench").glob("bench_*.py"))}


def collect() -> Path:
    sections = {p.stem: p.read_text().strip() for p in sorted(RESULTS.glob("*.md"))}
    names = [n for n in ORDER if n in sections] + sorted(n for n in sections if n not in ORDER)
    text = HEADER + "\n" + "\n\n".join(sections[n] for n in names) + "\n"
    out = ROOT / "BENCHMARKS.md"
    out.write_text(text)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="benchmark name(s) to run")
    parser.add_argument("--collect", action="store_true", help="only rebuild BENCHMARKS.md")
    args = parser.parse_args()
    if not args.collect:
        available = scripts()
        names = args.only or list(available)
        unknown = [n for n in names if n not in available]
        if unknown:
            parser.error(f"--only: expected one of {sorted(available)}, got {unknown}")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for name in names:
            print(f"== bench_{name}.py", flush=True)
            proc = subprocess.run([sys.executable, str(available[name])], env=env, cwd=ROOT)
            if proc.returncode != 0:
                print(f"bench_{name}.py failed with exit code {proc.returncode}", file=sys.stderr)
    print(f"wrote {collect()}")


if __name__ == "__main__":
    main()
