# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv and install edgezh through constraints.txt (CPU torch 2.13.0 stays;
# llama-cpp-python builds llama.cpp once, then pip's wheel cache makes reinstalls instant).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp's own converters, from the sdist of the installed llama-cpp-python: the reference the
# conformance tests compare edgezh's GGUF and LoRA-adapter writers against (they skip, saying so, without it).
REFERENCE := .cache/llama.cpp
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

test: $(STAMP) $(REFERENCE)/.extracted
	$(PY) -m pytest -q -ra

$(REFERENCE)/.extracted: $(STAMP)
	rm -rf $(REFERENCE) $(REFERENCE).sdist && mkdir -p $(REFERENCE) $(REFERENCE).sdist
	version=$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))') && \
	  $(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(REFERENCE).sdist "llama-cpp-python==$$version" && \
	  tar xzf $(REFERENCE).sdist/*.tar.gz -C $(REFERENCE) --strip-components=3 --wildcards \
	    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
	    '*/vendor/llama.cpp/gguf-py' '*/vendor/llama.cpp/conversion' && touch $@ \
	  || echo "note: llama.cpp's converters not fetched; the reference-converter tests will skip"
	rm -rf $(REFERENCE).sdist

clean:
	rm -rf builds .cache .pytest_cache
