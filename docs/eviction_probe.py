"""One attention layer of SmolLM2's shape (3 KV heads x 3 queries, head_dim 64, random inputs)
under H2O at 10%: the blocked, compiled teacher-forced form (core/eviction.py) against the T x T
reference it replaced and against full attention's fused causal kernel; best of 3 per form.

    OMP_NUM_THREADS=1 python docs/eviction_probe.py --seq-lens 1024,4096,8000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from lesskv.core import eviction, math
from lesskv.core.policies import Policy, Slots, keep_mask_from_steps, make_policy


def best_of(rounds: int, run: Callable[[], object]) -> float:
    run()  # warm: numba's cache, the allocator
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def reference(policy: Policy, slots: Slots, q, key, value, scale: float) -> None:
    t = key.shape[2]
    logits = math.causal_logits(q, key, scale) if policy.uses_attention else None
    keep = keep_mask_from_steps(policy.eviction_steps(logits, slots, t)).unsqueeze(2)
    if logits is None:
        math.sparse_attention(q, key, value, keep, scale)
    else:
        math.attention_from_logits(logits, keep, value)


@torch.no_grad()
def probe(policy: Policy, t: int, rounds: int) -> str:
    q, key, value = torch.randn(1, 3, 3, t, 64), torch.randn(1, 3, t, 64), torch.randn(1, 3, t, 64)
    inputs, slots = (q, key, value, 64**-0.5), policy.slots(t)
    full = best_of(rounds, partial(math.causal_attention, *inputs))
    fused = best_of(rounds, partial(eviction.policy_attention, policy, slots, *inputs))
    ref = best_of(rounds, partial(reference, policy, slots, *inputs)) if t <= 4096 else None
    ref_text = "not run (T x T at this length)" if ref is None else f"{ref * 1e3:7.1f} ms"
    return (
        f"{policy.name} {t}: full {full * 1e3:7.1f} ms | blocked {fused * 1e3:7.1f} ms "
        f"= {fused / full:.2f}x full | T x T reference {ref_text}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="1024,4096,8000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default="h2o")
    args = parser.parse_args()
    torch.manual_seed(0)
    for t in map(int, args.seq_lens.split(",")):
        print(probe(make_policy(args.policy, 0.1), t, args.rounds), flush=True)


if __name__ == "__main__":
    main()
