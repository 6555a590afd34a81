# One command each: `make test` (set up + run the tests), `make env` (what backends are available).
# Everything goes into ./.venv; torch is pinned to the CPU wheel and installed first so that the
# editable install (no build isolation) never pulls a CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test env clean

$(BIN)/.gefx-installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet setuptools wheel pybind11 ninja
	# deepspeed (a test extra) builds from source against this torch; DS_BUILD_OPS=0: no CUDA ops
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

setup: $(BIN)/.gefx-installed

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-triton-min

# The Triton kernels' interpreter and compile tests again with the oldest supported Triton (the GPU
# machines' 3.6; gefx.kernels refuses older ones), in a second environment: the CPU torch wheel, no
# C++ extension, no transformers (the kernel tests need neither). numpy < 2.4: Triton 3.6's interpreter
# converts 1-element arrays with int(), which numpy 2.4 made an error (loops over runtime bounds fail).
TRITON_MIN ?= triton==3.6.0
VENV_MIN ?= .venv-triton-min
KERNEL_TESTS ?= tests/test_kernels.py tests/test_kernels_precision.py tests/test_kernels_version.py tests/test_compile.py
$(VENV_MIN)/.gefx-installed: pyproject.toml setup.py
	test -x $(VENV_MIN)/bin/python || $(PY) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet $(TORCH) "$(TRITON_MIN)" "numpy<2.4" tqdm pytest
	GEFX_BUILD_EXT=0 $(VENV_MIN)/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

.PHONY: test-triton-min
test-triton-min: $(VENV_MIN)/.gefx-installed
	$(VENV_MIN)/bin/python -m pytest -q -p no:cacheprovider $(KERNEL_TESTS)

env: setup
	$(BIN)/python -m gefx env

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info gefx/_C*.so

# The main job on the built-in default (offline): `make profile`, or `make profile ARGS="--objectives ga,npo"`.
ARGS ?=
.PHONY: profile
profile: setup
	$(BIN)/gefx profile $(ARGS)

# End-to-end benchmark, CPU suite (< 10 min on 2 cores): gefx vs the reference procedure, per-sample
# loops, torch.func and Opacus (optional: `$(BIN)/pip install opacus` adds it; skipped with a note
# otherwise). Outputs in bench/out/ (CSV, JSON, plots, e2e.md, pytest-benchmark JSON); see bench/RESULTS.md.
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(BIN)/python bench/bench_e2e.py $(BENCH_ARGS)
	$(BIN)/python -m pytest -q -p no:cacheprovider bench/bench_e2e_pytest.py --benchmark-only \
		--benchmark-json=bench/out/e2e_pytest.json
