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
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

setup: $(BIN)/.gefx-installed

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

env: setup
	$(BIN)/python -m gefx env

clean:
	rm -rf $(VENV) build *.egg-info gefx/_C*.so

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
