"""GPT-2: its attention already calls transformers' attention interface (learned absolute
positions, so no rotary) and updates the cache with its ``layer_idx``, so no forward is
replaced. Its ``scaling`` already folds in ``scale_attn_by_inverse_layer_idx`` and is passed
to the attention function. ``reorder_and_upcast_attn`` only changes transformers' eager path
(float32 logits); like sdpa, lesskv's attention computes its own way, which is a rounding
difference, not another model. Cross-attention (``add_cross_attention``) is refused: its keys
come from an encoder and would go into the decoder's LessCache under the same layer index.
"""

from __future__ import annotations

from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from lesskv.errors import LessKVError
from lesskv.hf.adapters.base import Adapter


def _prepare(module: GPT2Attention) -> None:
    """Multi-head: every query head has its own KV head."""
    if module.is_cross_attention:
        raise LessKVError(
            "this GPT-2 has cross-attention layers (add_cross_attention), which lesskv does "
            "not support: their encoder keys would share the decoder's cache layers"
        )
    module.num_key_value_groups = 1


ADAPTERS = {GPT2Attention: Adapter(_prepare)}
