"""Probe: how much should the paper-form state weigh at long context? (RESULTS.md §9)

Reweights the low-rank part of given (paper-form) kernels at evaluation time only, with a dense
weight per query i and evicted pair j, and prints one perplexity per weighting:

    base             Baseline+ (no state)
    decay:H          exp(-ln2 / H · (i - j)), a half-life of H tokens ("decay:inf" = the paper)
    count:A:REF      (REF / n)^A, n the pairs absorbed by step i

    python docs/state_probe.py ../shared/data/pg19/10146.txt 4096 h2o 1 \
        base,decay:inf,count:0.5:922,count:1:922,decay:2048,decay:512,decay:128
"""

import math
import sys
import time

import torch

from lesskv.core import math as less_math
from lesskv.core.policies import make_policy
from lesskv.data import load_texts, token_windows
from lesskv.evaluation.perplexity import evaluate_perplexity
from lesskv.hf.checkpoint import LessKernels, shipped_kernels
from lesskv.hf.loading import load_model

WEIGHTING: dict[str, object] = {}


def dense_lowrank(phi_q, psi_k, value, steps, decay=None):
    """lowrank_parallel's terms as an explicit T x T weight matrix, reweighted."""
    t = steps.shape[-1]
    pos = torch.arange(t)
    evicted = steps.unsqueeze(-2) <= pos.view(t, 1)  # (B, Hkv, i, j): j evicted by step i
    kind, *args = WEIGHTING["spec"]
    if kind == "decay":
        rate = 0.0 if args[0] == "inf" else math.log(2) / float(args[0])
        weight = torch.exp(-rate * (pos.view(t, 1) - pos).clamp_min(0).float())
    else:
        absorbed = evicted.sum(-1).clamp_min(1).float()
        weight = ((float(args[1]) / absorbed) ** float(args[0])).unsqueeze(-1)
    lowrank = torch.einsum("bhgir,bhjr->bhgij", phi_q, psi_k) * (evicted * weight).unsqueeze(2)
    return lowrank @ value.unsqueeze(2), lowrank.sum(-1, keepdim=True)


def main() -> None:
    path, seq_len, policy_name, windows, specs = sys.argv[1:6]
    policy = make_policy(policy_name, "0.1")
    model, tokenizer = load_model("smollm2-135m")
    kernels = list(LessKernels.from_pretrained(shipped_kernels("smollm2-135m", policy)).layers)
    ids = token_windows(tokenizer, load_texts(path), int(seq_len), max_windows=int(windows))
    less_math.lowrank_parallel = dense_lowrank
    for spec in specs.split(","):
        started = time.time()
        WEIGHTING["spec"] = spec.split(":")
        method = "baseline+" if spec == "base" else "less"
        rows = evaluate_perplexity(model, ids, [method], policy, kernels, progress=False)
        print(f"{spec}: ppl {rows[0].ppl:.3f} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
