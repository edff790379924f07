"""Token-level perplexity of full attention, sparse baselines and LESS on the same windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.core.budget import DEFAULT_RANK
from lesskv.core.policies import Policy
from lesskv.hf.methods import get_method, set_method
from lesskv.hf.modules import attention_modules


@dataclass
class PerplexityResult:
    """One table row; ``budget_tokens`` is what each KV head may hold (the window for full),
    ``head_bytes`` its memory: those K/V pairs plus the summary of the evicted ones."""

    method: str
    policy: str
    budget: str
    budget_tokens: int
    head_bytes: int
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def kept_tokens(method: str, policy: Policy | None, seq_len: int, head_dim: int, rank: int) -> int:
    """KV pairs per head a method keeps for one window (Baseline+ adds the state's worth)."""
    if policy is None:
        return seq_len
    return get_method(method).kept_tokens(policy, seq_len, head_dim, rank)


@torch.no_grad()
def window_nll(model: PreTrainedModel, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows, each predicting tokens 1..T-1."""
    logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    ).item()


def mean_nll(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1, bar: tqdm | None = None
) -> float:
    """Mean next-token NLL over ``windows`` ``(N, T)`` with whatever attention the model is set
    to (a method, or any layer setups): every row of the tables shares this loop."""
    nll = 0.0
    for batch in windows.split(batch_size):
        nll += window_nll(model, batch.to(model.device))
        if bar is not None:
            bar.update(len(batch))
    return nll / (windows.shape[0] * (windows.shape[1] - 1))


def evaluate_perplexity(
    model: PreTrainedModel,
    windows: torch.Tensor,
    methods: Sequence[str],
    policy: Policy | None = None,
    kernels: Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
    batch_size: int = 1,
    progress: bool = True,
) -> list[PerplexityResult]:
    """Perplexity per method over the same ``windows`` ``(N, T)``; the model ends in full mode."""
    n, seq_len = windows.shape
    head_dim = attention_modules(model)[0].head_dim
    results = []
    bar = tqdm(total=len(methods) * n, desc="perplexity", unit="win", disable=not progress)
    try:
        for method in methods:
            set_method(model, method, policy=policy, kernels=kernels, rank=rank)
            bar.set_postfix(method=method)
            nll = mean_nll(model, windows, batch_size, bar)
            tokens = n * (seq_len - 1)
            kept = kept_tokens(method, policy, seq_len, head_dim, rank)
            pair_bytes = 2 * head_dim * model.dtype.itemsize
            chosen = get_method(method)
            results.append(
                PerplexityResult(
                    method=method,
                    **chosen.labels(policy),
                    budget_tokens=kept,
                    head_bytes=kept * pair_bytes + chosen.state_bytes(rank, head_dim),
                    ppl=math.exp(nll),
                    nll=nll,
                    tokens=tokens,
                    windows=n,
                    seq_len=seq_len,
                )
            )
    finally:
        bar.close()
        set_method(model, "full")
    return results
