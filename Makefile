# Set-up, tests and benchmark in one place. On a fresh machine (Python >= 3.10,
# a C++ compiler; nvcc optional) `make test` and `make bench` do all set-up:
# a virtual environment in .venv, torch, the other packages, and an editable
# build of otseg with its extensions (rebuilt when csrc/ changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
PACKAGES ?= ninja pybind11 numpy tqdm pytest scipy POT matplotlib open_clip_torch

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: setup test bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install $(PACKAGES)
	touch $@

$(VENV)/.otseg: $(VENV)/.deps $(SOURCES)
	OTSEG_WERROR=$${OTSEG_WERROR:-0} $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.otseg

test: setup
	$(PY) -m pytest tests

bench: setup
	$(VENV)/bin/otseg bench --quick

clean:
	rm -rf build *.egg-info otseg/_C*.so
