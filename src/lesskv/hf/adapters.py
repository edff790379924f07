"""Attention modules that do not call transformers' attention interface, driven through one small
adapter per attention style: the module's own projections and rotary embedding, then the
attention function registered for the model (lesskv's, once :func:`lesskv.enable` ran), then
the module's own output projection. Nothing of the model's code is copied beyond the head
layout; the K/V cache is the one the model passes (a LessCache evicts for real).

Supported this way: Falcon with rotary positions, multi-query (falcon-7b) and the new decoder
architecture (grouped KV heads, falcon-40b/180b). Falcon with ALiBi positions is refused.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from lesskv.errors import LessKVError

ATTN_NAME = "less"  # the name lesskv's attention is registered under (lesskv.hf.attention)


def _falcon_kv_heads(module: FalconAttention) -> int:
    if module.new_decoder_architecture:
        return module.num_kv_heads
    return 1 if module.multi_query else module.num_heads


def _falcon_heads(
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


def _falcon_forward(
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
    query, key, value = _falcon_heads(self, self.query_key_value(hidden_states))
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS.get(ATTN_NAME) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    out, _ = attend(self, query, key, value, attention_mask, scaling=self.inv_norm_factor)
    return self.dense(out.reshape(*hidden_states.shape[:2], -1)), None


def _falcon_check(module: FalconAttention) -> None:
    if module.config.alibi:
        raise LessKVError(
            "this Falcon uses ALiBi positions, which lesskv does not support (Falcon with "
            "rotary positions is supported)"
        )


# Module type -> (forward that routes through the attention interface, check of its config,
# its real KV heads).
ADAPTERS: dict[
    type[nn.Module], tuple[Callable, Callable[[nn.Module], None], Callable[[nn.Module], int]]
] = {
    FalconAttention: (_falcon_forward, _falcon_check, _falcon_kv_heads),
}


def prepare(model: PreTrainedModel) -> None:
    """Give every attention module of an adapted style its adapter (once): the forward above
    and the attributes lesskv reads off standard modules (``num_key_value_groups``)."""
    for module in model.modules():
        adapter = ADAPTERS.get(type(module))
        if adapter is None or getattr(module, "lesskv_adapter", False):
            continue
        forward, check, kv_heads = adapter
        check(module)
        module.num_key_value_groups = module.num_heads // kv_heads(module)
        module.forward = types.MethodType(forward, module)
        module.lesskv_adapter = True


def is_adapted(model: PreTrainedModel) -> bool:
    """Whether ``model`` runs lesskv's attention through adapters (its config then keeps its
    own attention implementation: such models cannot switch it)."""
    return any(getattr(m, "lesskv_adapter", False) for m in model.modules())
