"""Pictures of a run directory's log (matplotlib, imported when called)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .loop import LOG

__all__ = ["plot_run"]


#: the pictures ``plot_run`` draws
PLOTS = ("energy.png", "temperature.png", "pressure.png", "volume.png")


def plot_run(directory) -> list[Path]:
    """``energy.png``, ``temperature.png``, ``pressure.png`` and, when the volume changed (npt),
    ``volume.png`` from ``directory/log.csv``; returns the paths written. ``ValueError``
    (``directory: ...``) if there is no log."""
    from matplotlib.figure import Figure

    directory = Path(directory)
    path = directory / LOG
    if not path.is_file():
        raise ValueError(f"directory: expected a run directory holding {LOG}, got {str(directory)!r}")
    data = np.genfromtxt(path, delimiter=",", names=True)
    data = np.atleast_1d(data)
    t = data["time_ps"]
    written = []
    panels = [("energy.png", "energy (eV)", [("epot", "potential"), ("ekin", "kinetic"), ("etot", "total")]),
              ("temperature.png", "temperature (K)", [("temperature_K", None)]),
              ("pressure.png", "pressure (GPa)", [("pressure_GPa", None)]),
              ("volume.png", "volume (Å³)", [("volume_A3", None)])]
    for name, label, series in panels:
        if any(col not in data.dtype.names for col, _ in series):
            continue  # a log from an older version
        if all(np.isnan(data[col]).all() for col, _ in series):
            continue  # e.g. no pressure without a periodic cell
        if name == "volume.png" and np.ptp(data["volume_A3"]) == 0:
            continue  # constant volume: nothing to see
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (col, title) in zip(axes, series, strict=True):
            ax.plot(t, data[col], lw=1)
            ax.set_ylabel(label if title is None else f"{title} (eV)")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("time (ps)")
        fig.suptitle(f"{directory.name or directory}: {label.split(' (')[0]}")
        fig.savefig(directory / name, dpi=110)
        written.append(directory / name)
    return written
