"""Shared plumbing of the benchmarks: one configuration per fresh process (so each peak RSS is its
own), memory read from /proc/self/status, mpirun configurations gathered on rank 0, results as a
JSON line.

The pattern every benchmark follows: ``main()`` parses its options, and for each configuration
starts the script itself again with a job (a JSON dict) through :func:`launch` (under ``mpirun -n
P`` if asked); in that child :func:`main_or_worker` runs the benchmark's ``worker(job)`` instead
of ``main()`` and prints what it returns as one ``RESULT {json}`` line, which :func:`launch` reads
back::

    def main():
        args = parser.parse_args()
        for job in jobs:
            result = launch(__file__, job, timeout=args.timeout)

    if __name__ == "__main__":
        main_or_worker(main, worker)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
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


def report_mpi(res: dict) -> dict | None:
    """On every rank of an mpirun configuration: gather peaks and times; rank 0 returns the
    combined result (time = slowest rank, peak = largest and summed over ranks), the others
    ``None``."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (res["rss_peak"], res["time"]))
    if dist.get_rank() == 0:
        peaks = [g[0] for g in gathered]
        res.update(rss_peak=max(peaks), rss_sum=sum(peaks), rss_ranks=peaks,
                   time=max(g[1] for g in gathered))
        for key in DROP_UNDER_MPI:
            res.pop(key, None)
        return res
    return None


def gather_max(res: dict, maximum=(), total=()) -> dict | None:
    """Under mpirun, on every rank: rank 0 returns ``res`` with each key of ``maximum`` replaced
    by its largest value over the ranks and ``<key>_sum`` added for each key of ``total`` (the
    sum over ranks); the other ranks return ``None``. One process: ``res`` unchanged."""
    records = gather_on_rank0(res, _world_size())
    if records is None or len(records) == 1:
        return records and records[0]
    out = {**res, **{key: max(r[key] for r in records) for key in maximum}}
    out.update({f"{key}_sum": sum(r[key] for r in records) for key in total})
    return out


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------- main process and its workers
def emit(result) -> None:
    """Print ``result`` as the ``RESULT {json}`` line :func:`launch` reads (nothing for ``None``
    or an empty dict: the ranks of an mpirun job other than rank 0)."""
    if result is not None and result != {}:
        print("RESULT " + json.dumps(result), flush=True)


def main_or_worker(main, worker):
    """A benchmark's entry point: in a child that :func:`launch` started (``--worker JOB``), print
    ``worker(job)`` as the RESULT line; otherwise return ``main()``."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return emit(worker(json.loads(sys.argv[2])))
    return main()


def launch(script: str | Path, job: dict, *, timeout: float, procs: int | None = None,
           code: Path = ROOT, cwd: Path | str = ROOT, capture_stderr: bool = True):
    """Run ``script --worker JOB`` in a fresh Python process and return the result it printed
    (:func:`emit`).

    Args:
        script: the benchmark (``__file__``).
        job: its options, JSON-serialisable.
        timeout: seconds (``subprocess.TimeoutExpired`` after them; the child is killed).
        procs: run under ``mpirun -n procs`` (rank 0 reports); ``None``: one process.
        code: the source tree first on the child's ``PYTHONPATH`` (another checkout of distmlip
            to compare with; default this one).
        cwd: the child's working directory.
        capture_stderr: False passes the child's stderr through (its progress lines), True keeps
            it for the error message.

    The child has one OpenMP thread and Python warnings off.

    Raises:
        WorkerFailed: the child printed no result (its exit status and stderr tail in the message).
    """
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    cmd = [sys.executable, str(script), "--worker", json.dumps(job)]
    if procs is not None:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(procs)] + cmd
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None,
                          text=True, env=env, timeout=timeout, cwd=cwd)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = proc.stderr[-3000:] if capture_stderr else "(stderr above)"
    raise WorkerFailed(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{tail}", proc.returncode)


class WorkerFailed(RuntimeError):
    """A benchmark's child process printed no result; ``returncode`` is its exit status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_config(script: str, kind: str, options: dict, repeats: int, timeout: float) -> dict:
    """One configuration of a calculator comparison (bench_pretrained_*): ``kind`` "mpi" runs
    under ``mpirun -n options["num_parts"]`` (one part per rank), any other kind in one
    process; the child runs :func:`config_worker`."""
    procs = options["num_parts"] if kind == "mpi" else None
    return launch(script, {"kind": kind, "options": options, "repeats": repeats},
                  procs=procs, timeout=timeout)


def config_worker(worker):
    """The worker of :func:`run_config`'s jobs (for :func:`main_or_worker`), from
    ``worker(kind, options, repeats)``: an "mpi" job runs ``worker("distmlip", options without
    num_parts, repeats)`` on every rank and reports as :func:`report_mpi` does."""

    def run(job: dict):
        if job["kind"] != "mpi":
            return worker(job["kind"], job["options"], job["repeats"])
        options = {k: v for k, v in job["options"].items() if k != "num_parts"}
        return report_mpi(worker("distmlip", options, job["repeats"]))

    return run


# ---------------------------------------------------------------- one configuration's calls
def timed_calls(calc, structure, repeats: int, quiet: bool = False) -> list[dict]:
    """``repeats + 1`` energy + forces + stress calls of the ASE calculator ``calc``, call ``i`` on
    ``structure(i)`` (a fresh structure each: call 0 is the warm-up). Per call: ``time`` (wall, s),
    ``cpu`` (this process's CPU time, s), ``energy`` (eV), ``forces`` ((n, 3) array, eV/Å),
    ``stress`` (Voigt, eV/Å^3) and ``atoms`` (n). ``quiet``: what the calculator prints is
    dropped."""
    import contextlib
    import io

    import numpy as np

    calls = []
    for seed in range(repeats + 1):
        atoms = structure(seed)
        atoms.calc = calc
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces(), dtype=float)
            stress = np.asarray(atoms.get_stress(), dtype=float)
        calls.append({"time": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "energy": energy, "forces": forces, "stress": stress, "atoms": len(atoms)})
    return calls


def best_call(calls: list[dict]) -> int:
    """The index of the fastest timed call of :func:`timed_calls` (the warm-up's, 0, if it was
    the only one)."""
    if len(calls) == 1:
        return 0
    return 1 + min(range(len(calls) - 1), key=lambda i: calls[1 + i]["time"])


def plan_figures(calc) -> dict:
    """Work figures of a distmlip calculator's last partition plan (none for another
    calculator): edges evaluated, graph edges, their ratio (``redundancy``) and halo atoms per
    atom (``halo``). :func:`report_mpi` drops them (they are one rank's)."""
    plan = getattr(calc, "last_plan", None)
    if plan is None:
        return {}
    return {"edges_evaluated": int(plan.edges_evaluated()), "graph_edges": int(plan.num_edges),
            "redundancy": float(plan.redundancy()), "halo": float(plan.halo_fraction())}


def run_configs(script: str, configs: list, repeats: int, timeout: float, *,
                skip=None, repeats_for=None) -> list[tuple]:
    """Run every ``(label, kind, options)`` of ``configs`` with :func:`run_config` and return
    rows ``(label, result or None, note)``; each result also holds ``load`` (1-minute load
    average at its start) and ``repeats``. ``skip(options)``: a reason to skip a configuration
    (or None); ``repeats_for(options)``: its number of timed calls (default ``repeats``). A
    failed configuration is a row with the error's first line as its note."""
    rows = []
    for label, kind, options in configs:
        reason = skip(options) if skip else None
        if reason:
            rows.append((label, None, f"skipped: {reason}"))
            print(f"{label}: skipped ({reason})", flush=True)
            continue
        count = repeats_for(options) if repeats_for else repeats
        load = os.getloadavg()[0]
        try:
            res = run_config(script, kind, options, count, timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append((label, None, failure(exc)))
            print(f"{label}: FAILED\n{exc}", flush=True)
            continue
        res.update(load=load, repeats=count)
        rows.append((label, res, ""))
        brief = {k: v for k, v in res.items() if k not in ("forces", "stress")}
        print(f"{label}: {brief}", flush=True)
    return rows


def peak_cell(res: dict) -> str:
    """The peak RSS of a result, GB (mpirun: the largest rank's and the total)."""
    if "rss_sum" in res:
        return f"{res['rss_peak']:.2f} per rank (max), {res['rss_sum']:.2f} total"
    return f"{res['rss_peak']:.2f}"


def edges_cell(res: dict) -> str:
    """Edges evaluated / graph edges (and their ratio) of a result, or "–"."""
    if res.get("edges_evaluated") is None:
        return "–"
    return f"{res['edges_evaluated']} / {res['graph_edges']} ({res['redundancy']:.2f}×)"


# ---------------------------------------------------------------- the machine and the code
def uptime() -> str:
    """``uptime``'s line (the load averages), or the load averages alone."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def git_head(path: Path = ROOT) -> str:
    """The short commit of the checkout at ``path`` ("?" outside git)."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"


def failure(exc: BaseException) -> str:
    """A table cell for a configuration that failed: its error's first line."""
    return f"failed: {str(exc).splitlines()[0][:150]}"


def write_result(path: Path, lines: list[str]) -> str:
    """Write a benchmark's markdown section (``lines``) to ``path`` and print it; returns the text."""
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return text
