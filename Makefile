# Set-up lives here: `make test` and `make demo` work on a fresh machine.
# make test      ruff + the default suite (everything not marked slow): <= 5 min of tests on 2 cores
# make test-all  ruff + everything, slow cases and every mpirun/torchrun launch (what CI runs)
# make lammps    LAMMPS's pair_style distmlip plugin: build/lammps/distmlipplugin.so (docs/lammps.md);
#                the tests build it themselves (and skip, saying why, where it cannot be built)
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch is pinned: on this project's machines an open range resolves to a multi-GB CUDA build.
TORCH   := torch==2.13.0
# the independent tests run in JOBS processes: make test gives whole files to a process (a file's
# module fixtures load its model once), make test-all lets idle processes take tests from busy ones
# (its long property runs are in one file); the launches (mpi mark: 2-3 processes each, a rendezvous
# port, timeouts) run after them in a pytest of their own, one at a time. -m on the command line
# replaces pyproject's addopts -m 'not slow'.
JOBS    ?= 2
# the files of make test's launches (collecting only them saves ~15 s of imports; test-all
# collects every file, so a fast launch added elsewhere still runs there); test-all prints its
# slowest tests (--durations), the figures to trim by when it nears its 45 minutes
MPI_FAST := tests/mpi tests/lammps tests/cli/test_examples.py tests/engine/test_global_sum.py
PYTEST  := OMP_NUM_THREADS=1 $(VPY) -m pytest -q -ra
XDIST   := -n $(JOBS) --dist loadfile

.PHONY: install test test-all demo bench lammps clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[test,all]' $(TORCH)
	$(VPY) -m pip install -q --no-deps 'mace-torch==0.3.16' 'mattersim==1.2.3'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(PYTEST) $(XDIST) -m 'not slow and not mpi'
	$(PYTEST) -m 'mpi and not slow' $(MPI_FAST)

test-all: $(STAMP)
	$(VPY) -m ruff check .
	$(PYTEST) -n $(JOBS) --dist worksteal -m 'not mpi' --durations=30
	$(PYTEST) -m 'mpi' --durations=15

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/distmlip demo

bench: $(STAMP)
	$(VPY) bench/run.py

lammps: $(STAMP)
	$(VPY) lammps/build.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
