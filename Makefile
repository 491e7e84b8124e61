# One-command entry points (see README "Quick start"). Everything installs into .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch on this kind of machine; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test clean

$(BIN)/postdiff: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[export,test,distributed]"
	touch $@

setup: $(BIN)/postdiff

demo: setup
	$(BIN)/postdiff demo

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) postdiff-demo
