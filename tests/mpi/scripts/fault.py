"""Run under a launcher with a failure injected on rank 1: 'model' (raises inside the model),
'script' (raises in the user script before the calculator is called), 'kill' (the process is
killed with SIGKILL between two halo exchanges, after its peers have sent it their rows) or
'hang' (the model never returns from its second halo exchange).

Rank 1 prints ``injected <where> at <unix time>`` just before the failure."""

import dataclasses
import os
import signal
import sys
import time

from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.models import SchNet

WHERE = sys.argv[1]


def inject():
    print(f"injected {WHERE} at {time.time():.3f}", flush=True)
    if WHERE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if WHERE == "hang":
        time.sleep(600)
    raise MemoryError("injected failure on this rank")


class FailingSchNet(SchNet):
    def forward(self, graph):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            if WHERE == "model":
                inject()
            exchange, calls = graph.halo_exchange, []

            def failing_exchange(x):
                calls.append(1)
                if len(calls) == 2:  # mid-way: the first exchange done, the second under way
                    inject()
                return exchange(x)

            graph = dataclasses.replace(graph, halo_exchange=failing_exchange)
        return super().forward(graph)


def main():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    model = FailingSchNet(cutoff=4.0, num_interactions=3, hidden_channels=8) if WHERE != "script" \
        else SchNet(cutoff=4.0, num_interactions=3, hidden_channels=8)
    atoms.calc = DistributedCalculator(model, timeout=float(os.environ.get("FAULT_TIMEOUT", "10")))
    if WHERE == "script" and atoms.calc.rank == 1:
        print(f"injected {WHERE} at {time.time():.3f}", flush=True)
        raise ValueError("injected failure in the user script on rank 1")
    atoms.get_potential_energy()


if __name__ == "__main__":
    main()
