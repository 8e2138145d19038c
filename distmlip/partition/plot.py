"""Pictures and tables of a ``PartitionPlan``: which atoms each part owns, its halo, the balance.

matplotlib is imported when ``plot_partition`` is called (it is not needed otherwise).
"""

from __future__ import annotations

from os import PathLike

import numpy as np

from .plan import PartitionPlan

__all__ = ["partition_table", "plot_partition"]


def partition_table(plan: PartitionPlan) -> str:
    """A per-part table of a ``PartitionPlan``: owned atoms, halo, local edges; then totals."""
    owned = np.array([p.num_owned for p in plan.parts])
    halo = np.array([p.num_halo for p in plan.parts])
    edges = np.array([len(p.edges) for p in plan.parts])
    lines = [f"{'part':>5} {'owned':>8} {'halo':>8} {'halo/owned':>10} {'edges':>10}"]
    for p, o, h, e in zip(plan.parts, owned, halo, edges, strict=True):
        lines.append(f"{p.index:>5} {o:>8} {h:>8} {h / max(o, 1):>10.2f} {e:>10}")
    mean = owned.mean() if len(owned) else 0.0
    lines.append(f"{'total':>5} {owned.sum():>8} {halo.sum():>8} {halo.sum() / max(owned.sum(), 1):>10.2f} "
                 f"{edges.sum():>10}")
    lines.append(f"imbalance (max/mean owned) {owned.max() / mean if mean else float('nan'):.3f}; "
                 f"edge imbalance {edges.max() / edges.mean() if edges.sum() else float('nan'):.3f}; "
                 f"redundancy (edges evaluated / graph edges {plan.num_edges}) {plan.redundancy():.3f}; "
                 f"halo {plan.halo_fraction():.3f} of the atoms")
    return "\n".join(lines)


def plot_partition(atoms, plan: PartitionPlan, path: str | PathLike, show_part: int = 0) -> None:
    """Two panels projected on the cell's two longest axes: every atom coloured by its owner, and
    part ``show_part``'s owned atoms and halo."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    pos = atoms.positions
    axes_order = np.argsort(-np.ptp(pos, axis=0))[:2] if len(pos) > 1 else np.array([0, 1])
    a, b = (int(i) for i in sorted(axes_order))
    xy = pos[:, [a, b]]
    names = "xyz"
    cmap = colormaps["tab20" if plan.num_parts > 10 else "tab10"]
    size = max(2.0, min(40.0, 6000.0 / max(len(pos), 1)))
    fig = Figure(figsize=(11, 5), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    left.scatter(xy[:, 0], xy[:, 1], c=[cmap(o % cmap.N) for o in plan.owner], s=size, lw=0)
    left.set_title(f"{plan.num_parts} parts: atoms coloured by owner")
    part = next(p for p in plan.parts if p.index == show_part)
    owned, halo = part.atoms[:part.num_owned], part.atoms[part.num_owned:]
    right.scatter(xy[:, 0], xy[:, 1], c="0.85", s=size, lw=0, label="other atoms")
    right.scatter(*xy[owned].T, color=cmap(show_part % cmap.N), s=size, lw=0,
                  label=f"owned by part {show_part}")
    right.scatter(*xy[halo].T, facecolors="none", edgecolors="k", s=size * 1.6, lw=0.6,
                  label=f"halo ({plan.num_hops} hop{'s' if plan.num_hops > 1 else ''})")
    right.set_title(f"part {show_part}: {part.num_owned} owned, {part.num_halo} halo ({plan.mode} mode)")
    right.legend(loc="upper right", fontsize=8, markerscale=1.5)
    for ax in (left, right):
        ax.set_xlabel(f"{names[a]} (Å)")
        ax.set_aspect("equal")
    left.set_ylabel(f"{names[b]} (Å)")
    fig.savefig(path, dpi=120)
