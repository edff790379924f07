"""Attention matching (after arXiv 2602.16284), training-free, as a bound for the probe.

Every ``every`` tokens (a block) the evicted pairs are compacted into at most ``slots``
pseudo-pairs per KV head: the current pseudo-pairs and the pairs evicted since the last
compaction are one set; the ``slots`` members with the most attention from the block's queries
(the reference queries) keep their keys; each gets a log-mass ``β_s`` by non-negative least
squares, so that ``Σ_s e^{q·k_s·scale + β_s}`` matches the set's attention mass for every
reference query, and a value by (ridge) least squares, so that the pseudo-pairs' softmax mean
matches the set's. A query reads the pseudo-pairs as it reads kept pairs, through the layer's
softmax. Same memory as the ``slots`` form (key, value and log-mass per slot), no parameters.
It is a bound, not a cache: it holds the reference queries, which a cache would have to
store, and the pairs evicted since the last compaction wait (uncounted) until the next one.
"""

from __future__ import annotations

import torch

from lesskv.core.math import NEG_INF

# The values' ridge towards the chosen members' own, relative to the read's mean square: few
# reference queries must not overfit them.
RIDGE = 0.1


def attention_matching(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    scale: float,
    slots: int,
    every: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's ``(out, lse)`` over the pseudo-pairs compacted before it: ``q`` ``(B, Hkv,
    G, T, D)``, ``key``/``value`` ``(B, Hkv, T, D)``, ``steps`` ``(B, Hkv, T)`` (the step each
    pair is evicted at); fp32, ``out`` 0 and ``lse`` -inf before the first compaction."""
    b, hkv, g, t, d = q.shape
    out = q.new_zeros(b, hkv, g, t, d, dtype=torch.float32)
    lse = torch.full((b, hkv, g, t, 1), NEG_INF, dtype=torch.float32, device=q.device)
    for row in range(b):
        for head in range(hkv):
            _one_head(
                q[row, head].float(),
                key[row, head].float(),
                value[row, head].float(),
                steps[row, head],
                scale,
                slots,
                every,
                out[row, head],
                lse[row, head],
            )
    return out, lse


def _one_head(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    scale: float,
    slots: int,
    every: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """One head's compactions and reads, into ``out`` ``(G, T, D)`` and ``lse`` ``(G, T, 1)``."""
    d, t = key.shape[-1], key.shape[0]
    pseudo_k = key.new_zeros(0, d)
    pseudo_v = key.new_zeros(0, d)
    pseudo_b = key.new_zeros(0)
    for start in range(0, t, every):
        stop = min(t, start + every)
        if len(pseudo_b):  # this block's queries read what was compacted before it
            logits = q[:, start:stop] @ pseudo_k.T * scale + pseudo_b
            lse[:, start:stop] = logits.logsumexp(-1, keepdim=True)
            out[:, start:stop] = torch.softmax(logits, -1) @ pseudo_v
        new = ((steps >= start) & (steps < stop)).nonzero().squeeze(-1)
        if not len(new):
            continue
        members_k = torch.cat([pseudo_k, key[new]])
        members_v = torch.cat([pseudo_v, value[new]])
        members_b = torch.cat([pseudo_b, key.new_zeros(len(new))])
        reference = q[:, start:stop].reshape(-1, d)
        pseudo_k, pseudo_v, pseudo_b = _compact(
            reference, members_k, members_v, members_b, scale, slots
        )


def _compact(
    reference: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    slots: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``slots`` pseudo-pairs ``(keys, values, log-masses)`` matching the attention of the
    ``reference`` queries to the pairs ``keys, values`` of log-masses ``bias``."""
    logits = reference @ keys.T * scale + bias  # (Q, N)
    true_lse = logits.logsumexp(-1, keepdim=True)
    weights = (logits - true_lse).exp()
    true_mean = weights @ values
    chosen = weights.sum(0).topk(min(slots, len(bias))).indices
    # the mass each chosen member would claim, relative to the set's: NNLS for w >= 0
    basis = (reference @ keys[chosen].T * scale - true_lse).exp()  # (Q, S)
    w = _nnls(basis, torch.ones_like(true_lse).squeeze(-1))
    alive = w > 0
    chosen, w = chosen[alive], w[alive]
    log_mass = w.log()
    read = torch.softmax(reference @ keys[chosen].T * scale + log_mass, -1)
    gram = read.T @ read
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(chosen), device=read.device)
    fitted = torch.linalg.solve(gram + ridge, read.T @ true_mean + ridge @ values[chosen])
    return keys[chosen], fitted, log_mass


def _nnls(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``argmin ||a x - b||, x >= 0`` for a few columns: least squares on the active set,
    dropping the most negative column until none is negative."""
    active = torch.ones(a.shape[1], dtype=torch.bool, device=a.device)
    x = a.new_zeros(a.shape[1])
    while active.any():
        solution = torch.linalg.pinv(a[:, active]) @ b
        if (solution >= 0).all():
            x[active] = solution
            return x
        index = active.nonzero().squeeze(-1)
        active[index[solution.argmin()]] = False
    return x
