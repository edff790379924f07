"""What lesskv reads off a Hugging Face model: its attention modules, an architecture
fingerprint for kernel checkpoints, and its context length (one check for every caller)."""

from __future__ import annotations

import hashlib
import json

from torch import nn
from transformers import PreTrainedModel

from lesskv.errors import LessKVError
from lesskv.hf import adapters


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention modules in layer order (those transformers numbers with layer_idx);
    modules of a style lesskv drives through an adapter get it here."""
    adapters.prepare(model)
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    found = [m for m in found if hasattr(m, "num_key_value_groups")]
    if not found:
        raise LessKVError(
            f"{type(model).__name__} has no attention modules lesskv can drive "
            "(it needs transformers' standard attention interface, or an adapter: Falcon, "
            "GPT-NeoX, OPT, GPT-2)"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def sliding_windows(model: PreTrainedModel) -> list[int | None]:
    """Per attention layer, the sliding window it attends within (None: all past tokens)."""
    return [
        module.sliding_window
        if hasattr(module, "sliding_window")
        else getattr(model.config, "sliding_window", None)
        for module in attention_modules(model)
    ]


def keeps_native_windows(windows: list[int | None]) -> bool:
    """Whether the sliding layers keep their own window, no policy: in models that mix local
    and global layers (Gemma 2/3, Qwen2 with ``max_window_layers``) the local windows are
    small and already bound memory, and the policy (and LESS) runs on the global layers.
    Where every layer slides (Mistral, Starcoder2: a config-wide window, often 4096) the
    policy runs in every layer, inside its window."""
    return None in windows and any(w is not None for w in windows)


def policy_layers(model: PreTrainedModel) -> list[int]:
    """The attention layers where lesskv's policy (and LESS's state) runs: every layer but the
    local ones of a model that mixes local and global layers (:func:`keeps_native_windows`)."""
    windows = sliding_windows(model)
    native = keeps_native_windows(windows)
    return [i for i, window in enumerate(windows) if window is None or not native]


def kv_heads(model: PreTrainedModel) -> int:
    """KV heads per layer, from the attention modules (configs name them differently)."""
    return model.config.num_attention_heads // attention_modules(model)[0].num_key_value_groups


def attention_scale(module: nn.Module) -> float:
    """The logit scale the module's own attention uses (``1/sqrt(D)`` unless it says)."""
    return getattr(module, "scaling", module.head_dim**-0.5)


def on_layer_device(kernels: nn.Module, module: nn.Module) -> nn.Module:
    """Move one layer's kernels (in place) to where that attention layer computes, so a model
    split over devices (``device_map="auto"``) keeps each layer's LESS work on its device."""
    return kernels.to(next(module.parameters()).device)


def max_context(model: PreTrainedModel) -> int:
    """The longest sequence the model was built for (its position-embedding table)."""
    length = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(length, int):
        raise LessKVError(
            f"model {model.config.model_type!r} does not state max_position_embeddings; "
            "pass an explicit context length"
        )
    return length


def model_fingerprint(model: PreTrainedModel) -> str:
    """A 16-hex-digit hash of the fields that shape attention, so kernels trained for one
    architecture are refused by another (weights are deliberately not hashed: too slow)."""
    config = model.config
    heads = config.num_attention_heads
    fields = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "rope_parameters": getattr(config, "rope_parameters", None),
    }
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_fits(model: PreTrainedModel, tokens: int, what: str) -> None:
    """A clear error when ``tokens`` positions (``what`` they are) exceed the model's context."""
    check_within(max_context(model), tokens, what)


def check_within(context: int, tokens: int, what: str) -> None:
    """:func:`check_fits` for a context length already known (a cache layer's)."""
    if tokens > context:
        raise LessKVError(
            f"{what} ({tokens} tokens) exceed the model's context of {context} by "
            f"{tokens - context} tokens"
        )
