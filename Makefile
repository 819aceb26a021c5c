# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv and install edgezh through constraints.txt (CPU torch 2.13.0 stays;
# llama-cpp-python builds llama.cpp once, then pip's wheel cache makes reinstalls instant).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgezh build recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf builds .cache .pytest_cache
