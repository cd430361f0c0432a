# Set-up and entry points. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test bench gpu-check

install: $(VENV)/.installed

# torch/torchvision: the PyPI build (CUDA-enabled, runs on the CPU too), pinned with everything else
# in constraints.txt so a fresh install resolves the same versions.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Headless Chromium and its driver for the app's end-to-end tests (Debian packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null)

demo: install
	$(BIN)/traitscope demo

test: install browser
	$(BIN)/python -m pytest

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f; done

# Every GPU path timed against floors of the same run, in one call that fits a short GPU loan (about
# 7 minutes on one GPU); figures go to gpu_check.json. Without CUDA it runs small on the CPU.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check.json
