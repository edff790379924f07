"""Decode speed and GPU memory at Llama-3.1-8B's shapes: full vs baseline (H2O 10%) vs LESS.

A random-weight ``LlamaForCausalLM`` with the real Llama-3.1-8B configuration (hidden 4096,
32 layers, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256, llama3 RoPE scaling,
bf16) is built directly on the GPU: no download, no checkpoint. LESS runs with random kernels
of the right shape (rank 8), which cost what trained ones cost. For every context and batch
size a random prompt is prefilled (one sequence; its cache is then repeated across the batch,
which changes no decoding cost), a few untimed warm-up steps absorb compilation and graph
capture, and ``--steps`` greedy steps are timed one by one with CUDA synchronisation. Rows:

* ``eager``: ``full`` is transformers' ``DynamicCache``; ``baseline``/``less`` a ``LessCache``
  (its per-layer decoding step compiled unless ``LESSKV_COMPILE=0``);
* ``graphs``: ``full`` is a ``StaticCache`` with the forward under
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), transformers' standard recipe;
  ``baseline``/``less`` a ``LessCache(..., cuda_graphs=True)``.

Each row's median step time is compared with the weight-read bound: the bytes of weights one
step reads (all but the input embedding, of which a step gathers one row per sequence) over a
measured device-to-device copy bandwidth. Then one teacher-forced scoring forward at the
longest context, as ``lesskv eval ppl`` runs it (fp32 logits and NLL included), for ``full``
and ``less``. Points whose memory cannot fit are skipped by estimate (full attention at batch
32 x 32k holds 128 GiB of K/V), and out-of-memory errors are caught per point. A time guard
stops starting new work at ``--time-limit`` (a running prefill stops at its next layer).

    PYTHONPATH=src python docs/gpu_bench.py --json gpu_bench.json        # ~7 min on an H200
    python docs/gpu_bench.py --tiny --contexts 64 --batch-sizes 1,2 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
    StaticCache,
)

from lesskv.core.policies import Policy, make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.perplexity import window_nll
from lesskv.hf.attention import enable
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import using_method

METHODS = ("full", "baseline", "less")
MODES = ("eager", "graphs")
POLICY = "h2o"
WARMUP_STEPS = 4  # compile, then record, then replay: CUDA graph trees need three calls
TF_METHODS = ("full", "less")
TF_RESERVE_S = 180.0  # kept for the teacher-forced forwards, which run last: at 32k, H2O's
# row loop runs ~29k rows per layer on the GPU (not yet measured there)
FIRST_COMPILE_S = 120.0  # a guess for compiling the whole forward, before one was measured
MEMORY_HEADROOM = 0.95  # of the GPU's memory, for the estimate that skips a point
COPY_BYTES = {"cuda": 2 * 2**30, "cpu": 64 * 2**20}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
DECODE_COLUMNS = {
    "method": "method",
    "mode": "mode",
    "context": "context",
    "batch": "batch",
    "kept_tokens": "kept",
    "status": "status",
    "prefill_s": "prefill s",
    "warmup_s": "warm-up s",
    "ms_per_step": "ms/step",
    "tokens_per_s": "tokens/s",
    "x_weight_bound": "x bound",
    "prefill_peak_gib": "prefill GiB",
    "decode_peak_gib": "peak GiB",
}
TF_COLUMNS = {
    "method": "method",
    "context": "context",
    "status": "status",
    "seconds": "seconds",
    "peak_gib": "peak GiB",
}


class OutOfTime(Exception):
    """The time limit passed while a point was running."""


def llama31_8b_config() -> LlamaConfig:
    """Llama-3.1-8B's architecture (its config.json's fields that shape the computation)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=False,
    )


def tiny_config() -> LlamaConfig:
    """The same layout, a few thousand times smaller: a CPU smoke run in seconds."""
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 512}
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )


def build_model(config: LlamaConfig, device: torch.device) -> PreTrainedModel:
    """A bf16 random-weight model allocated and initialised on ``device`` directly."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def random_kernels(model: PreTrainedModel, policy: Policy) -> LessKernels:
    """LESS kernels for every layer of ``model``, randomly initialised, on its device."""
    meta = KernelMeta.for_model(model, "random", policy=policy.name, budget=str(policy.budget))
    return LessKernels(meta).to(model.device).eval()


class Clock:
    """Seconds since the start, against a limit; ``reserve`` keeps time for later work."""

    def __init__(self, limit_s: float) -> None:
        self.start, self.limit_s = time.perf_counter(), limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, reserve: float = 0.0) -> float:
        return self.limit_s - reserve - self.elapsed()

    def check(self, reserve: float = 0.0) -> None:
        if self.left(reserve) <= 0:
            raise OutOfTime


@dataclass
class DecodeRow:
    """One (method, mode, context, batch) point; numbers are ``None`` where it did not run."""

    method: str
    mode: str
    context: int
    batch: int
    status: str = "ok"
    kept_tokens: int | None = None  # K/V pairs per KV head while decoding
    prefill_s: float | None = None
    warmup_s: float | None = None  # the untimed steps: compilation and graph capture
    ms_per_step: float | None = None  # median; one step yields one token per sequence
    tokens_per_s: float | None = None
    x_weight_bound: float | None = None  # the median step over the weight-read bound
    prefill_peak_gib: float | None = None
    decode_peak_gib: float | None = None


@dataclass
class TeacherForcedRow:
    """One teacher-forced scoring forward (``lesskv eval ppl``'s form) at ``context``."""

    method: str
    context: int
    status: str = "ok"
    seconds: float | None = None
    peak_gib: float | None = None


@dataclass
class Bench:
    """What every point needs: the model, its method settings, the limits."""

    model: PreTrainedModel
    policy: Policy
    kernels: LessKernels
    steps: int
    clock: Clock
    bound_s: float  # weight-read bound of one decoding step
    reserve_s: float  # time kept for the teacher-forced forwards
    compiled: Callable | None = None  # the full model's forward under torch.compile
    # (method, mode) -> the last finished group's context and its seconds of prefill, timed
    # steps and warm-up, from which :func:`too_slow` estimates the next group
    measured: dict[tuple[str, str], tuple[int, float, float, float]] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the finished point left, so the next one starts from the same state (each
    point ends with this, so the next one's peak counts only its own memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weight_read_bytes(model: PreTrainedModel) -> int:
    """Bytes of weights one decoding step reads: every parameter but the input embedding
    (a step gathers one of its rows per sequence), unless the output layer shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is model.get_output_embeddings().weight:
        return total
    return total - embedding.numel() * embedding.element_size()


def copy_bandwidth(device: torch.device, repeats: int = 20) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once, written once)."""
    source = torch.empty(COPY_BYTES[device.type] // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync(device)
    seconds = time.perf_counter() - start
    del source, target
    release(device)
    return 2 * COPY_BYTES[device.type] * repeats / seconds


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    heads, head_dim = config.num_key_value_heads, config.head_dim
    return config.num_hidden_layers * 2 * heads * head_dim * dtype.itemsize


def estimated_bytes(bench: Bench, method: str, context: int, batch: int) -> int:
    """What a decoding point holds at its peak: weights, the cache (full: every token, with
    the one-sequence prefill it was copied from and two layers' worth of growing copies),
    and a GiB of activations; the logits of the batch on top."""
    per_token = kv_bytes_per_token(bench.model.config, bench.model.dtype)
    if method == "full":
        tokens = context + WARMUP_STEPS + bench.steps
        layers = bench.model.config.num_hidden_layers
        kv = per_token * (batch * tokens * (1 + 2 / layers) + context)
    else:
        kv = per_token * batch * bench.policy.slots(context).total
    logits = batch * bench.model.config.vocab_size * 4
    return torch.cuda.memory_allocated(bench.device) + int(kv) + logits + 2**30


@contextmanager
def time_guard(bench: Bench, reserve: float) -> Iterator[None]:
    """Raise :class:`OutOfTime` at the next decoder layer once the time left is gone."""
    hooks = [
        layer.register_forward_pre_hook(lambda *_: bench.clock.check(reserve))
        for layer in bench.model.model.layers
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def prompt(bench: Bench, context: int) -> torch.Tensor:
    """One random prompt of ``context`` tokens (the same for every method)."""
    generator = torch.Generator().manual_seed(context)
    vocab = bench.model.config.vocab_size
    return torch.randint(0, vocab, (1, context), generator=generator).to(bench.device)


@torch.no_grad()
def prefill(bench: Bench, cache: DynamicCache | LessCache, context: int) -> tuple:
    """Fill ``cache`` with one prompt: the next token, the seconds and the peak GiB."""
    model = bench.model
    ids = prompt(bench, context)
    reset_peak(bench.device)
    sync(bench.device)
    start = time.perf_counter()
    with time_guard(bench, bench.reserve_s):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(bench.device)
    return token, time.perf_counter() - start, peak_gib(bench.device)


def step(forward: Callable, token: torch.Tensor, arguments: dict, graphs: bool) -> torch.Tensor:
    """One greedy decoding step: the next token of every sequence."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
    logits = forward(input_ids=token, use_cache=True, logits_to_keep=1, **arguments).logits
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def decode(
    bench: Bench, forward: Callable, cache: object, token: torch.Tensor, graphs: bool
) -> tuple[float, list[float]]:
    """The untimed warm-up steps' seconds, then each timed step's seconds."""
    arguments = cache_argument(bench.model, cache)
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        token = step(forward, token, arguments, graphs)
    sync(bench.device)
    warmup_s, times = time.perf_counter() - start, []
    for _ in range(bench.steps):
        bench.clock.check(bench.reserve_s)
        start = time.perf_counter()
        token = step(forward, token, arguments, graphs)
        sync(bench.device)
        times.append(time.perf_counter() - start)
    return warmup_s, times


def timed_row(
    bench: Bench, row: DecodeRow, forward: Callable, cache: object, token: torch.Tensor
) -> None:
    """Decode ``row``'s point from ``cache`` and fill in its timings and peak memory."""
    reset_peak(bench.device)
    row.warmup_s, times = decode(bench, forward, cache, token, row.mode == "graphs")
    median = statistics.median(times)
    row.ms_per_step = median * 1e3
    row.tokens_per_s = row.batch / median
    row.x_weight_bound = median / bench.bound_s
    row.decode_peak_gib = peak_gib(bench.device)


def static_copy(
    model: PreTrainedModel, prefilled: DynamicCache, batch: int, length: int
) -> StaticCache:
    """A ``StaticCache`` for ``batch`` sequences of up to ``length`` tokens, each holding the
    one prefilled sequence: the fixed shapes compiled decoding needs."""
    static = StaticCache(config=model.config, max_cache_len=length)
    for index, layer in enumerate(prefilled.layers):
        keys = layer.keys.expand(batch, -1, -1, -1)
        values = layer.values.expand(batch, -1, -1, -1)
        positions = torch.arange(keys.shape[2], device=keys.device)
        static.update(keys, values, index, {"cache_position": positions})
    return static


def full_forward(bench: Bench, mode: str) -> Callable:
    """The full model's forward: as it is, or compiled once for CUDA graphs."""
    if mode == "eager":
        return bench.model.forward
    if bench.compiled is None:
        bench.compiled = torch.compile(bench.model.forward, mode="reduce-overhead")
    return bench.compiled


def full_point(bench: Bench, row: DecodeRow) -> None:
    """Prefill one sequence into a ``DynamicCache``; repeat it (eager) or copy it into a
    ``StaticCache`` (graphs) for the batch; decode."""
    bench.model.set_attn_implementation("sdpa")
    prefilled = DynamicCache(config=bench.model.config)
    token, row.prefill_s, row.prefill_peak_gib = prefill(bench, prefilled, row.context)
    row.kept_tokens = row.context
    token = token.repeat_interleave(row.batch, 0)
    if row.mode == "eager":
        if row.batch > 1:
            prefilled.batch_repeat_interleave(row.batch)
        cache = prefilled
    else:
        length = row.context + WARMUP_STEPS + bench.steps
        cache = static_copy(bench.model, prefilled, row.batch, length)
        del prefilled
    timed_row(bench, row, full_forward(bench, row.mode), cache, token)


def less_cache(bench: Bench, method: str, mode: str) -> LessCache:
    """The method's ``LessCache``; graphs mode asks for CUDA-graph capture of each layer's step."""
    options = {"cuda_graphs": True} if mode == "graphs" else {}
    kernels = bench.kernels if method == "less" else None
    return LessCache(bench.model, bench.policy, kernels=kernels, **options)


def sparse_points(bench: Bench, rows: Sequence[DecodeRow]) -> None:
    """One prefill for all of ``rows`` (one method and mode, batch sizes largest first): each
    decodes from a copy of it repeated across its batch, the last from the prefill itself."""
    first, prefilled = rows[0], {}

    def fill() -> None:
        cache = less_cache(bench, first.method, first.mode)
        token, seconds, peak = prefill(bench, cache, first.context)
        prefilled.update(cache=cache, token=token)
        for row in rows:
            row.prefill_s, row.prefill_peak_gib = seconds, peak

    if attempt(bench, rows, fill):
        for index, row in enumerate(rows):
            copied = index < len(rows) - 1
            attempt(bench, [row], sparse_point, bench, row, prefilled, copied)


def sparse_point(bench: Bench, row: DecodeRow, prefilled: dict, copied: bool) -> None:
    """Decode one batch size from the prefilled ``LessCache`` (or a copy of it)."""
    cache = copy.deepcopy(prefilled["cache"]) if copied else prefilled["cache"]
    enable(bench.model)
    if row.batch > 1:
        cache.batch_repeat_interleave(row.batch)
    row.kept_tokens = cache.layers[0].capacity
    token = prefilled["token"].repeat_interleave(row.batch, 0)
    timed_row(bench, row, bench.model.forward, cache, token)


def attempt(bench: Bench, rows: Sequence[object], work: Callable, *args: object) -> bool:
    """Run ``work(*args)``; what stops it becomes the status of every row in ``rows``."""
    status = None
    try:
        work(*args)
    except OutOfTime:
        status = "skipped: time limit"
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    except Exception as err:  # a benchmark reports every point, whatever broke it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        status = f"error: {type(err).__name__}: {reason}"[:120]
    finally:
        release(bench.device)
    for row in rows if status else ():
        row.status = status
    return status is None


def unavailable(bench: Bench, method: str, mode: str) -> str | None:
    """Why ``mode`` cannot run ``method`` here, if it cannot."""
    if mode != "graphs":
        return None
    if bench.device.type != "cuda":
        return "skipped: CUDA graphs need a GPU"
    return None


def too_slow(bench: Bench, method: str, mode: str, context: int) -> str | None:
    """Why a group would not finish in the time left, estimated from the last group of the
    same method and mode (else of the same method, eager): prefill scaled with the square of
    the context (its attention), timed steps linearly, warm-up (compilation, capture) as it
    was. The first compiled full group is given :data:`FIRST_COMPILE_S`."""
    measured = bench.measured.get((method, mode)) or bench.measured.get((method, "eager"))
    estimate = 0.0
    if mode == "graphs" and method == "full" and (method, mode) not in bench.measured:
        estimate = FIRST_COMPILE_S if bench.device.type == "cuda" else 0.0
    elif measured is not None:
        measured_context, prefill_s, timed_s, warmup_s = measured
        ratio = context / measured_context
        estimate = prefill_s * ratio**2 + timed_s * ratio + warmup_s
    if estimate > bench.clock.left(bench.reserve_s):
        return f"skipped: time limit (needs ~{estimate:.0f} s)"
    return None


def record(bench: Bench, rows: Sequence[DecodeRow]) -> None:
    """Keep a finished group's seconds for :func:`too_slow`, if all of its points ran."""
    if not rows or any(row.status != "ok" for row in rows):
        return
    first = rows[0]
    prefills = [row.prefill_s for row in rows] if first.method == "full" else [first.prefill_s]
    timed = sum(row.ms_per_step for row in rows) * bench.steps / 1e3
    warmup = sum(row.warmup_s for row in rows)
    bench.measured[first.method, first.mode] = first.context, sum(prefills), timed, warmup


def too_large(bench: Bench, row: DecodeRow) -> str | None:
    """Why ``row`` would not fit in the GPU's memory, by estimate."""
    if bench.device.type != "cuda":
        return None
    need = estimated_bytes(bench, row.method, row.context, row.batch)
    total = torch.cuda.get_device_properties(bench.device).total_memory
    if need > MEMORY_HEADROOM * total:
        return f"OOM/skipped (needs ~{need / 2**30:.0f} GiB)"
    return None


def run_group(
    bench: Bench, method: str, mode: str, context: int, batch_sizes: Sequence[int]
) -> list[DecodeRow]:
    """Every batch size of one (method, mode, context), largest batch first."""
    rows = [DecodeRow(method, mode, context, b) for b in sorted(batch_sizes, reverse=True)]
    reason = unavailable(bench, method, mode) or too_slow(bench, method, mode, context)
    for row in rows:
        row.status = reason or too_large(bench, row) or "ok"
    runnable = [row for row in rows if row.status == "ok"]
    if method == "full":
        for row in runnable:
            attempt(bench, [row], full_point, bench, row)
    elif runnable:
        sparse_points(bench, runnable)
    record(bench, runnable)
    for row in rows:
        progress(bench, row)
    return rows


def progress(bench: Bench, row: DecodeRow | TeacherForcedRow) -> None:
    """One line on stderr per finished point, as the run goes (the tables come at the end)."""
    values = asdict(row)
    shown = ("mode", "batch", "ms_per_step", "seconds", "decode_peak_gib", "peak_gib")
    details = " ".join(f"{k}={cell(values[k])}" for k in shown if values.get(k) is not None)
    line = f"[{bench.clock.elapsed():4.0f} s] {row.method} context={row.context} {details}"
    print(f"{line}: {row.status}", file=sys.stderr, flush=True)


@torch.no_grad()
def teacher_forced(bench: Bench, method: str, context: int) -> TeacherForcedRow:
    """One scoring forward with next-token NLL, as ``lesskv eval ppl`` runs ``method``."""
    row = TeacherForcedRow(method, context)
    ids = prompt(bench, context)

    def work() -> None:
        reset_peak(bench.device)
        start = time.perf_counter()
        with time_guard(bench, 0.0):
            if method == "full":
                bench.model.set_attn_implementation("sdpa")
                window_nll(bench.model, ids)
            else:
                layers = list(bench.kernels.layers)
                with using_method(bench.model, method, policy=bench.policy, kernels=layers):
                    window_nll(bench.model, ids)
        sync(bench.device)
        row.seconds, row.peak_gib = time.perf_counter() - start, peak_gib(bench.device)

    attempt(bench, [row], work)
    progress(bench, row)
    return row


def cell(value: object) -> str:
    """A table cell: ``-`` for nothing, three significant digits below 100, whole numbers
    above."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(rows: Sequence[object], columns: dict[str, str]) -> str:
    """A Markdown table of dataclass rows, one column per ``columns`` key, headed by its value."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = asdict(row)
        lines.append("| " + " | ".join(cell(values[name]) for name in columns) + " |")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    """argparse type: ``"1,32"`` -> ``[1, 32]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1")
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of ``choices``, in the order given."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return names

    return parse


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The options, checked (with the device they run on) before any model is built."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int_list, default=[4096, 16384, 32768])
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32])
    parser.add_argument("--methods", type=name_list(METHODS), default=list(METHODS))
    parser.add_argument("--modes", type=name_list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed per point")
    parser.add_argument("--budget", default="0.1", help="H2O's budget: tokens or a fraction")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds (default 420)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama (CPU smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.exit(
            2,
            f"{parser.prog}: error: the 8B configuration needs a CUDA GPU (none "
            "found here); --tiny runs a tiny model on the CPU\n",
        )
    if args.steps < 1 or args.time_limit <= 0:
        parser.error("--steps and --time-limit must be positive")
    config = tiny_config() if args.tiny else llama31_8b_config()
    longest = max(args.contexts) + WARMUP_STEPS + args.steps
    if longest > config.max_position_embeddings:
        parser.error(
            f"contexts + steps reach {longest} tokens, beyond the model's "
            f"{config.max_position_embeddings}"
        )
    try:
        args.policy = make_policy(POLICY, args.budget)
        for context in args.contexts:
            args.policy.slots(context)
    except LessKVError as err:
        parser.error(str(err))
    args.config = config
    return args, device


def describe(bench: Bench, bandwidth: float, args: argparse.Namespace) -> dict[str, object]:
    """What the numbers were measured on, printed above the tables and kept in the JSON."""
    device = bench.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "tiny Llama" if args.tiny else "Llama-3.1-8B shapes, random bf16 weights",
        "parameters": sum(p.numel() for p in bench.model.parameters()),
        "weight_read_bytes": weight_read_bytes(bench.model),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weight_bound_ms": bench.bound_s * 1e3,
        "policy": f"{bench.policy.name} budget {bench.policy.budget}",
        "steps": bench.steps,
        "warmup_steps": WARMUP_STEPS,
    }
    print(
        f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{info['model']} ({info['parameters']:,} parameters); baseline and LESS: "
        f"{info['policy']}; {WARMUP_STEPS} warm-up + {bench.steps} timed steps per point"
    )
    print(
        f"weight-read bound: {info['weight_read_bytes'] / 1e9:.3g} GB per step / "
        f"{bandwidth / 1e12:.3g} TB/s measured copy bandwidth = {bench.bound_s * 1e3:.3g} ms"
    )
    return info


def build_bench(
    config: LlamaConfig,
    device: torch.device,
    policy: Policy,
    steps: int,
    clock: Clock,
    reserve_s: float,
) -> tuple[Bench, float]:
    """The model and its kernels on ``device``, with the weight-read bound measured; returns
    the bench and the copy bandwidth."""
    model = build_model(config, device)
    bandwidth = copy_bandwidth(device)
    bench = Bench(
        model=model,
        policy=policy,
        kernels=random_kernels(model, policy),
        steps=steps,
        clock=clock,
        bound_s=weight_read_bytes(model) / bandwidth,
        reserve_s=reserve_s,
    )
    return bench, bandwidth


def run(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, object]:
    """Build the model, measure the bound, run every point, then the teacher-forced forwards."""
    tf_methods = [m for m in TF_METHODS if m in args.methods]
    reserve_s = TF_RESERVE_S if tf_methods else 0.0
    bench, bandwidth = build_bench(args.config, device, args.policy, args.steps, clock, reserve_s)
    info = describe(bench, bandwidth, args)
    rows = [  # every eager point before the first compilation
        row
        for mode in args.modes
        for context in sorted(args.contexts)
        for method in args.methods
        for row in run_group(bench, method, mode, context, args.batch_sizes)
    ]
    order = {name: i for i, name in enumerate(METHODS + MODES)}
    rows.sort(key=lambda r: (r.context, r.batch, order[r.method], order[r.mode]))
    tf_rows = [teacher_forced(bench, m, max(args.contexts)) for m in tf_methods]
    return {**info, "decode": rows, "teacher_forced": tf_rows}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables (and write the JSON); exit status 0 however many points were skipped."""
    args, device = parse_args(argv)
    clock = Clock(args.time_limit)
    result = run(args, device, clock)
    print(
        "\nDecoding (ms/step: median step, one token per sequence; x bound: over the "
        "weight-read bound)\n"
    )
    print(markdown(result["decode"], DECODE_COLUMNS))
    print("\nTeacher-forced scoring forward with NLL (as `lesskv eval ppl`)\n")
    print(markdown(result["teacher_forced"], TF_COLUMNS))
    result["elapsed_s"] = clock.elapsed()
    print(f"\nelapsed {result['elapsed_s']:.0f} s")
    if args.json is not None:
        result["decode"] = [asdict(row) for row in result["decode"]]
        result["teacher_forced"] = [asdict(row) for row in result["teacher_forced"]]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
