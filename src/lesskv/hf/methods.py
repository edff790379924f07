"""Method name → what the model runs: one factory for the parallel form (per-layer setups) and
one for the recurrent form (a LessCache, or None for transformers' own full cache).

The methods compared everywhere: ``full`` (the model's own attention), ``baseline`` (the
sparse policy), ``baseline+`` (the policy with extra pairs weighing as much as LESS's state:
the equal-memory comparison), ``merge`` (the policy plus as many training-free merge slots for
the evicted pairs as that memory holds) and ``less`` (the policy plus the learned low-rank
state).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn
from transformers import PreTrainedModel

from lesskv.core.budget import (
    DEFAULT_RANK,
    METHODS,
    merge_slots_in_state,
    state_size_in_tokens,
)
from lesskv.core.policies import POLICIES, Policy
from lesskv.errors import LessKVError
from lesskv.hf.attention import LayerSetup, Observer, enable, set_setups, using_setups
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.modules import (
    attention_modules,
    keeps_native_windows,
    on_layer_device,
    sliding_windows,
)


def extra_tokens(method: str, rank: int, head_dim: int) -> int:
    """Pairs Baseline+ gets on top of the budget: as much memory as LESS's state."""
    return state_size_in_tokens(rank, head_dim) if method == "baseline+" else 0


def merge_slots(method: str, rank: int, head_dim: int) -> int:
    """Merge slots per head for ``method``: as many as LESS's state weighs (``merge`` only)."""
    return merge_slots_in_state(rank, head_dim) if method == "merge" else 0


def state_bytes(method: str, rank: int, head_dim: int) -> int:
    """fp32 bytes per KV head that summarise the evicted pairs: LESS's state (H and z) or
    the merge slots (key sum, value sum, count); what the caches' tensors hold."""
    if method == "less":
        return rank * (head_dim + 1) * 4
    return merge_slots(method, rank, head_dim) * (2 * head_dim + 1) * 4


def set_method(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
) -> None:
    """Switch every layer to ``full``, ``baseline``, ``baseline+`` (policy + pairs as large
    as a rank-``rank`` state), ``merge`` (policy + merge slots as large as that state) or
    ``less`` (policy + one kernel module per layer).

    The choice holds for the calling thread (or asyncio task) only; other threads using the
    same model keep theirs. :func:`using_method` limits it to a block.
    """
    set_setups(model, layer_setups(model, method, policy, kernels, rank))


@contextmanager
def using_method(model: PreTrainedModel, method: str, **options) -> Iterator[None]:
    """:func:`set_method` for the duration of a block, then back to what was set before."""
    with using_setups(model, layer_setups(model, method, **options)):
        yield


@contextmanager
def observing(
    model: PreTrainedModel, observer: Observer, layers: Iterable[int] | None = None
) -> Iterator[None]:
    """Full attention, with ``observer(module, query, key, value)`` seeing each layer in
    ``layers`` (all by default) on every call: how training and analysis read post-RoPE
    queries and keys."""
    modules = attention_modules(enable(model))
    chosen = range(len(modules)) if layers is None else layers
    setup = LayerSetup(observer=observer)
    with using_setups(model, {modules[i]: setup for i in chosen}):
        yield


def layer_setups(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
) -> dict[nn.Module, LayerSetup]:
    """Each attention module's setup for ``method`` (none for ``full``)."""
    check_method(method, policy, kernels)
    modules = attention_modules(enable(model))
    if method == "less" and len(kernels) != len(modules):
        raise LessKVError(f"kernels cover {len(kernels)} layers but the model has {len(modules)}")
    if method == "full":
        return {}
    windows = sliding_windows(model)
    native = keeps_native_windows(windows)
    return {  # local layers of a mixed model keep their own window: full attention within it
        module: LayerSetup(
            policy=policy,
            extra_tokens=extra_tokens(method, rank, module.head_dim),
            merge_slots=merge_slots(method, rank, module.head_dim),
            kernels=on_layer_device(kernels[i], module) if method == "less" else None,
        )
        for i, module in enumerate(modules)
        if windows[i] is None or not native
    }


@dataclass(frozen=True)
class StepOptions:
    """How a :class:`LessCache` runs its decoding steps (see there): compiled (``None``: unless
    ``LESSKV_COMPILE=0``), and replayed as CUDA graphs."""

    compile: bool | None = None
    cuda_graphs: bool = False


PLAIN_STEPS = StepOptions()


def make_cache(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: LessKernels | None = None,
    rank: int = DEFAULT_RANK,
    step: StepOptions = PLAIN_STEPS,
) -> LessCache | None:
    """The cache ``method`` generates with; ``None`` for ``full`` (transformers' own cache),
    its decoding steps run as ``step`` says."""
    check_method(method, policy, kernels)
    if method == "full":
        return None
    if method == "less":
        return LessCache(model, policy, kernels=kernels, **asdict(step))
    head_dim = attention_modules(model)[0].head_dim
    return LessCache(
        model,
        policy,
        rank=rank,
        extra_tokens=extra_tokens(method, rank, head_dim),
        merge_slots=merge_slots(method, rank, head_dim),
        **asdict(step),
    )


def check_method(method: str, policy: Policy | None, kernels: object | None) -> None:
    """One readable error for a method name or a missing policy/kernels."""
    if method not in METHODS:
        raise LessKVError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if method != "full" and policy is None:
        raise LessKVError(f"method {method!r} needs a policy ({', '.join(POLICIES)}) and a budget")
    if method == "less" and kernels is None:
        raise LessKVError("method 'less' needs trained kernels (--kernels DIR)")
