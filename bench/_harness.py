"""Shared plumbing of the benchmarks: one configuration per fresh process (so each peak RSS is its
own), memory read from /proc/self/status, mpirun configurations gathered on rank 0, results as a
JSON line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DROP_UNDER_MPI = ("edges_evaluated", "graph_edges", "redundancy", "halo")


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm progress bar (ETA) over a benchmark's configurations, each of which can take
    minutes; rows printed meanwhile go above it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="run", dynamic_ncols=True)


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, bytes: ``"VmRSS"`` (resident now)
    or ``"VmHWM"`` (peak resident; unlike ``ru_maxrss`` it does not carry a parent's peak over
    fork + exec, and /proc/self/clear_refs can reset it). 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0


def peak_gb() -> float:
    """This process's peak RSS (VmHWM), GB."""
    return proc_status("VmHWM") / 1e9


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM), MB."""
    return proc_status("VmHWM") / 2**20


def reset_peak() -> int:
    """Reset the peak (VmHWM) to the current RSS; returns the current RSS, bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def gather_on_rank0(record, world: int):
    """Every rank's ``record`` as a list on rank 0 (``None`` elsewhere); one process: ``[record]``."""
    if world == 1:
        return [record]
    import torch.distributed as dist

    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records if dist.get_rank() == 0 else None


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def report_mpi(res: dict) -> None:
    """On every rank of an mpirun configuration: gather peaks and times, print on rank 0 (time =
    slowest rank, peak = largest and summed over ranks)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (res["rss_peak"], res["time"]))
    if dist.get_rank() == 0:
        peaks = [g[0] for g in gathered]
        res.update(rss_peak=max(peaks), rss_sum=sum(peaks), rss_ranks=peaks,
                   time=max(g[1] for g in gathered))
        for key in DROP_UNDER_MPI:
            res.pop(key, None)
        print("RESULT " + json.dumps(res), flush=True)


def run_config(script: str, kind: str, options: dict, repeats: int, timeout: float) -> dict:
    """Run ``script --worker`` (or ``--mpi-worker`` under mpirun for ``kind == "mpi"``) and return
    the JSON it printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    payload = json.dumps({"kind": kind, "options": options, "repeats": repeats})
    if kind == "mpi":
        mpirun = str(Path(sys.executable).parent / "mpirun")
        cmd = [mpirun, "-n", str(options["num_partitions"]), sys.executable, script,
               "--mpi-worker", payload]
    else:
        cmd = [sys.executable, script, "--worker", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
