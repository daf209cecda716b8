# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: install demo test lint clean slurm-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null

# torch 2.13.0 is the CPU build shipped as a file on these machines; the project's range admits it.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/geovr-pipeline demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint slurm-deps
	$(VENV)/bin/python -m pytest -q tests

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
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
