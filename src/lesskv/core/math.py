"""The LESS attention math as plain tensor functions (no model code).

Shapes: queries are grouped by KV head, ``q: (B, Hkv, G, Tq, D)`` with ``G`` query heads per
KV head (GQA; ``G = 1`` for multi-head attention), keys/values ``(B, Hkv, Tk, D)``.

For one query, LESS attends exactly over the kept pairs and approximately, through a state
form (:mod:`lesskv.core.forms`), over the evicted ones; the paper's low-rank form reads

    o = (φ(q)·H + Σ_kept exp(q·k/√D) v) / (φ(q)·z + Σ_kept exp(q·k/√D))

Both parts are a softmax output and its log-sum-exp: the sparse part ``(o_sparse, lse)``, and
the state's ``(mean, log mass)`` (:func:`state_summary` of ``(φ(q)·H, φ(q)·z)``), which
:func:`join_attention` joins in log space. The parallel form builds every step's state as a
prefix sum in eviction order (:func:`prefix_states`), the recurrent form reads it from the
cache's running state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, Hq, T, D)`` → ``(B, Hkv, G, T, D)``: transformers orders query heads by group."""
    b, hq, t, d = query.shape
    return query.view(b, kv_heads, hq // kv_heads, t, d)


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled logits ``(B, Hkv, G, Tq, Tk)`` without expanding K across the group (the scale
    goes on the queries: a pass over ``Tq x D`` numbers, not ``Tq x Tk``)."""
    return torch.einsum("bhgqd,bhkd->bhgqk", q * scale, k)


def causal_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`attention_logits` with every key after its query at -inf (queries are the last
    ``Tq`` of the ``Tk`` positions): what a policy scores and what attention normalises.
    ``out`` (a preallocated ``(B, Hkv, G, Tq, Tk)`` tensor) is filled in place."""
    tq, tk = q.shape[-2], k.shape[-2]
    future = torch.ones(tq, tk, dtype=torch.bool, device=k.device).triu(tk - tq + 1)
    if out is None:
        return attention_logits(q, k, scale).masked_fill_(future, NEG_INF)
    b, hkv, g, _, d = q.shape  # one (G·Tq, D) @ (D, Tk) product per KV head: plain BLAS
    rows = out.view(b * hkv, g * tq, tk)
    torch.matmul(q.reshape(b * hkv, g * tq, d), k.reshape(b * hkv, tk, d).mT, out=rows)
    return out.mul_(scale).masked_fill_(future, NEG_INF)


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities restricted to ``keep`` and the log-sum-exp of the kept logits
    ``(..., 1)``; a row with nothing kept (padding) gives probabilities 0 and lse -inf
    instead of NaN, so it cannot poison later layers."""
    masked = logits.masked_fill(~keep, NEG_INF)
    lse = masked.logsumexp(-1, keepdim=True)  # keeps ``masked`` for its backward
    return (masked - lse.nan_to_num(neginf=0.0)).exp_(), lse


def attention_from_logits(
    logits: torch.Tensor, keep: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over ``keep`` from logits already computed ``(B, Hkv, G, Tq, Tk)``
    (a policy that scores needed them): the output ``(B, Hkv, G, Tq, D)`` and the kept
    logits' log-sum-exp, as :func:`sparse_attention` gives them.

    The ``Tq x Tk`` weights are never normalised (each output row is divided by its sum
    instead) and, unless autograd needs them, they are ``logits`` themselves, overwritten:
    four passes over the largest tensor of the step and no second one. A row with nothing
    kept gives output 0 and lse -inf."""
    in_place = not (torch.is_grad_enabled() and logits.requires_grad)
    masked = logits.masked_fill_(~keep, NEG_INF) if in_place else logits.masked_fill(~keep, NEG_INF)
    top = masked.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    weights = masked.sub_(top).exp_() if in_place else (masked - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, value.to(weights.dtype))
    return out / total.clamp_min(torch.finfo(total.dtype).tiny), top + total.log()


def probabilities(
    q: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention probabilities behind an output whose log-sum-exp ``lse`` is known (from
    a fused kernel): one matmul and one exp, where :func:`masked_softmax` needs three more
    passes to find the normaliser. Keys outside ``keep`` (if given) and rows with nothing
    kept give 0."""
    logits = attention_logits(q, key, scale).sub_(lse.nan_to_num(neginf=0.0)).exp_()
    return logits if keep is None else logits.masked_fill_(~keep, 0.0)


def sparse_attention(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``keep`` (broadcastable to ``(B, Hkv, G, Tq, Tk)``):
    the output ``(B, Hkv, G, Tq, D)`` and the kept logits' log-sum-exp ``(B, Hkv, G, Tq, 1)``.

    On CPU without autograd it runs torch's fused flash kernel, which returns the
    log-sum-exp too: ~10x faster than the softmax below and no ``T x T`` probabilities.
    That kernel has no gradient for the log-sum-exp, so training keeps the reference path.
    """
    if _fused_lse_applies(q, key, value):
        return _fused_with_lse(q, key, value, keep, scale)
    probs, lse = masked_softmax(attention_logits(q, key, scale), keep)
    return torch.einsum("bhgqk,bhkd->bhgqd", probs, value), lse


def causal_attention(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Plain causal attention with its log-sum-exp, ``q: (B, Hkv, G, T, D)`` over the same T
    keys, through torch's fused CPU flash kernel: no mask is built, and the kernel skips the
    blocks above the diagonal. ``None`` where that kernel does not apply (other devices,
    autograd): the caller takes a general path."""
    if not _fused_lse_applies(q, key, value):
        return None
    b, hkv, g, t, d = q.shape
    out, lse = _CPU_FLASH(q.reshape(b, hkv * g, t, d), key, value, is_causal=True, scale=scale)
    return out.view(b, hkv, g, t, d), lse.view(b, hkv, g, t, 1).to(q.dtype)


def _fused_lse_applies(*tensors: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].device.type == "cpu" and not needs_grad and _CPU_FLASH is not None


def _fused_with_lse(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hkv, g, tq, d = q.shape
    keep = keep.expand(b, hkv, keep.shape[-3] if keep.dim() > 2 else 1, tq, key.shape[2])
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF)
    bias = bias.expand(b, hkv, g, tq, -1).reshape(b, hkv * g, tq, -1)
    out, lse = _CPU_FLASH(q.reshape(b, hkv * g, tq, d), key, value, attn_mask=bias, scale=scale)
    lse = lse.view(b, hkv, g, tq, 1).masked_fill(~keep.any(-1, keepdim=True), NEG_INF)
    return out.view(b, hkv, g, tq, d), lse.to(q.dtype)


# Private, so looked up defensively: without it every call takes the reference path.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def sparse_output(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`sparse_attention`'s output alone, through torch's public fused attention (any
    device, differentiable): for the sparse baselines, which need no log-sum-exp."""
    b, hkv, g, tq, d = q.shape
    mask = keep.expand(b, hkv, g, tq, key.shape[2]).reshape(b, hkv * g, tq, -1)
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv * g, tq, d), key, value, attn_mask=mask, scale=scale, enable_gqa=g > 1
    )
    return out.view(b, hkv, g, tq, d)


def prefix_states(
    weights: torch.Tensor,
    payload: torch.Tensor,
    steps: torch.Tensor,
    read: Callable[[torch.Tensor, slice, torch.Tensor | None], tuple[torch.Tensor, ...]],
    decay: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every query's summary of the pairs evicted by its step, at once (teacher forcing).

    A summary state is a sum over evicted pairs of ``w_j ⊗ p_j``: ``weights`` ``(B, Hkv, T, F)``
    say how pair j enters the state's F rows (the low-rank form's ψ(k_j), the slots form's
    assignment), ``payload`` ``(B, Hkv, T, P)`` what it adds (``[v_j, 1]``; ``[k_j, v_j, 1]``).
    ``steps: (B, Hkv, T)`` is the step at which each pair is evicted (T: never). Evicted pairs
    never return, so the state at step i is a prefix sum over pairs in eviction order,
    accumulated in the same order as a decoding cache folds them: O(T·F·P) work, and memory for
    one ``block`` of queries at a time: the state after the block before, plus the prefix sums
    of the pairs the block's queries see leave (a whole sequence's prefix states are 4 GiB a
    layer for an 8B model at 32k tokens). ``read(states, rows, fade)`` turns the states of the
    queries ``rows`` ``(B, Hkv, rows, F, P)`` into tensors ``(B, Hkv, G, rows, ·)``, which are
    concatenated over the blocks.

    ``decay`` (``(Hkv,)`` rates λ >= 0) weighs pair j by ``exp(-λ (i - j))`` for query i, as
    a decoding cache's state decays by ``exp(-λ)`` per token. The running state is kept
    relative to the block's first query, and blocks are short enough that no weight exceeds
    ``exp(EXP_LIMIT)``; ``read`` gets each query's state as of the block's first query and
    ``fade`` ``(1, Hkv, 1, rows, 1)``, the factor by which it fades on to the query itself
    (None without decay), to apply where it costs least (on the read, not the states).
    """
    t = steps.shape[-1]
    sorted_steps, order = steps.sort(dim=-1, stable=True)
    weights_sorted = weights.gather(2, order.unsqueeze(-1).expand_as(weights))
    payload_sorted = payload.gather(2, order.unsqueeze(-1).expand_as(payload))
    queries = torch.arange(t, device=steps.device)
    evicted_by = torch.searchsorted(
        sorted_steps.contiguous(), queries.expand_as(steps).contiguous(), right=True
    )
    rate = None if decay is None else decay.view(-1, 1).to(weights.dtype)
    size = min(block or QUERY_BLOCK, t if rate is None else _decay_block(rate, t))
    b, hkv, f, p = *weights.shape[:2], weights.shape[-1], payload.shape[-1]
    state = weights.new_zeros(b, hkv, f, p)
    done = torch.zeros(b, hkv, dtype=torch.long, device=steps.device)  # pairs in the state
    parts = []
    for start in range(0, t, size):
        rows = slice(start, min(t, start + size))
        if rate is not None and start:  # the state moves on to this block's first query
            state = state * (-rate * size).exp()[..., None]
        new = _Pairs(weights_sorted, payload_sorted, order, done, evicted_by[..., rows.stop - 1])
        w = new.weights  # pair j's weight as seen from query ``start``
        if rate is not None:
            w = w * (rate * (new.positions - start)).exp().unsqueeze(-1)
        # state after c of the block's new pairs, c = 0..n
        added = torch.einsum("bhtf,bhtp->bhtfp", w, new.payload).cumsum(2)
        prefix = torch.cat([state[:, :, None], state[:, :, None] + added], 2)
        seen = evicted_by[..., rows] - done.unsqueeze(-1)  # (B, Hkv, rows) in 0..n
        states = prefix.gather(2, seen[..., None, None].expand(*seen.shape, f, p))
        fade = None  # and from there on to each query of the block
        if rate is not None:
            fade = (-rate * (queries[rows] - start)).exp()[None, :, None, :, None]
        parts.append(read(states, rows, fade))
        state, done = prefix[:, :, -1], new.upto
    return tuple(torch.cat(blocks, 3) for blocks in zip(*parts, strict=True))


# Queries whose states are computed together: their states are (block x F x P) per head.
QUERY_BLOCK = 512
# exp() of at most this: far from float32's limit (88), so products and sums stay finite.
EXP_LIMIT = 60.0


def _decay_block(rate: torch.Tensor, t: int) -> int:
    """The most queries one block may span so that ``rate * block <= EXP_LIMIT``."""
    fastest = float(rate.detach().max())
    return t if fastest * t <= EXP_LIMIT else max(1, int(EXP_LIMIT / fastest))


class _Pairs:
    """The pairs (in eviction order) from ``done`` up to ``upto`` ``(B, Hkv)`` per head, padded
    to the longest head's count with pairs of weight 0."""

    def __init__(
        self,
        weights_sorted: torch.Tensor,
        payload_sorted: torch.Tensor,
        order: torch.Tensor,
        done: torch.Tensor,
        upto: torch.Tensor,
    ) -> None:
        count = int((upto - done).max())
        index = done.unsqueeze(-1) + torch.arange(count, device=done.device)
        real = index < upto.unsqueeze(-1)
        index = index.clamp(max=order.shape[-1] - 1).unsqueeze(-1)
        self.upto = upto
        self.positions = order.gather(-1, index[..., 0])
        weights = weights_sorted.gather(2, index.expand(-1, -1, -1, weights_sorted.shape[-1]))
        self.weights = weights * real.unsqueeze(-1)
        self.payload = payload_sorted.gather(2, index.expand(-1, -1, -1, payload_sorted.shape[-1]))


def lowrank_parallel(
    phi_q: torch.Tensor,
    psi_k: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    decay: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank terms ``(φ(q)·H_i, φ(q)·z_i)`` of every query at once: ``phi_q: (B, Hkv,
    G, T, R)``, ``psi_k: (B, Hkv, T, R)``, ``H_i = Σ_{steps[j] <= i} ψ(k_j)ᵀ v_j`` and ``z_i``
    alike, as the prefix states ``Σ ψ(k_j) ⊗ [v_j, 1]`` of :func:`prefix_states` (its
    ``steps``, ``decay`` and ``block``)."""
    payload = torch.cat([value, value.new_ones(*value.shape[:-1], 1)], -1)

    def read(
        states: torch.Tensor, rows: slice, fade: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phi = phi_q[..., rows, :]
        num = torch.einsum("bhgtr,bhtrd->bhgtd", phi, states[..., :-1])
        den = torch.einsum("bhgtr,bhtr->bhgt", phi, states[..., -1]).unsqueeze(-1)
        return (num, den) if fade is None else (num * fade, den * fade)

    num, den = prefix_states(psi_k, payload, steps, read, decay, block)
    return num, den


def lowrank_recurrent(
    phi_q: torch.Tensor, state_h: torch.Tensor, state_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank terms from the running state: ``H: (B, Hkv, R, D)``, ``z: (B, Hkv, R)``."""
    num = torch.einsum("bhgqr,bhrd->bhgqd", phi_q, state_h)
    den = torch.einsum("bhgqr,bhr->bhgq", phi_q, state_z).unsqueeze(-1)
    return num, den


def join_summary(
    out: torch.Tensor, lse: torch.Tensor, summary: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The kept pairs' attention ``(out, lse)`` joined with a summary of the evicted ones (a
    state form's or merge slots' ``(out, lse)``, fp32), computed in the summary's dtype and
    returned in ``out``'s: a 16-bit model's kept part is joined at the state's precision."""
    mean, log_mass = summary
    dtype = mean.dtype
    return join_attention(out.to(dtype), lse.to(dtype), mean, log_mass).to(out.dtype)


def state_summary(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What LESS's state claims of each query's evicted pairs: their softmax-weighted mean
    value ``num / den`` and the log of their attention mass (exp-sum of their logits) ``log
    den``; 0 and -inf where ``den`` is 0. ``o = (e^lse·o_sparse + num) / (e^lse + den)`` is
    :func:`join_attention` of the sparse part and this (``den >= 0`` as φ, ψ >= 0), and
    analyses set either claim against the truth."""
    has_lowrank = den > 0
    safe_den = den.clamp_min(torch.finfo(den.dtype).tiny)  # keeps log and division finite
    mean = torch.where(has_lowrank, num / safe_den, 0.0)
    return mean, torch.where(has_lowrank, safe_den.log(), NEG_INF)


def join_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """One softmax over two disjoint sets of keys from each set's output and log-sum-exp
    (the kept pairs and LESS's state, or the kept pairs and merge slots); a set with lse
    -inf (nothing in it) must have output 0."""
    log_total = torch.logaddexp(lse_a, lse_b).nan_to_num(neginf=0.0)
    return torch.exp(lse_a - log_total) * out_a + torch.exp(lse_b - log_total) * out_b


def truncated(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of every matrix ``(..., M, N)`` (Eckart–Young:
    the truncated SVD), in ``x``'s dtype; ``rank`` beyond ``min(M, N)`` keeps all of it.

    The oracle of the paper's Fig. 3 (right) adds this of the full-minus-sparse residual to the
    sparse output: the best any rank-R correction could do. The SVD runs in float32 (16-bit
    SVD is unsupported on CPU; float64 would be ~40x slower for no visible difference)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank == 0:
        return torch.zeros_like(x)
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    k = min(rank, s.shape[-1])
    return ((u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]).to(x.dtype)
