"""Plugging LESS into Hugging Face decoders through transformers' attention interface.

``enable(model)`` registers one attention implementation, ``"less"``, and gives every
attention module a :class:`LayerSetup`. ``set_method`` then switches the whole model between
full attention, a sparse policy (Baseline / Baseline+) and LESS without reloading anything:
the attention function reads the module's setup on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lesskv import attention as math
from lesskv.config import DEFAULT_RANK, state_size_in_tokens
from lesskv.errors import LessKVError
from lesskv.policies import Policy, keep_mask_from_steps

ATTN_NAME = "less"
METHODS = ("full", "baseline", "baseline+", "less")


@dataclass
class LayerSetup:
    """What one attention layer does: no policy means full attention."""

    policy: Policy | None = None
    extra_tokens: int = 0
    kernels: nn.Module | None = None
    # Sees (module, query, key, value) on every call: how training records post-RoPE states.
    observer: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    cache: object | None = None  # the LessCache of the current call, if any


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention modules in layer order (those transformers numbers with layer_idx)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    found = [m for m in found if hasattr(m, "num_key_value_groups")]
    if not found:
        raise LessKVError(
            f"{type(model).__name__} has no attention modules lesskv can drive "
            "(it needs transformers' standard attention interface)"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Route the model's attention through lesskv (full attention until ``set_method``)."""
    AttentionInterface.register(ATTN_NAME, less_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    for module in attention_modules(model):
        if not hasattr(module, "lesskv"):
            module.lesskv = LayerSetup()
            module.register_forward_pre_hook(_remember_cache, with_kwargs=True)
            module.register_forward_hook(_forget_cache)
    return model


def _remember_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The attention function is not given the cache; a LessCache reaches it through here."""
    from lesskv.cache import LessCache

    cache = kwargs.get("past_key_values")
    module.lesskv.cache = cache if isinstance(cache, LessCache) else None


def _forget_cache(module: nn.Module, args: tuple, output: object) -> None:
    """Hold the cache only during the call, so a finished generation's memory is freed."""
    module.lesskv.cache = None


def set_method(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
) -> None:
    """Switch every layer to ``full``, ``baseline``, ``baseline+`` (policy + pairs as large
    as a rank-``rank`` state) or ``less`` (policy + one kernel module per layer)."""
    if method not in METHODS:
        raise LessKVError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if method != "full" and policy is None:
        raise LessKVError(f"method {method!r} needs a policy (h2o or lambda) and a budget")
    modules = attention_modules(enable(model))
    if method == "less":
        if kernels is None:
            raise LessKVError("method 'less' needs trained kernels (--kernels DIR)")
        if len(kernels) != len(modules):
            raise LessKVError(
                f"kernels cover {len(kernels)} layers but the model has {len(modules)}"
            )
    for i, module in enumerate(modules):
        module.lesskv = LayerSetup(
            policy=None if method == "full" else policy,
            extra_tokens=extra_tokens(method, rank, module.head_dim),
            kernels=on_layer_device(kernels[i], module) if method == "less" else None,
        )


def on_layer_device(kernels: nn.Module, module: nn.Module) -> nn.Module:
    """Move one layer's kernels (in place) to where that attention layer computes, so a model
    split over devices (``device_map="auto"``) keeps each layer's LESS work on its device."""
    return kernels.to(next(module.parameters()).device)


def extra_tokens(method: str, rank: int, head_dim: int) -> int:
    """Pairs Baseline+ gets on top of the budget: as much memory as LESS's state."""
    return state_size_in_tokens(rank, head_dim) if method == "baseline+" else 0


@contextmanager
def using_method(model: PreTrainedModel, method: str, **options) -> Iterator[None]:
    """``set_method`` for the duration of a block, then back to full attention."""
    set_method(model, method, **options)
    try:
        yield
    finally:
        set_method(model, "full")


def less_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``(B, Hq, Tq, D)`` post-RoPE, key/value
    ``(B, Hkv, Tk, D)``; returns ``(B, Tq, Hq, D)``.

    The parallel form scores whole sequences; batches must be right-padded (as teacher-forced
    scoring naturally is), so that padding only ever follows the real tokens.
    """
    setup: LayerSetup = getattr(module, "lesskv", LayerSetup())
    if setup.observer is not None:
        setup.observer(module, query, key, value)
    scale = scaling if scaling is not None else module.head_dim**-0.5
    if setup.cache is not None:  # decoding with real eviction
        from lesskv.cache import attend

        layer = setup.cache.layers[module.layer_idx]
        return _heads_last(attend(layer, query, key, value, attention_mask, scale)), None
    policy = setup.policy
    q_len, k_len = query.shape[2], key.shape[2]
    slots = policy.slots(k_len, setup.extra_tokens) if policy is not None else None
    if slots is None or slots.total >= k_len:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if q_len != k_len:
        raise LessKVError(
            "lesskv's parallel form scores whole sequences; to decode with eviction pass "
            "past_key_values=LessCache(...)"
        )
    q = math.group_queries(query, key.shape[1])
    visible = _visible_keys(attention_mask, q_len, k_len, query.device)
    needs_logits = policy.uses_attention or setup.kernels is not None
    logits = None
    if needs_logits:
        logits = math.attention_logits(q, key, scale).masked_fill(~visible, math.NEG_INF)
    steps = policy.eviction_steps(logits, slots, k_len)
    keep = keep_mask_from_steps(steps).unsqueeze(2) & visible
    if setup.kernels is None:  # no lse needed: the fused kernel is faster than our softmax
        b, hkv, g = q.shape[:3]
        mask = keep.expand(b, hkv, g, -1, -1).reshape(b, hkv * g, q_len, k_len)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=g > 1
        )
        return out.transpose(1, 2).contiguous(), None
    out, lse = math.sparse_attention(logits, value, keep)
    phi_q, psi_k = setup.kernels.phi(q), setup.kernels.psi(key)
    num, den = math.lowrank_parallel(phi_q, psi_k, value, steps)
    out = math.combine(out, lse, num, den)
    return _heads_last(out), None


def _heads_last(out: torch.Tensor) -> torch.Tensor:
    """Grouped ``(B, Hkv, G, T, D)`` → transformers' ``(B, T, Hq, D)``."""
    b, hkv, g, t, d = out.shape
    return out.reshape(b, hkv * g, t, d).transpose(1, 2).contiguous()


def _visible_keys(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """Causal and padding visibility as a bool ``(B|1, 1, 1, Tq, Tk)`` grouped-layout mask."""
    if attention_mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return mask[None, None, None]
    if attention_mask.dtype != torch.bool:  # additive float mask
        attention_mask = attention_mask == 0
    return attention_mask.unsqueeze(2)
