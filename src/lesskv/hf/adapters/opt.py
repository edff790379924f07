"""OPT: its attention calls transformers' attention interface, but multiplies the query
projection by ``1/sqrt(D)`` itself and passes ``scaling=1.0``. lesskv reads a layer's scale
off the module (``scaling``) wherever it handles raw queries outside the attention call
(training's recorded queries and targets, the analyses), so a pre-scaled query would be
scaled twice there, and LESS kernels would learn from queries unlike every other family's.
The adapter's forward is OPT's own with the scale passed to the attention function instead
(the same logits up to rounding); it still calls the implementation the config names, so the
model switches to lesskv's like any standard model. Positions are learned absolute embeddings
added before the layers: nothing for attention to do.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention, eager_attention_forward

from lesskv.hf.adapters.base import Adapter
from lesskv.hf.compat import update_cache


def _forward(
    self: OPTAttention,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    output_attentions: bool = False,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OPT's attention, the query left unscaled. transformers >= 5.24 passes the cache as
    ``cache``, earlier releases as ``past_key_values``: both are taken."""
    cache = cache if cache is not None else past_key_values
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = update_cache(cache, key, value, self.layer_idx, kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    out, weights = attend(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.dropout if self.training else 0.0,
        scaling=self.scaling,
        **kwargs,
    )
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.out_proj(out), weights


def _prepare(module: OPTAttention) -> None:
    """Multi-head: every query head has its own KV head."""
    module.num_key_value_groups = 1


ADAPTERS = {OPTAttention: Adapter(_prepare, _forward)}
