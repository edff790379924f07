"""lesskv's attention, registered with transformers as ``"less"``: both forms of LESS.

``enable(model)`` registers the attention implementation and selects it: the only change
lesskv ever makes to a model. Everything a call needs travels with that call, so one model can
serve many threads or asyncio tasks at once:

* the recurrent form (decoding with real eviction): a :class:`~lesskv.hf.cache.LessCache`
  holds its policy, kernels and state, and :mod:`lesskv.hf.recurrent` runs the step on the
  layer. The cache's own ``update``, which every attention layer calls
  with its ``layer_idx`` just before attention, hands the layer over to the attention function
  through a context variable (:func:`hand_over`). No keyword argument of model code is
  involved, and a hand-over that attention never claims raises instead of decoding from a
  wrong path;
* the parallel form (teacher-forced scoring): each layer's :class:`LayerSetup` sits in a
  context variable (:func:`set_setups`, :func:`using_setups`; :mod:`lesskv.hf.methods` builds
  them), visible only to the thread or task that set it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lesskv.core import eviction, math
from lesskv.core.forms import StateForm
from lesskv.core.memory import release_freed_memory
from lesskv.core.merge import merge_parallel
from lesskv.core.policies import Policy, Slots, keep_mask_from_steps, state_steps
from lesskv.errors import LessKVError
from lesskv.hf import adapters, recurrent
from lesskv.hf.compat import check_versions
from lesskv.hf.modules import attention_modules, attention_scale

if TYPE_CHECKING:
    from lesskv.hf.cache import LessCache, LessLayer

ATTN_NAME = adapters.ATTN_NAME
Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LayerSetup:
    """What one attention layer does in the parallel form: no policy means full attention;
    the evicted pairs go into LESS's state (``kernels``: its form), merge slots, or nowhere."""

    policy: Policy | None = None
    extra_tokens: int = 0
    kernels: StateForm | None = None
    merge_slots: int = 0
    # Sees (module, query, key, value) on every call: how training records post-RoPE states.
    observer: Observer | None = None
    # Analysis only (the oracle of the paper's Fig. 3, right): the sparse output plus the best
    # rank-r approximation of full minus sparse output; no cache can hold this.
    oracle_rank: int | None = None


FULL = LayerSetup()
# id(attention module) -> (weak reference to it, its setup), per thread / asyncio task.
_Setups = Mapping[int, tuple[weakref.ref, LayerSetup]]
_setups: ContextVar[_Setups] = ContextVar("lesskv_setups", default=MappingProxyType({}))
# The LessCache layer whose update just ran in this thread / task, until attention claims it.
_handed_over: ContextVar[tuple[LessCache, int] | None] = ContextVar(
    "lesskv_handed_over", default=None
)


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Route the model's attention through lesskv (full attention until a method is set)."""
    check_versions()
    AttentionInterface.register(ATTN_NAME, less_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    adapters.prepare(model)
    if model.config._attn_implementation != ATTN_NAME and not adapters.is_adapted(model):
        model.set_attn_implementation(ATTN_NAME)
    return model


def hand_over(cache: LessCache, layer_idx: int) -> None:
    """Called by ``LessCache.update``: this context's next attention call is that layer's."""
    unclaimed = _handed_over.get()
    if unclaimed is not None and unclaimed[0] is cache:
        _handed_over.set(None)
        raise LessKVError(
            f"attention never used the LessCache given for layer {unclaimed[1]}: the model's "
            f"attention implementation must stay {ATTN_NAME!r} (lesskv.enable) and call "
            "transformers' attention interface"
        )
    _handed_over.set((cache, layer_idx))


def _claim(module: nn.Module) -> LessLayer | None:
    """The cache layer handed over for this attention call, if any (taken only once)."""
    handed = _handed_over.get()
    if handed is None:
        return None
    _handed_over.set(None)
    cache, layer_idx = handed
    if layer_idx != module.layer_idx or not cache.serves(module):
        raise LessKVError(
            "this LessCache was built for another model: build one LessCache per model "
            "(and per generation)"
        )
    return cache.layers[layer_idx]


def set_setups(model: PreTrainedModel, chosen: Mapping[nn.Module, LayerSetup]) -> None:
    """Give ``model``'s layers in ``chosen`` these setups (the others full attention), for the
    calling thread or asyncio task only."""
    _setups.set(_updated(model, chosen))


@contextmanager
def using_setups(model: PreTrainedModel, chosen: Mapping[nn.Module, LayerSetup]) -> Iterator[None]:
    """:func:`set_setups` for the duration of a block, then back to what was set before."""
    token = _setups.set(_updated(model, chosen))
    try:
        yield
    finally:
        _setups.reset(token)


def _updated(model: PreTrainedModel, chosen: Mapping[nn.Module, LayerSetup]) -> _Setups:
    """A copy of this context's setups with ``model``'s layers replaced by ``chosen`` (the
    others full); entries of models that no longer exist are dropped."""
    mine = {id(m) for m in attention_modules(model)}
    setups = {
        key: entry
        for key, entry in _setups.get().items()
        if key not in mine and entry[0]() is not None
    }
    for module, setup in chosen.items():
        setups[id(module)] = (weakref.ref(module), setup)
    return setups


def _setup_of(module: nn.Module) -> LayerSetup:
    entry = _setups.get().get(id(module))
    return entry[1] if entry is not None and entry[0]() is module else FULL


def less_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``(B, Hq, Tq, D)`` post-RoPE, key/value
    ``(B, Hkv, Tk, D)``; returns ``(B, Tq, Hq, D)``.

    With a LessCache handed over, the recurrent form decodes with real eviction. Otherwise the
    parallel form scores whole sequences; batches must be right-padded (as teacher-forced
    scoring naturally is), so that padding only ever follows the real tokens.
    """
    scale = scaling if scaling is not None else attention_scale(module)
    if kwargs.get("softcap") is not None:
        raise LessKVError(
            f"{type(module).__name__} caps its attention logits (softcapping, e.g. Gemma 2), "
            "which lesskv's attention does not apply; run this model without lesskv"
        )
    layer = _claim(module)
    if layer is not None:
        return _heads_last(
            recurrent.recurrent_attention(layer, query, key, value, attention_mask, scale)
        )
    setup = _setup_of(module)
    if setup.observer is not None:
        setup.observer(module, query, key, value)
    policy = setup.policy
    q_len, k_len = query.shape[2], key.shape[2]
    slots = policy.slots(k_len, setup.extra_tokens) if policy is not None else None
    if slots is None or slots.total >= k_len:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        return out, None
    if q_len != k_len:
        raise LessKVError(
            "a sparse method cannot decode from transformers' own cache (its parallel form "
            "scores whole sequences): generate with a LessCache(...) to evict for real"
        )
    out = _sparse_parallel(setup, slots, query, key, value, attention_mask, scale, kwargs)
    if setup.oracle_rank is not None:
        full = (query, key, value, attention_mask, scale)
        out = _oracle(module, setup.oracle_rank, out, full, kwargs)
    if key.device.type == "cpu":  # the layer's block tensors leave no pages behind
        release_freed_memory()
    return _heads_last(out)


def _sparse_parallel(
    setup: LayerSetup,
    slots: Slots,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    kwargs: dict,
) -> torch.Tensor:
    """The parallel form of a sparse layer: the policy's attention, and the evicted pairs'
    summary (LESS's state or merge slots) joined to it; ``(B, Hkv, G, T, D)``."""
    policy = setup.policy
    q = math.group_queries(query, key.shape[1])
    window = kwargs.get("sliding_window")  # every layer slides: the policy runs inside it
    summary = setup.kernels is not None or setup.merge_slots > 0
    if attention_mask is None and eviction.fused_applies(policy, q, key, value, window=window):
        out, lse, steps = eviction.policy_attention(policy, slots, q, key, value, scale)
        out = out.to(value.dtype)
    else:
        out, lse, steps = _masked_parallel(
            policy, slots, q, key, value, attention_mask, scale, window, summary
        )
    if not summary:
        return out
    kernels, entering = setup.kernels, state_steps(steps, window)
    if kernels is None:
        summary = merge_parallel(q, key, value, entering, setup.merge_slots, scale)
    else:
        summary = kernels.parallel(q, key, value, entering)
    return math.join_summary(out, lse, summary)


def layer_output(
    setup: LayerSetup, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """What a layer given ``setup`` outputs for one unpadded sequence, grouped ``(B, Hkv, G,
    T, D)``: for analyses that read a layer's real inputs (its policy must evict)."""
    slots = setup.policy.slots(key.shape[2], setup.extra_tokens)
    return _sparse_parallel(setup, slots, query, key, value, None, scale, {})


def _masked_parallel(
    policy: Policy,
    slots: Slots,
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    window: int | None,
    summary: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The reference parallel form: the policy simulated over the ``T x T`` logits, then a
    softmax over the kept keys; any device, autograd, padding and sliding windows. Returns
    the output, its log-sum-exp (None where no ``summary`` needs it) and the steps."""
    q_len, k_len = q.shape[3], key.shape[2]
    visible = _visible_keys(attention_mask, q_len, k_len, q.device)
    logits = None
    if policy.uses_attention:
        logits = math.attention_logits(q, key, scale).masked_fill_(~visible, math.NEG_INF)
    steps = policy.eviction_steps(logits, slots, k_len, window, device=key.device)
    steps = steps.expand(*key.shape[:2], k_len)
    keep = keep_mask_from_steps(steps).unsqueeze(2) & visible
    if logits is not None:  # the policy's logits are at hand: one softmax over the kept ones
        out, lse = math.attention_from_logits(logits.float(), keep, value)  # fp32 for 16-bit
        return out.to(value.dtype), lse, steps
    if not summary:
        return math.sparse_output(q, key, value, keep, scale), None, steps
    out, lse = math.sparse_attention(q, key, value, keep, scale)
    return out, lse, steps


def _oracle(
    module: nn.Module,
    rank: int,
    sparse: torch.Tensor,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float],
    kwargs: dict,
) -> torch.Tensor:
    """``sparse + truncated(full - sparse, rank)`` per batch row and query head over the
    sequence's ``T x D`` outputs, grouped ``(B, Hkv, G, T, D)``. Full attention is what the
    ``full`` method runs (transformers' sdpa, same mask and window), on this layer's inputs;
    padding queries are left out of the residual, so they cannot bend its singular vectors."""
    if rank == 0:  # nothing added: skip full attention and the SVD
        return sparse
    query, key, value, attention_mask, scale = inputs
    full, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scale, **kwargs
    )
    t = sparse.shape[3]
    residual = full.transpose(1, 2).reshape(sparse.shape).float() - sparse.float()
    if attention_mask is not None:  # a padding query cannot see its own key
        own = attention_mask.diagonal(dim1=-2, dim2=-1)
        real = own if own.dtype == torch.bool else own == 0
        residual = residual * real.reshape(-1, 1, 1, t, 1)
    return (sparse.float() + math.truncated(residual, rank)).to(sparse.dtype)


def _heads_last(out: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Grouped ``(B, Hkv, G, T, D)`` → transformers' ``((B, T, Hq, D), None)``."""
    b, hkv, g, t, d = out.shape
    return out.reshape(b, hkv * g, t, d).transpose(1, 2).contiguous(), None


def _visible_keys(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """Causal and padding visibility as a bool ``(B|1, 1, 1, Tq, Tk)`` grouped-layout mask."""
    if attention_mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return mask[None, None, None]
    if attention_mask.dtype != torch.bool:  # additive float mask
        attention_mask = attention_mask == 0
    return attention_mask.unsqueeze(2)
