"""The LESS attention math as plain tensor functions (no model code).

Shapes: queries are grouped by KV head, ``q: (B, Hkv, G, Tq, D)`` with ``G`` query heads per
KV head (GQA; ``G = 1`` for multi-head attention), keys/values ``(B, Hkv, Tk, D)``.

For one query, LESS attends exactly over the kept pairs and approximately, through the
kernels, over the evicted ones:

    o = (φ(q)·H + Σ_kept exp(q·k/√D) v) / (φ(q)·z + Σ_kept exp(q·k/√D))

Both forms below produce the sparse part ``(o_sparse, lse)`` and the low-rank part
``(num, den) = (φ(q)·H, φ(q)·z)`` and hand them to :func:`combine`; the parallel form builds
every step's H and z as prefix sums in eviction order, the recurrent form reads them from
the cache's running state.
"""

from __future__ import annotations

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


def lowrank_parallel(
    phi_q: torch.Tensor,
    psi_k: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    decay: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank terms for every query at once (teacher forcing), as running states.

    ``phi_q: (B, Hkv, G, T, R)``, ``psi_k: (B, Hkv, T, R)``, ``steps: (B, Hkv, T)`` the step
    at which each token is evicted (T: never). Evicted tokens never return, so the state at
    step i is a prefix sum over tokens in eviction order: H_i = Σ_{steps[j] <= i} ψ(k_j)ᵀ v_j,
    accumulated in the same order as the decode-time cache. O(T·R·D) work, and memory for one
    ``block`` of queries at a time: the state after the block before, plus the prefix sums of
    the pairs the block's queries see leave (a whole sequence's prefix states are 4 GiB a layer
    for an 8B model at 32k tokens).

    ``decay`` (``(Hkv,)`` rates λ >= 0) weighs pair j by ``exp(-λ (i - j))`` for query i, as
    the decoding cache's state decays by ``exp(-λ)`` per token. The running state is kept
    relative to the block's first query, and blocks are short enough that no weight exceeds
    ``exp(EXP_LIMIT)``.
    """
    t = steps.shape[-1]
    sorted_steps, order = steps.sort(dim=-1, stable=True)
    psi_sorted = psi_k.gather(2, order.unsqueeze(-1).expand_as(psi_k))
    v_sorted = value.gather(2, order.unsqueeze(-1).expand_as(value))
    queries = torch.arange(t, device=steps.device)
    evicted_by = torch.searchsorted(
        sorted_steps.contiguous(), queries.expand_as(steps).contiguous(), right=True
    )
    rate = None if decay is None else decay.view(-1, 1).to(psi_k.dtype)
    size = min(block or QUERY_BLOCK, t if rate is None else _decay_block(rate, t))
    b, hkv, r, d = *psi_k.shape[:2], psi_k.shape[-1], value.shape[-1]
    state_h, state_z = psi_k.new_zeros(b, hkv, r, d), psi_k.new_zeros(b, hkv, r)
    done = torch.zeros(b, hkv, dtype=torch.long, device=steps.device)  # pairs in the state
    parts = []
    for start in range(0, t, size):
        rows = slice(start, min(t, start + size))
        if rate is not None and start:  # the state moves on to this block's first query
            fade = (-rate * size).exp()
            state_h, state_z = state_h * fade[..., None], state_z * fade
        new = _Pairs(psi_sorted, v_sorted, order, done, evicted_by[..., rows.stop - 1])
        psi_w = new.psi  # pair j's weight as seen from query ``start``
        if rate is not None:
            psi_w = psi_w * (rate * (new.positions - start)).exp().unsqueeze(-1)
        # state after c of the block's new pairs, c = 0..n
        prefix_h = torch.cat(
            [
                state_h[:, :, None],
                state_h[:, :, None] + torch.einsum("bhtr,bhtd->bhtrd", psi_w, new.values).cumsum(2),
            ],
            2,
        )
        prefix_z = torch.cat([state_z[:, :, None], state_z[:, :, None] + psi_w.cumsum(2)], 2)
        seen = evicted_by[..., rows] - done.unsqueeze(-1)  # (B, Hkv, rows) in 0..n
        num, den = _read_states(phi_q[..., rows, :], prefix_h, prefix_z, seen)
        if rate is not None:  # and from there on to each query of the block
            to_query = (-rate * (queries[rows] - start)).exp()[None, :, None, :, None]
            num, den = num * to_query, den * to_query
        parts.append((num, den))
        state_h, state_z, done = prefix_h[:, :, -1], prefix_z[:, :, -1], new.upto
    return torch.cat([n for n, _ in parts], 3), torch.cat([d for _, d in parts], 3)


# Queries whose low-rank terms are computed together: their states are (block x R x D) per head.
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
        psi_sorted: torch.Tensor,
        v_sorted: torch.Tensor,
        order: torch.Tensor,
        done: torch.Tensor,
        upto: torch.Tensor,
    ) -> None:
        count = int((upto - done).max())
        index = done.unsqueeze(-1) + torch.arange(count, device=done.device)
        real = index < upto.unsqueeze(-1)
        index = index.clamp(max=order.shape[-1] - 1)
        self.upto = upto
        self.positions = order.gather(-1, index)
        psi = psi_sorted.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, psi_sorted.shape[-1]))
        self.psi = psi * real.unsqueeze(-1)
        self.values = v_sorted.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, v_sorted.shape[-1]))


def _read_states(
    phi_q: torch.Tensor, prefix_h: torch.Tensor, prefix_z: torch.Tensor, seen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(q)·H and φ(q)·z for queries that have seen ``seen`` of the prefix states."""
    h_i = prefix_h.gather(2, seen[..., None, None].expand(*seen.shape, *prefix_h.shape[-2:]))
    z_i = prefix_z.gather(2, seen.unsqueeze(-1).expand(*seen.shape, prefix_z.shape[-1]))
    num = torch.einsum("bhgtr,bhtrd->bhgtd", phi_q, h_i)
    den = torch.einsum("bhgtr,bhtr->bhgt", phi_q, z_i).unsqueeze(-1)
    return num, den


def lowrank_recurrent(
    phi_q: torch.Tensor, state_h: torch.Tensor, state_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank terms from the running state: ``H: (B, Hkv, R, D)``, ``z: (B, Hkv, R)``."""
    num = torch.einsum("bhgqr,bhrd->bhgqd", phi_q, state_h)
    den = torch.einsum("bhgqr,bhr->bhgq", phi_q, state_z).unsqueeze(-1)
    return num, den


def less_parallel(
    sparse_out: torch.Tensor,
    lse: torch.Tensor,
    phi_q: torch.Tensor,
    psi_k: torch.Tensor,
    value: torch.Tensor,
    steps: torch.Tensor,
    decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """LESS's output for every query at once: the sparse part plus every pair evicted by each
    query's step (attention's parallel form and the training loss both use this). The state
    and the combine run in the kernels' dtype (fp32), the output is in ``sparse_out``'s."""
    num, den = lowrank_parallel(phi_q, psi_k, value.to(psi_k.dtype), steps, decay)
    dtype = num.dtype
    return combine(sparse_out.to(dtype), lse.to(dtype), num, den).to(sparse_out.dtype)


def less_recurrent(
    sparse_out: torch.Tensor,
    lse: torch.Tensor,
    phi_q: torch.Tensor,
    state_h: torch.Tensor,
    state_z: torch.Tensor,
) -> torch.Tensor:
    """LESS's output from the running fp32 state (decoding), in ``sparse_out``'s dtype."""
    num, den = lowrank_recurrent(phi_q.float(), state_h, state_z)
    return combine(sparse_out.float(), lse.float(), num, den).to(sparse_out.dtype)


def combine(
    sparse_out: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor
) -> torch.Tensor:
    """Merge both parts in log space: the exp-sums of the kept logits are never formed.

    ``o = (e^lse · o_sparse + num) / (e^lse + den)``, with ``den >= 0`` because φ, ψ >= 0.
    """
    return join_attention(sparse_out, lse, *state_summary(num, den))


def state_summary(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What LESS's state claims of each query's evicted pairs: their softmax-weighted mean
    value ``num / den`` and the log of their attention mass (exp-sum of their logits) ``log
    den``; 0 and -inf where ``den`` is 0. Apart from :func:`combine` so analyses can set
    either claim against the truth."""
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
