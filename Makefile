# Two entry points for a fresh machine:
#   make demo   install everything into .venv, then run the main job
#   make test   install everything into .venv, then run the test suite
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# 2 cores: keep ninja from starting more compilers than there are cores.
export MAX_JOBS ?= 2
# torch's CUDA build compiles the CUDA kernels when a toolkit is found; /usr/local/cuda is where ours is.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: install demo test clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Editable install: the compiled sparsekern._C lands next to the sources.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m sparsekern.info
	$(PY) examples/quickstart.py

# pytest exits 5 when it collects nothing: that is a broken suite, so it fails here too.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$status

clean:
	rm -rf build *.egg-info sparsekern/*.so $(VENV)
