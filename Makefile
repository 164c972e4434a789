# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install Duet first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.duet-installed
# Without CUDA, pin the CPU build of torch (a local wheel here); a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py CMakeLists.txt $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
