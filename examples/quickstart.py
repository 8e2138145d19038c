"""The README's quick start: an ASE calculator that splits the system into 4 parts."""
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import SchNet

atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((6, 6, 6))  # 864 atoms
atoms.rattle(stdev=0.05, seed=0)
model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=32)  # random weights, seed 0
atoms.calc = DistributedCalculator(model, num_parts=4, partitioner="grid", mode="halo")
print(f"energy {atoms.get_potential_energy():.6f} eV, max |F| {abs(atoms.get_forces()).max():.4f} eV/Å")
print("stress (eV/Å^3):", atoms.get_stress().round(6))
print("timings (s):", {k: round(v, 3) for k, v in atoms.calc.timings.items()})
