# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second venv only for the tests that compare our video preprocessing with transformers' own
# Qwen3-VL video processor, which needs torchvision: torch 2.14.1 + torchvision 0.29.1 (a CUDA build
# that runs on CPU, 5.2 GB, about 1.5 min to install from this machine's disk). The main venv keeps
# the 2.13 CPU build, so the rest of the suite does not load the CUDA libraries.
PROCESSOR_VENV := .venv-processor
PROCESSOR_PY := $(PROCESSOR_VENV)/bin/python
PROCESSOR_STAMP := $(PROCESSOR_VENV)/.installed
PROCESSOR_TESTS := tests/test_student_vision_inputs.py tests/test_repeat_timestamps.py
DEMO_OUT ?= demo-out

.PHONY: install install-processor demo test test-processor lint clean slurm-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null

# torch 2.13.0 is the CPU build shipped as a file on these machines; the project's range admits it.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The same transformers as the main venv; the project itself without its dependencies (the
# processor tests import only the student's video inputs and the tiny checkpoint writer).
$(PROCESSOR_STAMP): pyproject.toml | $(STAMP)
	$(PYTHON) -m venv $(PROCESSOR_VENV)
	$(PROCESSOR_PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PROCESSOR_PY) -m pip install "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" \
		pillow "pytest>=8" "pytest-timeout>=2.3"
	$(PROCESSOR_PY) -m pip install --no-deps -e .
	touch $(PROCESSOR_STAMP)

install-processor: $(PROCESSOR_STAMP)

demo: $(STAMP)
	$(VENV)/bin/geovr-pipeline demo --out $(DEMO_OUT)

# ruff, then the layer contracts of pyproject.toml's [tool.importlinter] (an import that points up,
# or across independent siblings, fails).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The processor tests are skipped in the main venv (no torchvision) and run, required, in the second.
test: $(STAMP) lint slurm-deps
	$(VENV)/bin/python -m pytest -q tests
	$(MAKE) test-processor

test-processor: $(PROCESSOR_STAMP)
	GEOVR_REQUIRE_TORCHVISION=1 $(PROCESSOR_PY) -m pytest -q -m processor $(PROCESSOR_TESTS)

# slurm-wlm and munge (Debian packages) for tests/test_workflows_slurm.py's one-node Slurm. Installed
# as root with apt (about 15 s; no service is started); without root or apt that test skips and says why.
slurm-deps:
	@if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "slurm-deps: not root or no apt-get: not installing slurm-wlm munge"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
		|| echo "slurm-deps: apt-get install slurm-wlm munge failed"; \
	fi

clean:
	rm -rf $(VENV) $(PROCESSOR_VENV) $(DEMO_OUT) .pytest_cache
