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

# PYTHONNODEBUGRANGES: CPython 3.11 parses source lines with `ast` to draw carets under
# tracebacks; a daemon thread logging a traceback while the main thread parses (pytest's
# own failure reports, the layout test) can trip 3.11's racy AST depth counter.
test: install
	PYTHONNODEBUGRANGES=1 $(BIN)/python -m pytest -q

demo: install build
	$(BIN)/fedgate-demo $(DEMO_ARGS)

bench: install build
	$(BIN)/python benchmarks/bench_sgd.py
	$(BIN)/python benchmarks/bench_aggregate.py

clean:
	rm -rf build dist *.egg-info core/*.c core/*.so core/*.html
