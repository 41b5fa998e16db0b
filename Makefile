# fedgate developer entry points.  `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test install build demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the build definition or a kernel changes.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard core/*.pyx core/*.pxd)
	$(BIN)/python -m pip install --quiet -e '.[test,server,bench]'
	touch $(STAMP)

install: $(STAMP)

# Rebuild the compiled kernels in place (after editing a .pyx).
build: $(STAMP)
	$(BIN)/python setup.py --quiet build_ext --inplace -j 2

test: install
	$(BIN)/python -m pytest -q

demo: install build
	$(BIN)/fedgate-demo $(DEMO_ARGS)

bench: install build
	$(BIN)/python benchmarks/bench_sgd.py
	$(BIN)/python benchmarks/bench_aggregate.py

clean:
	rm -rf build dist *.egg-info core/*.c core/*.so core/*.html
