# Set-up lives here: `make test` and `make demo` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch is pinned: on this project's machines an open range resolves to a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[test,all]' $(TORCH)
	$(VPY) -m pip install -q --no-deps 'mace-torch==0.3.16' 'mattersim==1.2.3'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q -ra

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/distmlip demo

bench: $(STAMP)
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
