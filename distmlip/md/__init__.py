"""Restartable molecular dynamics: the engine behind ``distmlip md``.

``MDSettings`` holds a run's physics; ``run_md`` runs it (or continues it from
``load_checkpoint``) and writes a run directory: ``log.csv``, ``trajectory.extxyz`` and an
atomically written ``checkpoint.npz``; ``plot_run`` draws the log. Errors are ``ValueError``
naming the field or argument (``temperature_K: expected ..., got ...``); nothing here prints
(except the optional progress bar of ``run_md``) or exits.
"""

from .checkpoint import CHECKPOINT, load_checkpoint, unsaved_info, write_checkpoint
from .dynamics import (
    BAROSTATS,
    ENSEMBLES,
    MDSettings,
    dynamics_state,
    initial_velocities,
    make_dynamics,
    restore_dynamics_state,
)
from .loop import LOG, LOG_COLUMNS, STOP_SIGNALS, TRAJECTORY, UnstableRun, run_md
from .plot import plot_run

__all__ = ["BAROSTATS", "CHECKPOINT", "ENSEMBLES", "LOG", "LOG_COLUMNS", "MDSettings", "STOP_SIGNALS",
           "TRAJECTORY", "UnstableRun",
           "dynamics_state", "initial_velocities", "load_checkpoint", "make_dynamics", "plot_run",
           "restore_dynamics_state", "run_md", "unsaved_info", "write_checkpoint"]
