"""Speed and memory of full attention vs a sparse policy vs LESS, measured on real decoding.

LESS's practical claim is a throughput one: a cache of ``budget`` pairs plus a rank-R state
per KV head is far smaller than a full cache, so more sequences fit in memory and each decoding
step reads less. :func:`run_benchmark` measures what this implementation really does on the
current device (prefill time, per-step decode latency, tokens/s, the bytes the cache holds);
:func:`max_batch_for_memory` is the paper's arithmetic of how many sequences fit a fixed
memory budget. Decoding is a hand-written greedy loop, not ``generate()``, so each step is
timed on its own with nothing else in between.

The numbers are printed, never asserted: timings depend on the machine and its load.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lesskv.core.decoding import compiled_layer_step
from lesskv.core.policies import Policy
from lesskv.data import token_windows
from lesskv.errors import LessKVError
from lesskv.hf import attention
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import PLAIN_STEPS, StepOptions, get_method, make_cache
from lesskv.hf.modules import (
    attention_modules,
    check_fits,
    keeps_native_windows,
    kv_heads,
    sliding_windows,
)

BENCH_METHODS = ("full", "baseline", "less")
_STOCK_ATTENTION = "sdpa"  # what "full" runs when the model was already switched to lesskv's
_MAX_TEXT_REPEATS = 32  # a prompt text repeated more than 2**5 times is not worth timing


@dataclass
class BenchRow:
    """One grid point (method, context, batch).

    ``decode_ms_per_token`` is the median latency of one decoding step, which produces one new
    token for every sequence of the batch; ``decode_tokens_per_s`` counts all of them.
    ``peak_rss_bytes`` is the process's high-water mark so far (it never goes down, so a row
    only bounds the rows before it); ``rss_bytes`` is the resident memory right after the grid
    point's decoding, with every method's cache still alive. ``step_ms`` is each decoding
    step's time, in the rounds all methods of the grid point shared (:func:`paired_ratio`).
    ``compile_s`` is the time ``torch.compile`` spent compiling the method's decoding step,
    left out of every step time (the first grid point's includes the warm-up's).
    ``peak_device_bytes`` is the accelerator's peak allocation during the grid point (``None``
    on CPU). With ``shared_prefill`` one sequence
    was prefilled (``prefill_s`` is its time) and its cache repeated across the batch.
    """

    method: str
    policy: str
    context: int
    batch: int
    budget_tokens: int
    new_tokens: int
    prefill_s: float
    decode_ms_per_token: float
    decode_ms_p90: float
    decode_tokens_per_s: float
    cache_bytes: int
    kv_bytes: int
    state_bytes: int
    peak_rss_bytes: int | None
    rss_bytes: int | None
    peak_device_bytes: int | None
    device: str
    shared_prefill: bool = False
    step_ms: list[float] = field(default_factory=list)
    compile_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_contexts(model: PreTrainedModel, contexts: Sequence[int], new_tokens: int) -> None:
    """Refuse, before any work, a context that cannot hold its prompt plus the new tokens."""
    for context in contexts:
        if context < 2:
            raise LessKVError(f"context {context} is too short: use at least 2 tokens")
        check_fits(model, context + new_tokens, f"context {context} + {new_tokens} new tokens")


def prompt_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], context: int, batch: int
) -> torch.Tensor:
    """``(batch, context)`` token ids cut from real text; a text too short for one window is
    repeated, and too few windows are reused, so every grid point gets exactly its shape."""
    repeated = list(texts)
    for _ in range(_MAX_TEXT_REPEATS.bit_length()):
        try:
            windows = token_windows(tokenizer, repeated, context, max_windows=batch)
            break
        except LessKVError as err:
            if "not enough for one window" not in str(err):
                raise
            repeated = repeated * 2
    else:
        raise LessKVError(
            f"the prompt text is too short to build a {context}-token prompt even repeated "
            f"{_MAX_TEXT_REPEATS} times; give more text (--data)"
        )
    return windows[torch.arange(batch) % windows.shape[0]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss() -> int | None:
    """Resident set size now, from /proc (Linux only)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss() -> int:
    """The process's peak RSS so far; ``ru_maxrss`` is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cache_memory(cache: DynamicCache | LessCache) -> dict[str, int]:
    """``{'kv', 'state'}`` bytes counted from the tensors the cache holds right now."""
    if isinstance(cache, LessCache):
        return cache.memory_bytes()
    kv = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                kv += tensor.nbytes
    return {"kv": kv, "state": 0}


def _make_cache(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None,
    kernels: LessKernels | None,
    stock_attention: str,
    step: StepOptions,
) -> DynamicCache | LessCache:
    """A fresh cache; ``full`` also puts the model back on its stock attention, so it is timed
    exactly as transformers runs it (a LessCache switches the model to lesskv's attention)."""
    if not get_method(method).sparse:
        if model.config._attn_implementation != stock_attention:
            model.set_attn_implementation(stock_attention)
        return DynamicCache(config=model.config)
    return make_cache(model, method, policy, kernels, step=step)


@dataclass
class _Decoding:
    """One method's generation in progress at a grid point: its own cache and last token."""

    method: str
    cache: DynamicCache | LessCache
    token: torch.Tensor
    prefill_s: float
    steps: list[float]
    compile_s: float = 0.0


@torch.no_grad()
def _prefill(
    model: PreTrainedModel,
    ids: torch.Tensor,
    method: str,
    policy: Policy | None,
    kernels: LessKernels | None,
    stock_attention: str,
    batch: int,
    step: StepOptions,
) -> _Decoding:
    """Prefill ``ids`` into a fresh cache, repeated up to ``batch`` sequences if ``ids``
    holds fewer (as ``generate()`` does for ``num_return_sequences``)."""
    device = ids.device
    cache = _make_cache(model, method, policy, kernels, stock_attention, step)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    if ids.shape[0] < batch:
        cache.batch_repeat_interleave(batch)
        token = token.repeat_interleave(batch, dim=0)
    return _Decoding(method, cache, token, prefill_s, [])


@torch.no_grad()
def _step(model: PreTrainedModel, run: _Decoding, stock_attention: str) -> None:
    """One greedy step of ``run``, timed alone (the attention switch happens before, and
    compilation is counted apart)."""
    wanted = attention.ATTN_NAME if get_method(run.method).sparse else stock_attention
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)
    device = run.token.device
    compiling = compiled_layer_step.compile_seconds
    start = time.perf_counter()
    out = model(
        input_ids=run.token, use_cache=True, logits_to_keep=1, **cache_argument(model, run.cache)
    )
    run.token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    compiling = compiled_layer_step.compile_seconds - compiling
    run.compile_s += compiling
    run.steps.append(time.perf_counter() - start - compiling)


def _interleaved(
    model: PreTrainedModel,
    ids: torch.Tensor,
    methods: Sequence[str],
    policy: Policy | None,
    kernels: LessKernels | None,
    new_tokens: int,
    stock_attention: str,
    batch: int,
    step: StepOptions,
) -> list[_Decoding]:
    """Every method prefilled on the same ``ids`` (each its own cache), then decoded round
    robin, one step each per round, the order rotating every round: a burst of load on the
    machine hits all methods alike, so their per-round ratios hold from run to run."""
    if ids.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ids.device)
    runs = [_prefill(model, ids, m, policy, kernels, stock_attention, batch, step) for m in methods]
    for round_ in range(new_tokens):
        shift = round_ % len(runs)
        for run in runs[shift:] + runs[:shift]:
            _step(model, run, stock_attention)
    return runs


def _row(
    run: _Decoding,
    policy: Policy | None,
    context: int,
    batch: int,
    shared: bool,
    device: torch.device,
) -> BenchRow:
    memory = cache_memory(run.cache)
    full = not get_method(run.method).sparse
    return BenchRow(
        method=run.method,
        policy="" if full or policy is None else f"{policy.name}-{policy.budget}",
        context=context,
        batch=batch,
        budget_tokens=context if full else run.cache.layers[0].capacity,
        new_tokens=len(run.steps),
        prefill_s=run.prefill_s,
        decode_ms_per_token=float(np.median(run.steps)) * 1e3,
        decode_ms_p90=float(np.percentile(run.steps, 90)) * 1e3,
        decode_tokens_per_s=batch * len(run.steps) / sum(run.steps),
        cache_bytes=memory["kv"] + memory["state"],
        kv_bytes=memory["kv"],
        state_bytes=memory["state"],
        peak_rss_bytes=_peak_rss(),
        rss_bytes=_current_rss(),
        peak_device_bytes=(
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        device=str(device),
        shared_prefill=shared,
        step_ms=[t * 1e3 for t in run.steps],
        compile_s=run.compile_s,
    )


def paired_ratio(row: BenchRow, reference: BenchRow) -> tuple[float, float, float]:
    """``row``'s decode step time over ``reference``'s, round by round (both decoded in the
    same rounds): the median ratio and its 25th-75th percentile spread."""
    ratios = np.array(row.step_ms) / np.array(reference.step_ms)
    return tuple(float(np.percentile(ratios, q)) for q in (50, 25, 75))


def _release(model: PreTrainedModel, device: torch.device) -> None:
    """Free the finished run's cache, so the next grid point starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_grid(
    model: PreTrainedModel,
    contexts: Sequence[int],
    batch_sizes: Sequence[int],
    methods: list[str],
    policy: Policy | None,
    kernels: LessKernels | None,
    new_tokens: int,
) -> None:
    """Refuse a request that cannot run, before minutes of timing."""
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if not methods or unknown:
        raise LessKVError(
            f"unknown benchmark method(s) {unknown or methods}: choose from "
            f"{', '.join(BENCH_METHODS)}"
        )
    if new_tokens < 1:
        raise LessKVError(f"new_tokens must be >= 1, got {new_tokens}")
    if not contexts or not batch_sizes:
        raise LessKVError("give at least one context and one batch size")
    if any(b < 1 for b in batch_sizes):
        raise LessKVError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    check_contexts(model, contexts, new_tokens)
    if any(m != "full" for m in methods):
        if policy is None:
            raise LessKVError("methods baseline and less need a policy and a budget")
        for context in contexts:
            policy.slots(context)  # a bad budget fails now, not after minutes of timing
    if "less" in methods and kernels is None:
        raise LessKVError("method 'less' needs trained kernels (--kernels DIR)")


def run_benchmark(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    contexts: Sequence[int],
    batch_sizes: Sequence[int],
    methods: Sequence[str],
    policy: Policy | None,
    kernels: LessKernels | None,
    new_tokens: int = 64,
    prompt_texts: list[str],
    progress: bool = True,
    warmup: bool = True,
    shared_prefill: bool = False,
    step: StepOptions = PLAIN_STEPS,
) -> list[BenchRow]:
    """Time every (context, batch) point, its methods interleaved step by step; one
    :class:`BenchRow` per (context, batch, method), in that order.

    ``full`` is transformers' ``DynamicCache`` on the model's stock attention, ``baseline`` a
    :class:`LessCache` with ``policy`` (real eviction), ``less`` the same with ``kernels``.
    Prompts are real text, exactly ``context`` tokens. ``warmup`` first runs each method once
    on one prompt so one-time costs (thread pools, allocator, kernel selection) do not
    land on the first grid point (it uses the smallest context, which the policy is known to
    accept). Peak RSS is process-wide: see :class:`BenchRow`. ``shared_prefill`` prefills one
    prompt per grid point and repeats its cache across the batch: decoding costs the same
    whatever the prompts hold, and it makes long-context batches affordable where prefill is
    slow (H2O's scores need the whole attention matrix, which CPU prefill pays dearly).
    ``step``: how the caches run their decoding steps (compiled, CUDA graphs).
    """
    methods = list(methods)
    _check_grid(model, contexts, batch_sizes, methods, policy, kernels, new_tokens)
    stock = model.config._attn_implementation
    if stock == attention.ATTN_NAME:
        stock = _STOCK_ATTENTION
    original = model.config._attn_implementation
    device = next(model.parameters()).device
    grid = [(c, b) for c in contexts for b in batch_sizes]
    rows: list[BenchRow] = []
    compiled_in_warmup: dict[str, float] = {}
    try:
        if warmup:
            ids = prompt_batch(tokenizer, prompt_texts, min(contexts), 1).to(device)
            warm = _interleaved(model, ids, methods, policy, kernels, 2, stock, 1, step)
            compiled_in_warmup = {run.method: run.compile_s for run in warm}
        bar = tqdm(grid, desc="bench", unit="point", disable=not progress)
        for context, batch in bar:
            bar.set_postfix_str(f"ctx={context} batch={batch}")
            prompts = 1 if shared_prefill else batch
            ids = prompt_batch(tokenizer, prompt_texts, context, prompts).to(device)
            runs = _interleaved(
                model, ids, methods, policy, kernels, new_tokens, stock, batch, step
            )
            for run in runs:
                run.compile_s += compiled_in_warmup.pop(run.method, 0.0)
            shared = prompts < batch
            rows += [_row(run, policy, context, batch, shared, device) for run in runs]
            del ids, runs
            _release(model, device)
    finally:
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
    return rows


def max_batch_for_memory(
    model: PreTrainedModel,
    context: int,
    kv_budget_bytes: int,
    method: str,
    policy: Policy | None,
    rank: int | None,
    *,
    new_tokens: int = 0,
) -> dict[str, object]:
    """The largest batch whose cache fits ``kv_budget_bytes``: the paper's throughput argument.

    Per sequence, ``full`` holds ``context + new_tokens`` tokens of K/V in every layer
    (``2 * kv_heads * head_dim * dtype bytes`` each); ``baseline`` holds the policy's budget;
    ``less`` holds the budget plus an fp32 state of ``R * (D + 1)`` numbers per KV head. In a
    model mixing local and global layers (Gemma 3) the local layers hold at most their window
    and no state, whatever the method (``tokens_held`` is then the global layers'). This
    counts what :meth:`LessCache.memory_bytes` counts; the per-slot bookkeeping (position,
    score, valid flag) and the model's own weights and activations are left out.
    """
    if method not in BENCH_METHODS:
        raise LessKVError(f"unknown method {method!r}: choose from {', '.join(BENCH_METHODS)}")
    head_dim, heads = attention_modules(model)[0].head_dim, kv_heads(model)
    windows = sliding_windows(model)
    local = [w for w in windows if w is not None] if keeps_native_windows(windows) else []
    layers = len(windows) - len(local)  # where the method (policy, state) runs
    pair = 2 * heads * head_dim * next(model.parameters()).element_size()
    chosen, state = get_method(method), 0
    # A local layer of transformers' own cache (full) keeps its window less the token being
    # computed; a LessCache layer keeps the whole window.
    kept = [w if chosen.sparse else w - 1 for w in local]
    local_bytes = sum(min(k, context + new_tokens) for k in kept) * pair
    if not chosen.sparse:
        tokens = context + new_tokens
    else:
        if policy is None:
            raise LessKVError(f"method {method!r} needs a policy and a budget")
        tokens = chosen.kept_tokens(policy, context, head_dim, rank or 0)
        if chosen.needs_kernels and rank is None:
            raise LessKVError(f"method {method!r} needs the kernels' rank")
        state = layers * heads * chosen.state_bytes(rank or 0, head_dim)
    per_sequence = tokens * layers * pair + local_bytes + state
    return {
        "method": method,
        "context": context,
        "tokens_held": tokens,
        "bytes_per_sequence": per_sequence,
        "kv_budget_bytes": kv_budget_bytes,
        "max_batch": kv_budget_bytes // per_sequence,
    }
