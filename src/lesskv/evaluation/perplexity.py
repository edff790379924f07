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
    window_nlls: list[float]  # each window's mean NLL: methods compare paired, window by window

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    """``a − b`` in mean NLL over the same windows: the mean difference, its standard error
    (windows differ far more from each other than methods do, so only a paired error tells
    whether a difference is real), and in how many windows ``a`` was lower."""

    mean: float
    se: float
    lower: int
    windows: int


def paired(a: PerplexityResult, b: PerplexityResult) -> Paired:
    """:class:`Paired` of two rows scored on the same windows."""
    diffs = torch.tensor(a.window_nlls, dtype=torch.float64) - torch.tensor(b.window_nlls)
    n = len(diffs)
    se = diffs.std().item() / math.sqrt(n) if n > 1 else math.nan
    return Paired(diffs.mean().item(), se, int((diffs < 0).sum()), n)


def kept_tokens(method: str, policy: Policy | None, seq_len: int, head_dim: int, rank: int) -> int:
    """KV pairs per head a method keeps for one window (Baseline+ adds the state's worth)."""
    if policy is None:
        return seq_len
    return get_method(method).kept_tokens(policy, seq_len, head_dim, rank)


def against(results: Sequence[PerplexityResult], reference: str = "baseline+") -> list[dict]:
    """Every other sparse method against ``reference`` (Baseline+: the same memory), paired
    over the windows, with the share of the reference → full gap it closes (in NLL) where
    ``full`` was scored too; empty without the reference."""
    rows = {r.method: r for r in results}
    if reference not in rows:
        return []
    ref, full = rows[reference], rows.get("full")
    out = []
    for r in results:
        if r.method in (reference, "full"):
            continue
        d = paired(r, ref)
        gap = ref.nll - full.nll if full is not None else math.nan
        out.append(
            {
                "method": r.method,
                "vs": reference,
                "delta_nll": d.mean,
                "se": d.se,
                "lower_in": f"{d.lower}/{d.windows}",
                "gap_closed": -d.mean / gap if gap > 0 else math.nan,
            }
        )
    return out


@torch.no_grad()
def window_nll(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window of a batch ``(B, T)``, predicting tokens 1..T-1."""
    logits = model(input_ids=ids).logits.float()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])  # contiguous rows: a strided class
    # dimension sums a 262k vocabulary in float32 ~2e-4 off (measured on Gemma 3)
    nll = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(len(ids), -1).mean(dim=1).cpu()


def window_nlls(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1, bar: tqdm | None = None
) -> list[float]:
    """Each window's mean next-token NLL over ``windows`` ``(N, T)`` with whatever attention
    the model is set to (a method, or any layer setups): every row of the tables shares this
    loop."""
    nlls = []
    for batch in windows.split(batch_size):
        nlls += window_nll(model, batch.to(model.device)).tolist()
        if bar is not None:
            bar.update(len(batch))
    return nlls


def mean_nll(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 1, bar: tqdm | None = None
) -> float:
    """Mean next-token NLL over ``windows`` (all of one length, so the mean of the windows')."""
    nlls = window_nlls(model, windows, batch_size, bar)
    return sum(nlls) / len(nlls)


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
            nlls = window_nlls(model, windows, batch_size, bar)
            nll = sum(nlls) / n
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
                    window_nlls=nlls,
                )
            )
    finally:
        bar.close()
        set_method(model, "full")
    return results
