# One-command entry points (see README "Quick start"). Everything installs into .venv/, and every
# install is constrained to the versions our exactness claims are made against (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet -c constraints.txt
# Extras installed by `make setup` (CI: everything the tests exercise, tensorrt-rtx's engine builds included).
EXTRAS ?= export,test,openvino,tensorrt-rtx,distributed
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test clean

# torch first and on its own: constraints.txt pins the CPU build this kind of machine gets for
# torch==2.13.0; an unconstrained `torch` would pull a multi-GB CUDA build.
$(BIN)/postdiff: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch
	$(PIP) -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/postdiff

demo: setup
	$(BIN)/postdiff demo

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) postdiff-demo
