# Two commands on a fresh machine:  make run   (install + the main job)   make test   (install + tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The shared offline copy of CIFAR-10 when it is there, else ./data (downloaded by torchvision)
export CIFAR10_DIR ?= $(if $(wildcard ../shared/datasets/cifar10),../shared/datasets/cifar10,./data)

.PHONY: install run test test-all notebook

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

# The main job on the default model (no --checkpoint: checkpoints.DEFAULT_CHECKPOINT, fast_kd.pt):
# torch accuracy, then 3 test images through real FHE beside their simulated and torch predictions
run: install
	$(PY) infer_torch.py
	$(PY) fhe_inference.py --n-images 3 --out-dir runs/fhe_default_make

# Two tiers, each with its own pytest summary line; the first failure stops make with a
# non-zero status (tests/conftest.py keeps pytest's status after Concrete has run).
#   fast    generated tiny data and tiny circuits (about 10 minutes here, 2 cores)
#   dataset the shipped checkpoints and the notebook on ../shared/datasets/cifar10 (skipped without it)
# `make test-all` adds the tests marked slow (the shipped model under real FHE).
test: install
	@echo "== tier: fast (tiny data and circuits)"
	$(PY) -m pytest -q -m "not slow and not dataset" tests
	@echo "== tier: dataset (shipped checkpoints, notebook)"
	$(PY) -m pytest -q -m "dataset and not slow" tests

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" tests

notebook: install
	$(PY) tools/run_notebook.py --write --mode $${NOTEBOOK_MODE:-quick}
