"""Launcher detection and rendezvous from the environment a launch sets (SLURM's srun is not on
this machine: its variables are faked here; tests/mpi/test_mpi.py runs two processes with them)."""

from __future__ import annotations

import os

import pytest

from distmlip.runtime.launch import DEFAULT_MASTER_PORT, Launch, detect_launch, slurm_rendezvous

LAUNCH_PREFIXES = ("PMI_", "OMPI_", "TORCHELASTIC", "MASTER_", "SLURM_", "MPI_LOCALRANKID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCH_PREFIXES) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key)
    return monkeypatch


def _srun(monkeypatch, procid, ntasks=4, localid=None, **extra):
    """The variables srun sets in each task of a job step (a subset: those distmlip reads)."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
           "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
           "SLURM_LOCALID": str(procid % 2 if localid is None else localid),
           "SLURM_STEP_NODELIST": "gpu-a[07-08]", "SLURM_JOB_NODELIST": "gpu-a[07-08]",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5", **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_no_launcher(clean_env):
    assert detect_launch() is None


@pytest.mark.parametrize("procid", [0, 1, 3])
def test_srun_task_detected(clean_env, procid):
    _srun(clean_env, procid)
    assert detect_launch() == Launch("slurm", procid, 4, procid % 2)


def test_srun_single_task_is_not_a_launch(clean_env):
    _srun(clean_env, 0, ntasks=1)
    assert detect_launch() is None


def test_sbatch_script_alone_is_not_a_launch(clean_env):
    """The batch script of a 4-task job runs once: no step variables, no multi-process launch."""
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
                       "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}.items():
        clean_env.setenv(key, value)
    assert detect_launch() is None
    clean_env.setenv("SLURM_STEP_ID", "batch")
    assert detect_launch() is None


def test_mpi_and_torchrun_variables_take_precedence(clean_env):
    """srun starting an MPI program (PMI) or torchrun inside an allocation: their variables win."""
    _srun(clean_env, 1)
    clean_env.setenv("PMI_RANK", "1")
    clean_env.setenv("PMI_SIZE", "4")
    assert detect_launch().launcher == "mpich"
    for key, value in {"RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "LOCAL_RANK": "0"}.items():
        clean_env.setenv(key, value)
    assert detect_launch() == Launch("torchrun", 2, 8, 0)


@pytest.mark.parametrize("nodelist,host", [("gpu-a[07-08]", "gpu-a07"), ("node[1,3-5],big2", "node1"),
                                           ("login3", "login3"), ("a1,b[2-3]", "a1"),
                                           ("nid[0012-0015]-hsn", "nid0012-hsn")])
def test_srun_rendezvous_is_task_zeros_node(clean_env, nodelist, host):
    _srun(clean_env, 2, SLURM_STEP_NODELIST=nodelist)
    assert slurm_rendezvous() == (host, DEFAULT_MASTER_PORT + 456)  # 123456 % 1000


def test_srun_rendezvous_overrides_and_fallbacks(clean_env):
    _srun(clean_env, 0, MASTER_PORT="31000")
    assert slurm_rendezvous() == ("gpu-a07", 31000)
    clean_env.setenv("MASTER_ADDR", "10.1.2.3")
    assert slurm_rendezvous() == ("10.1.2.3", 31000)
    clean_env.delenv("MASTER_ADDR")
    clean_env.delenv("SLURM_STEP_NODELIST")
    clean_env.delenv("SLURM_JOB_NODELIST")
    assert slurm_rendezvous()[0] == "10.0.0.5"  # the node srun ran on
    clean_env.delenv("SLURM_LAUNCH_NODE_IPADDR")
    with pytest.raises(RuntimeError, match=r"srun: expected SLURM_STEP_NODELIST.*set MASTER_ADDR"):
        slurm_rendezvous()
    clean_env.setenv("MASTER_ADDR", "h")
    clean_env.setenv("MASTER_PORT", "eighty")
    with pytest.raises(ValueError, match=r"MASTER_PORT: expected a port number, got 'eighty'"):
        slurm_rendezvous()
