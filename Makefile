# Two commands do all the set-up on a fresh machine:
#   make demo   the whole pipeline on this machine's CPU, on the embedded default corpus
#   make test   the test suite (what CI runs)
# Both create a virtual environment in $(VENV) if there is none and install the project into it.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch is installed first, on its own: a CPU machine gets this build (on CI it is a local file);
# a GPU user sets TORCH_PIP_ARGS to their CUDA build, or installs torch into the venv beforehand.
TORCH_PIP_ARGS ?= torch==2.13.0
DEMO_CONFIG ?= demo
PYTEST_ARGS ?=
# The project's dependencies are installed with uv (itself a pip install into the venv) when it
# installs here: it resolves and installs the ~150 packages of the dev extras faster than pip on two
# cores (measured in README, Development); plain pip if uv cannot be installed. --compile-bytecode as
# pip does: with PYTHONDONTWRITEBYTECODE set (as on CI) every process would compile torch from source. torch is always pip's: pip reads
# this machine's pip configuration (the local CPU build), uv does not.
PIP_INSTALL = $(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)
# test processes (pytest-xdist): the suite waits on services and subprocesses more than it computes,
# so four share the 2 cores of a small machine well; tests/conftest.py says which tests share one
TEST_WORKERS ?= 4

.PHONY: demo test test-fast test-system install install-dev clean-demo help

help:
	@echo "make demo    run the packaged demo config (configs/demo.yaml) end to end on CPU (creates $(VENV) if needed)"
	@echo "make test    install test dependencies and run the test suite"
	@echo "make test-fast   the quick tests only (no cluster, no multi-rank training)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: keeping it" || $(PY) -m pip install $(TORCH_PIP_ARGS)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP_INSTALL) -e ".[eval]" || $(PY) -m pip install --quiet -e ".[eval]"
	@touch $@

# one install with every extra (not the demo's install plus a second one: each builds the editable wheel
# and resolves again); it leaves the demo's marker too
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP_INSTALL) -e ".[dev,hf,eval]" || $(PY) -m pip install --quiet -e ".[dev,hf,eval]"
	@touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/xlp run $(DEMO_CONFIG)
	$(VENV)/bin/xlp status runs/demo

# what the cluster tests need from the system, installed before the tests run (not inside a test's
# time): Debian's slurm-wlm and munge, as root (elsewhere those tests say what they need)
test-system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash infra/local-slurm.sh install; \
	else echo "test-system: not root with apt-get: the Slurm tests need slurm-wlm and munge installed"; fi

# The project's own modules byte-compiled first (0.4 s): the editable install leaves them as source, and
# with PYTHONDONTWRITEBYTECODE set (as on CI) each process of the suite that imports them (ranks, xlp
# commands, stage tasks: several hundred) compiles them again (`import xlp.pipeline.cli`: 0.36 s of CPU
# from source, 0.25 s compiled).
COMPILE_SOURCES = $(PY) -m compileall -q pipeline xlstm_model kernels tokenizer tests benchmarks

test: $(VENV)/.installed-dev test-system
	$(COMPILE_SOURCES)
	$(PY) -P -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# the inner loop: no real cluster, no multi-rank training (the tests not marked slow)
test-fast: $(VENV)/.installed-dev
	$(COMPILE_SOURCES)
	$(PY) -P -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo
