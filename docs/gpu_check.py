"""GPU check without the hub: on CUDA, a tiny random Llama decodes through ``LessCache`` (the
decoding step compiled by ``torch.compile``, Triton on a GPU, and eager) exactly as its
parallel teacher-forced form scores, for every policy with and without LESS; then the per-call
time of one compiled decoding step at SmolLM2's shapes, without and with LESS's state.

    python docs/gpu_check.py        # needs torch with CUDA, transformers, tokenizers
    python docs/gpu_check.py cpu    # the same on the CPU (a dry run of the script)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import BUDGET, kernel_set, make_tiny_model  # noqa: E402
from lesskv.core.decoding import Compiled, SlotBuffers, layer_step  # noqa: E402
from lesskv.core.kernels import KernelShape, LayerKernels  # noqa: E402
from lesskv.core.policies import POLICIES, make_policy  # noqa: E402
from lesskv.hf.compat import cache_argument  # noqa: E402
from lesskv.hf.methods import StepOptions, make_cache, set_method  # noqa: E402


def decode_equals_parallel(device: str) -> float:
    """Largest |decoded - parallel| logit over policies x {baseline, less} x {compiled, eager}."""
    model = make_tiny_model("llama-gqa").to(device)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    worst = 0.0
    for name in sorted(POLICIES):
        policy = make_policy(name, BUDGET)
        for method in ("baseline", "less"):
            kernels = kernel_set(model, name).to(device) if method == "less" else None
            layers = list(kernels.layers) if kernels is not None else None
            set_method(model, method, policy=policy, kernels=layers, rank=4)
            with torch.no_grad():
                parallel = model(input_ids=ids).logits
            set_method(model, "full")
            for compile in (True, False):
                step = StepOptions(compile=compile)
                cache = make_cache(model, method, policy, kernels=kernels, rank=4, step=step)
                with torch.no_grad():
                    steps = [
                        model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache)).logits
                        for t in range(ids.shape[1])
                    ]
                gap = (torch.cat(steps, 1) - parallel).abs().max().item()
                print(f"{name:6s} {method:8s} compiled={compile!s:5s} max |decode - TF| {gap:.2e}")
                worst = max(worst, gap)
    return worst


def step_time(device: str, less: bool, calls: int = 2000) -> float:
    """Microseconds per compiled decoding step (insert, attention, scores, state) at SmolLM2's
    shapes (3 KV heads x 3, D 64, 410 slots, batch 4)."""
    b, hkv, g, d, slots = 4, 3, 3, 64, 410
    query = torch.randn(b, hkv, g, 1, d, device=device)
    key, value = torch.randn(2, b, hkv, 1, d, device=device)
    keys, values = torch.randn(2, b, hkv, slots, d, device=device)
    positions = torch.arange(slots, device=device).expand(b, hkv, slots).clone()
    buffers = SlotBuffers(
        keys,
        values,
        positions,
        torch.zeros(b, hkv, slots, device=device),
        torch.ones(b, hkv, slots, dtype=torch.bool, device=device),
        torch.full((b,), slots, device=device),
    )
    state = None
    if less:
        kernels = LayerKernels(KernelShape(hkv * g, hkv, d)).eval().to(device)
        h, z = torch.zeros(b, hkv, 8, d, device=device), torch.zeros(b, hkv, 8, device=device)
        state = kernels, h, z
    torch._dynamo.reset()  # time this step's own graph, not what the checks above left
    step = Compiled(layer_step)
    policy = make_policy("h2o", slots)
    args = policy, policy.split(slots), None, query, key, value, buffers, 0.125, state
    with torch.no_grad():
        for _ in range(20):
            step(*args)
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            step(*args)
        _sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {name}")
    worst = decode_equals_parallel(device)
    sparse, less = step_time(device, False), step_time(device, True)
    print(f"compiled decoding step: {sparse:.1f} us sparse, {less:.1f} us with LESS's state")
    print(f"worst decode - teacher-forced gap: {worst:.2e} ({'ok' if worst < 1e-3 else 'FAIL'})")


if __name__ == "__main__":
    main()
