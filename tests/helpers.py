"""What the tests share: tiny random-weight decoders built in code (one per attention layout
lesskv supports), tiny kernels, prompts and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lesskv.core.kernels import KernelShape, LayerKernels
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.modules import attention_modules

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


def tiny_kernels(model, seed=0):
    torch.manual_seed(seed)
    kernels = []
    for module in attention_modules(model):
        groups = module.num_key_value_groups
        kv_heads = model.config.num_attention_heads // groups
        shape = KernelShape(kv_heads * groups, kv_heads, module.head_dim, rank=4, hidden=16)
        layer = LayerKernels(shape).eval()
        with torch.no_grad():  # make the low-rank part and its decay matter, as after training
            layer.psi_scale.fill_(3.0)
            layer.decay.copy_(torch.linspace(0.05, 0.2, kv_heads))  # half-lives 17 to 277 tokens
        kernels.append(layer)
    return kernels


BUDGET = 8


def kernel_set(model, policy="h2o"):
    meta = KernelMeta.for_model(model, "tiny", policy=policy, budget=str(BUDGET), rank=4, hidden=16)
    return LessKernels(meta, tiny_kernels(model)).eval()


def left_padded(rows):
    """One batch from ``(1, T_i)`` rows, left-padded with 0 to the longest, and its mask."""
    longest = max(r.shape[1] for r in rows)

    def pad(t):
        return torch.nn.functional.pad(t, (longest - t.shape[1], 0))

    return torch.cat([pad(r) for r in rows]), torch.cat([pad(torch.ones_like(r)) for r in rows])


def prompt(length, batch=1, seed=0):
    torch.manual_seed(seed)
    return torch.randint(1, 97, (batch, length))


WORDS = ["<unk>", "<eos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer whose ids fit the tiny models' 97-token vocabulary; it has
    an eos token but no pad token, like many real tokenizers."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_tiny(directory: Path, kind: str = "llama-gqa") -> torch.nn.Module:
    model = make_tiny_model(kind)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


def decode_steps(model, cache, ids):
    """Logits of feeding ``ids`` one token per call through ``cache`` (the recurrent form)."""
    from lesskv.hf.compat import cache_argument

    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache)).logits
                for t in range(ids.shape[1])
            ],
            1,
        )
