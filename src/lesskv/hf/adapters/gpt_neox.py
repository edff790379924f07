"""GPT-NeoX (Pythia): its attention already calls transformers' attention interface with the
post-RoPE query and key (partial rotary, ``rotary_pct``, applied by its own code) and
updates the cache with its ``layer_idx``, so no forward is replaced. It only names its head
size ``head_size`` and has no KV-head groups (multi-head): the adapter adds the attributes
lesskv reads off standard modules."""

from __future__ import annotations

from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

from lesskv.hf.adapters.base import Adapter


def _prepare(module: GPTNeoXAttention) -> None:
    """Multi-head: every query head has its own KV head."""
    module.head_dim = module.head_size
    module.num_key_value_groups = 1


ADAPTERS = {GPTNeoXAttention: Adapter(_prepare)}
