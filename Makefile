# Two entry points: `make demo` (preprocess -> train -> evaluate on the bundled songs)
# and `make test`. Both start with `make install`, which is a no-op once done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: install demo test bench clean

install: $(STAMP)

# Reinstall only when the dependency list changes. torch is installed first, pinned,
# so that nothing later resolves an unpinned torch with CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh $(DEMO)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/preprocess.py
	$(PY) bench/loader.py
	$(PY) bench/train.py

clean:
	rm -rf $(DEMO) .pytest_cache
