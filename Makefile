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

# The main job: the shipped fast model, torch accuracy, simulated accuracy, one real FHE image
run: install
	$(PY) infer_torch.py --checkpoint checkpoints/fast.pt
	$(PY) fhe_inference.py --checkpoint checkpoints/fast.pt --n-images 3 --out-dir runs/fhe_fast_make

test: install
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" tests

notebook: install
	$(PY) tools/run_notebook.py --write --mode $${NOTEBOOK_MODE:-quick}
