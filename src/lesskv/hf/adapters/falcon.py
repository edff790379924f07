"""Falcon: its attention does not call transformers' attention interface, so the adapter runs
Falcon's own fused projection and RoPE, then lesskv's attention, then its output projection.

Supported: rotary positions, multi-query (falcon-7b), multi-head and the new decoder
architecture (grouped KV heads, falcon-40b/180b). ALiBi positions are refused.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from lesskv.errors import LessKVError
from lesskv.hf.adapters.base import ATTN_NAME, Adapter


def _kv_heads(module: FalconAttention) -> int:
    if module.new_decoder_architecture:
        return module.num_kv_heads
    return 1 if module.multi_query else module.num_heads


def _heads(
    module: FalconAttention, fused: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV ``(B, T, ...)`` → query ``(B, H, T, D)`` and the real KV heads
    ``(B, Hkv, T, D)`` (Falcon's own code broadcasts them to every query head)."""
    b, t, _ = fused.shape
    d, heads = module.head_dim, module.num_heads
    if module.new_decoder_architecture:  # per KV head: its G queries, then key, then value
        qkv = fused.view(b, t, module.num_kv_heads, heads // module.num_kv_heads + 2, d)
        query, key, value = qkv[..., :-2, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]
    elif module.multi_query:
        qkv = fused.view(b, t, heads + 2, d)
        query, key, value = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    else:
        qkv = fused.view(b, t, heads, 3, d)
        query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def _forward(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Falcon's attention with lesskv's attention function. transformers <= 5.24 also passes
    ``alibi`` (always None here: ALiBi models are refused), 5.25 no longer does; ``kwargs``
    takes it either way."""
    query, key, value = _heads(self, self.query_key_value(hidden_states))
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS.get(ATTN_NAME) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    out, _ = attend(self, query, key, value, attention_mask, scaling=self.inv_norm_factor)
    return self.dense(out.reshape(*hidden_states.shape[:2], -1)), None


def _prepare(module: FalconAttention) -> None:
    """Refuse ALiBi (lesskv's attention adds no position bias); the cache holds the real KV
    heads, which the query heads share in groups."""
    if module.config.alibi:
        raise LessKVError(
            "this Falcon uses ALiBi positions, which lesskv does not support (Falcon with "
            "rotary positions is supported)"
        )
    module.num_key_value_groups = module.num_heads // _kv_heads(module)


ADAPTERS = {FalconAttention: Adapter(_prepare, _forward, keeps_implementation=True)}
