"""The LESS attention math as plain tensor functions (no model code).

Shapes: queries are grouped by KV head, ``q: (B, Hkv, G, Tq, D)`` with ``G`` query heads per
KV head (GQA; ``G = 1`` for multi-head attention), keys/values ``(B, Hkv, Tk, D)``.

For one query, LESS attends exactly over the kept pairs and approximately, through the
kernels, over the evicted ones:

    o = (φ(q)·H + Σ_kept exp(q·k/√D) v) / (φ(q)·z + Σ_kept exp(q·k/√D))

Both forms below produce the sparse part ``(o_sparse, lse)`` and the low-rank part
``(num, den) = (φ(q)·H, φ(q)·z)`` and hand them to :func:`combine`; the parallel form builds
H and z implicitly per query from the evicted mask, the recurrent form reads them from the
cache's running state.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, Hq, T, D)`` → ``(B, Hkv, G, T, D)``: transformers orders query heads by group."""
    b, hq, t, d = query.shape
    return query.view(b, kv_heads, hq // kv_heads, t, d)


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled logits ``(B, Hkv, G, Tq, Tk)`` without expanding K across the group."""
    return torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale


def sparse_attention(
    logits: torch.Tensor, value: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``keep`` (broadcastable to the logits).

    Returns the output ``(B, Hkv, G, Tq, D)`` and the log-sum-exp of the kept logits
    ``(B, Hkv, G, Tq, 1)``; a row with nothing kept (padding) gives output 0 and lse -inf
    instead of NaN, so it cannot poison later layers.
    """
    masked = logits.masked_fill(~keep, NEG_INF)
    lse = masked.logsumexp(-1, keepdim=True)
    probs = torch.exp(masked - lse.nan_to_num(neginf=0.0))
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, value)
    return out, lse


def lowrank_parallel(
    phi_q: torch.Tensor, psi_k: torch.Tensor, value: torch.Tensor, evicted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank terms for every query at once (teacher forcing).

    ``phi_q: (B, Hkv, G, Tq, R)``, ``psi_k: (B, Hkv, Tk, R)``, ``evicted`` broadcastable to
    ``(B, Hkv, G, Tq, Tk)``. Row i uses exactly the pairs evicted by step i, which is what
    the recurrent state ``H = Σ ψ(k)ᵀv, z = Σ ψ(k)`` holds at that step.
    """
    weights = torch.einsum("bhgqr,bhkr->bhgqk", phi_q, psi_k) * evicted
    num = torch.einsum("bhgqk,bhkd->bhgqd", weights, value)
    return num, weights.sum(-1, keepdim=True)


def lowrank_recurrent(
    phi_q: torch.Tensor, state_h: torch.Tensor, state_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank terms from the running state: ``H: (B, Hkv, R, D)``, ``z: (B, Hkv, R)``."""
    num = torch.einsum("bhgqr,bhrd->bhgqd", phi_q, state_h)
    den = torch.einsum("bhgqr,bhr->bhgq", phi_q, state_z).unsqueeze(-1)
    return num, den


def combine(
    sparse_out: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor
) -> torch.Tensor:
    """Merge both parts in log space: the exp-sums of the kept logits are never formed.

    ``o = (e^lse · o_sparse + num) / (e^lse + den)``, with ``den >= 0`` because φ, ψ >= 0.
    """
    has_lowrank = den > 0
    safe_den = den.clamp_min(torch.finfo(den.dtype).tiny)  # keeps log and division finite
    log_den = torch.where(has_lowrank, safe_den.log(), NEG_INF)
    log_total = torch.logaddexp(lse, log_den).nan_to_num(neginf=0.0)
    lowrank_mean = torch.where(has_lowrank, num / safe_den, 0.0)
    return torch.exp(lse - log_total) * sparse_out + torch.exp(log_den - log_total) * lowrank_mean
