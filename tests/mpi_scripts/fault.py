"""Run under a launcher with a failure injected on rank 1: 'model' (raises inside the model),
'script' (raises in the user script before the calculator is called), 'kill' (the process dies)
or 'hang' (the model never returns)."""

import os
import signal
import sys

from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import SchNet


class FailingSchNet(SchNet):
    def forward(self, graph):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            if WHERE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if WHERE == "hang":
                import time

                time.sleep(600)
            raise MemoryError("injected failure on this rank")
        return super().forward(graph)


WHERE = sys.argv[1]


def main():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    model = FailingSchNet(cutoff=4.0, num_interactions=3, hidden_channels=8) if WHERE != "script" \
        else SchNet(cutoff=4.0, num_interactions=3, hidden_channels=8)
    atoms.calc = DistributedCalculator(model, timeout=float(os.environ.get("FAULT_TIMEOUT", "10")))
    if WHERE == "script" and atoms.calc.runner.rank == 1:
        raise ValueError("injected failure in the user script on rank 1")
    atoms.get_potential_energy()


if __name__ == "__main__":
    main()
