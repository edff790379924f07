"""LESS's implied attention distribution, and its KL divergence from the true one.

LESS's output is a weighted mean of values: a kept key ``j`` weighs ``exp(q·k_j · scale)``
and an evicted one ``φ(q)·ψ(k_j)`` (faded by ``exp(-λ (i - j))``), under one shared
normaliser. Training on the output alone (MSE) lets the kernels match the evicted values'
*mean* with weights that look nothing like attention; matching the distribution itself (as
Hedgehog does for linear attention) asks φ·ψ to reproduce the evicted keys' real weights.

:func:`attention_kl` is ``KL(p_full || p_LESS)`` per query, averaged: every past key is
either kept or evicted, so ``p_LESS`` covers the same support as ``p_full``. Queries are taken
a block at a time, each block recomputed in the backward pass, so memory is one block's
``rows x T`` weights rather than ``T x T``.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lesskv.core.math import NEG_INF

# Queries per block: the block's (B, Hkv, G, rows, T) weights are its largest tensors.
KL_BLOCK = 128


def attention_kl(
    q: torch.Tensor,
    key: torch.Tensor,
    steps: torch.Tensor,
    phi_q: torch.Tensor,
    psi_k: torch.Tensor,
    decay: torch.Tensor,
    scale: float,
    start: int = 0,
    block: int = KL_BLOCK,
) -> torch.Tensor:
    """Mean over queries ``i >= start`` (where something is evicted) and query heads of
    ``KL(p_full_i || p_LESS_i)``, in nats. ``q: (B, Hkv, G, T, D)``, ``key: (B, Hkv, T, D)``,
    ``steps: (B, Hkv, T)`` each key's eviction step (T: never), ``phi_q: (B, Hkv, G, T, R)``,
    ``psi_k: (B, Hkv, T, R)``, ``decay: (Hkv,)`` the state's rates λ."""
    t = key.shape[2]
    total, count = q.new_zeros((), dtype=torch.float32), 0
    for first in range(start, t, block):
        rows = slice(first, min(t, first + block))
        args = (q[..., rows, :], key, steps, phi_q[..., rows, :], psi_k, decay, scale, first)
        if torch.is_grad_enabled():
            part = checkpoint(_block_kl, *args, use_reentrant=False)
        else:
            part = _block_kl(*args)
        total = total + part
        count += q[..., rows, :].shape[:-1].numel()
    return total / max(count, 1)


def _block_kl(*args) -> torch.Tensor:
    """Summed KL of one block of queries (:func:`implied_distributions`' arguments)."""
    log_p, log_q = implied_distributions(*args)
    terms = log_p.exp() * (log_p - log_q)
    return terms.nan_to_num(nan=0.0).sum()  # future keys: 0 * (-inf - -inf)


def implied_distributions(
    q: torch.Tensor,
    key: torch.Tensor,
    steps: torch.Tensor,
    phi_q: torch.Tensor,
    psi_k: torch.Tensor,
    decay: torch.Tensor,
    scale: float,
    first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-weights ``(B, Hkv, G, rows, T)`` of full attention and of LESS for the queries
    ``q`` at positions ``first..`` (future keys -inf in both): LESS's output is exactly
    ``exp(log_q) @ value``."""
    rows, t = q.shape[3], key.shape[2]
    query = torch.arange(first, first + rows, device=q.device).view(-1, 1)
    position = torch.arange(t, device=q.device)
    past = position <= query  # (rows, T)
    evicted = steps[:, :, None, None, :] <= query  # (B, Hkv, 1, rows, T); implies past
    logits = torch.einsum("bhgtd,bhsd->bhgts", q.float(), key.float()) * scale
    log_p = logits.masked_fill(~past, NEG_INF).log_softmax(-1)
    distance = (query - position).clamp(min=0).float()  # (rows, T)
    fade = torch.exp(-decay.float().view(-1, 1, 1, 1) * distance)  # (Hkv, 1, rows, T)
    weight = torch.einsum("bhgtr,bhsr->bhgts", phi_q.float(), psi_k.float()) * fade
    log_weight = weight.clamp_min(torch.finfo(torch.float32).tiny).log()
    # LESS's unnormalised log-weights: kept keys their logits, evicted keys log φ·ψ
    log_less = torch.where(evicted, log_weight, logits).masked_fill(~past, NEG_INF)
    return log_p, log_less.log_softmax(-1)
