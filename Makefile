# Entry points: `make demo` (preprocess -> train -> evaluate on the bundled songs),
# `make study` (the four objectives compared on the bundled songs) and `make test`.
# All start with `make install`, which is a no-op once done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
STUDY  := runs/study-demo

.PHONY: install demo study test bench clean

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

# The shards are made once (preprocessing is deterministic); the study resumes what is done.
study: install
	test -f $(STUDY)/shards/manifest.json || $(PY) -m preprocess --src examples/midi --out $(STUDY)/shards \
		--workers 2 --shard-size 2 --overwrite
	$(PY) -m musicbert.study --config configs/study_demo.yaml out=$(STUDY) shards=$(STUDY)/shards

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/preprocess.py
	$(PY) bench/preprocess_pool.py
	$(PY) bench/fidelity.py
	$(PY) bench/chord_truth.py
	$(PY) bench/loader.py
	$(PY) bench/packing.py
	$(PY) bench/train.py
	$(PY) bench/evaluate_memory.py

clean:
	rm -rf $(DEMO) $(STUDY) .pytest_cache
