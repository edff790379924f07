"""What the tests share: tiny random-weight decoders built in code (one per attention layout
lesskv supports), tiny kernels, prompts, tiny tokenizers (with and without BOS) and the
per-layer training tests' tiny run."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lesskv.core.kernels import KernelShape, LayerKernels
from lesskv.core.policies import make_policy
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.modules import attention_modules
from lesskv.training.per_layer import TrainConfig

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
    # o_proj maps heads x head_dim to a hidden size that differs from it: a wider one (64 ->
    # 96, as Gemma 3 1B's 1024 -> 1152) and a narrower one (128 -> 96, as Qwen3-0.6B's 2048 ->
    # 1024 and Gemma 3 270M's 1024 -> 640)
    "llama-wide": lambda: LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, **COMMON
    ),
    "llama-narrow": lambda: LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, **COMMON
    ),
    # Gemma 3 270M in small: local (sliding) layers around a global one, 4 query heads on ONE
    # KV head of dimension 256 (4 x 256 = 1024 -> hidden 96)
    "gemma3": lambda: Gemma3TextConfig(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **{**COMMON, "num_hidden_layers": 3},
    ),
}
# Layouts in which every layer runs the policy (the ``tiny_model`` fixture's); "gemma3" mixes in
# local layers that keep their own window.
UNIFORM = sorted(kind for kind in TINY_CONFIGS if kind != "gemma3")
# Layouts whose o_proj output (the hidden size) is not heads x head_dim, and the mixed
# local/global one: what per-layer training, fine-tuning and the analyses must handle.
SHAPES = ["llama-gqa", "llama-wide", "llama-narrow", "gemma3"]


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


WORDS = ["<unk>", "<eos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "<bos>"]
BOS = WORDS.index("<bos>")


def tiny_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer whose ids fit the tiny models' 97-token vocabulary; it has
    an eos token but no pad token, like many real tokenizers. ``adds_bos``: it starts every
    text with ``<bos>``, as Llama's, Gemma's and Mistral's tokenizers do (through the
    post-processor, which leaves ``add_bos_token`` False)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<bos>" if adds_bos else None,
    )


def save_tiny(directory: Path, kind: str = "llama-gqa", adds_bos: bool = False) -> torch.nn.Module:
    model = make_tiny_model(kind)
    model.save_pretrained(directory)
    tiny_tokenizer(adds_bos).save_pretrained(directory)
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


TRAINING_T = 64  # tokens in each window of the per-layer training tests


def training_setup(epochs=12, policy="h2o", kind="llama-gqa", **overrides):
    """The per-layer training tests' run: a tiny model, 24 random windows of TRAINING_T
    tokens, ``policy`` at a budget of 8 and a config that trains in seconds."""
    model = make_tiny_model(kind)
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (24, TRAINING_T))
    config = TrainConfig(
        model="tiny",
        policy=policy,
        budget="8",
        **{
            "seq_lens": [TRAINING_T],
            "sequences": 24,
            "epochs": epochs,
            "rank": 4,
            "hidden": 32,
            "lr": 1e-2,
            **overrides,
        },
    )
    return model, windows, make_policy(policy, 8), config
