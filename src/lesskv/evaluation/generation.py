"""Text generation through one cache object: full (transformers' default), baseline or LESS."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from lesskv.errors import LessKVError
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.modules import check_fits


@torch.no_grad()
def prefill_in_chunks(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: LessCache, chunk: int
) -> None:
    """Feed all but the last prompt token in chunks of ``chunk`` tokens.

    Memory stays O(budget + chunk) instead of O(prompt²) in attention. Unlike the reference
    prefill (full attention over the whole prompt, then one compression), each chunk attends
    over the kept pairs + LESS state + itself, and H2O scores come only from what was kept:
    closer to how decoding itself behaves, and a little lossier on the prompt.
    """
    if chunk < 1:
        raise LessKVError(f"--prefill-chunk must be >= 1, got {chunk}")
    cache.resolve_budget(input_ids.shape[1])  # a fraction of the whole prompt, not a chunk
    for start in range(0, input_ids.shape[1] - 1, chunk):
        piece = input_ids[:, start : min(start + chunk, input_ids.shape[1] - 1)]
        model(input_ids=piece, use_cache=True, **cache_argument(model, cache))


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    cache: LessCache | None = None,
    max_new_tokens: int = 64,
    prefill_chunk: int | None = None,
    stream: bool = False,
    **generate_options,
) -> str:
    """Generate a continuation of ``prompt``; ``cache=None`` uses the full dynamic cache."""
    if not prompt.strip():
        raise LessKVError("the prompt is empty")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    check_fits(
        model,
        input_ids.shape[1] + max_new_tokens,
        f"prompt ({input_ids.shape[1]} tokens) + {max_new_tokens} new tokens",
    )
    if prefill_chunk is not None and cache is not None:
        prefill_in_chunks(model, input_ids, cache, prefill_chunk)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **cache_argument(model, cache),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **generate_options,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
