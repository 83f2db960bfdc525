# Set-up and the two commands of the README. `make install` (re)creates .venv only when
# requirements.txt changed since the last successful install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install test demo clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	bash tools/demo.sh $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
