"""Tiny random-weight decoders built in code, one per attention layout we support."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(
    vocab_size=97,
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

TINY_CONFIGS = {
    "llama-mha": lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON),
    "llama-gqa": lambda: LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **COMMON),
    "qwen2": lambda: Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON),
    "mistral": lambda: MistralConfig(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=None, **COMMON
    ),
}


def make_tiny_model(kind: str = "llama-gqa", seed: int = 0, attn: str = "sdpa", **overrides):
    """A float32 random model in eval mode; same seed gives the same weights."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    for name, value in overrides.items():
        setattr(config, name, value)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random models must not stop early
    return model.float().eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return make_tiny_model(request.param)
