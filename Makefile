# Set-up and the two commands of the README. `make install` (re)creates .venv only when
# requirements.txt changed since the last successful install, then installs this repository into it
# in editable mode (`pip install -e .`: the headct-* commands, imports from any folder) when
# pyproject.toml changed. `make test` and `make demo` need only the requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EDITABLE := $(VENV)/.editable
DEMO_DIR ?= outputs/demo

.PHONY: install test lint demo demo-segment clean-demo

install: $(STAMP) $(EDITABLE)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

$(EDITABLE): pyproject.toml $(STAMP)
	$(PY) -m pip install --no-deps -e .
	rm -rf *.egg-info  # build by-product of setuptools, not needed by the editable install
	touch $(EDITABLE)

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	bash tools/demo.sh $(DEMO_DIR)

demo-segment: $(STAMP)  # after make demo: its MAE encoder as a segmenter, against a random one
	bash tools/demo_segment.sh $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
