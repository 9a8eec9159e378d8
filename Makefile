# Two entry points for a fresh machine:
#   make demo   install everything into .venv, then run the main job
#   make test   install everything into .venv, then run the test suite
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# 2 cores: keep ninja from starting more compilers than there are cores.
export MAX_JOBS ?= 2
DEMO_STEPS ?= 300
# torch's CUDA build compiles the CUDA kernels when a toolkit is found; /usr/local/cuda is where ours is.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# CUTLASS's C++ headers for the Hopper GEMMs (csrc/cuda/bsr_gemm_sm90.cu); its Python dependencies serve its own code
# generator, which the build does not use.
CUTLASS_PACKAGE ?= nvidia-cutlass==4.2.0.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' 2>/dev/null)

.PHONY: install dataset demo test gpu-check clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(CUTLASS_PACKAGE)
	touch $@

# Editable install: the compiled sparsekern._C lands next to the sources.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# The real Fashion-MNIST ships as Debian's dataset-fashion-mnist; nothing is downloaded at run time.
dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; fi

# The main job (~6 minutes on 2 CPU cores, after the build): what is built, a quick kernel benchmark table, and
# ResNet-18 trained on Fashion-MNIST twice, dense and with RigL at 90% block sparsity, throughputs side by side.
demo: install dataset
	$(PY) -m sparsekern.info
	$(PY) -m sparsekern.bench --device cpu --quick --out benchmarks/results
	$(PY) -m sparsekern.demo --steps $(DEMO_STEPS) --out runs/demo
	@echo "results: benchmarks/results/ (kernel tables), runs/demo/ (comparison.json; dense/ and rigl/: summary.json, log.jsonl, checkpoint.pt)"

# pytest exits 5 when it collects nothing: that is a broken suite, so it fails here too.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$status

# On a GPU machine, with its own python3, torch and triton (no .venv, no network): build for that GPU, the
# `cuda` tests, the GPU suites, in at most 9 minutes, at most 8 files into OUT (benchmarks/gpu_check.py).
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "usage: make gpu-check OUT=DIR"; exit 2; fi
	$(PYTHON) benchmarks/gpu_check.py --out $(OUT)

clean:
	rm -rf build *.egg-info sparsekern/*.so $(VENV)
