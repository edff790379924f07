"""``LessCache``: a transformers ``Cache`` that really evicts, and keeps LESS's state.

Each layer holds a fixed number of slots per KV head (the budget): keys, values, the real
position of the token in each slot, the policy's score, and whether the slot holds a token at
all. A decoding step writes the new token into the slot of the pair the policy evicts, in
place, and folds the evicted pair into LESS's state (its kernels' form,
:class:`~lesskv.core.forms.StateForm`: for the paper's, ``H += ψ(k)ᵀv``, ``z += ψ(k)``; fp32),
or, for the training-free ``merge`` method, into merge slots
(:class:`~lesskv.core.merge.MergeSlots`). Storage is O(budget + state) per head however long
generation runs.

A multi-token call (the prompt, or a chunk of it) attends over the slots plus the new tokens
(full attention for the first call, as in the reference code), then compresses back to the
budget: recent tokens and sinks are kept, the rest by score, and everything dropped is folded.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from lesskv.core.budget import Budget
from lesskv.core.decoding import compile_by_default
from lesskv.core.forms import State, StateForm
from lesskv.core.graphs import CapturedStep, require_cuda
from lesskv.core.merge import MergeSlots
from lesskv.core.policies import LambdaShape, Policy, make_policy
from lesskv.errors import LessKVError
from lesskv.hf import adapters, attention
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.modules import (
    attention_modules,
    check_within,
    keeps_native_windows,
    max_context,
    on_layer_device,
    sliding_windows,
)


class LessLayer(CacheLayerMixin):
    """One layer's slots and state. It only stores: what a call does to them (insert, attend,
    evict, fold, compress) is :mod:`lesskv.hf.recurrent`'s, which lesskv's attention runs."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        policy: Policy,
        kernels: StateForm | None,
        context: int,
        extra: int = 0,
        merge_slots: int = 0,
        window: int | None = None,
        compile: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        self.policy, self.kernels, self.context = policy, kernels, context
        self.extra = extra  # Baseline+'s additional pairs
        self.merge_slots = merge_slots
        # A sliding window: pairs that fall out of it leave the cache and enter no summary
        self.window = window
        self.compile = compile  # the decoding step (attention, scores, state) as one graph
        # ... replayed as a CUDA graph from its second run on
        self.captured = CapturedStep() if cuda_graphs else None
        self.merge: MergeSlots | None = None
        # The token a decoding ``update`` received, inserted by the attention call that follows
        # (:func:`lesskv.hf.recurrent.attend_one`), in the same compiled step.
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0  # tokens seen, padding included: what positions and masks count
        self.capacity = 0  # slots per KV head, fixed at the first call (fractions need a length)
        # The whole prompt's length when it arrives in chunks (LessCache.resolve_budget)
        self.prompt_tokens: int | None = None

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, q, d = key_states.shape
        self.capacity = self.policy.slots(self.prompt_tokens or q, self.extra).total
        dev, dt = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(b, hkv, self.capacity, d)
        self.values = value_states.new_zeros(b, hkv, self.capacity, d)
        self.positions = torch.full((b, hkv, self.capacity), -1, dtype=torch.long, device=dev)
        self.scores = torch.zeros(b, hkv, self.capacity, dtype=torch.float32, device=dev)
        self.valid = torch.zeros(b, hkv, self.capacity, dtype=torch.bool, device=dev)
        self.real_seen = torch.zeros(b, dtype=torch.long, device=dev)  # non-padding tokens
        # LESS's state, in its kernels' form (none without kernels)
        self.state: State = () if self.kernels is None else self.kernels.empty(b, dev)
        if self.merge_slots:
            self.merge = MergeSlots.empty(b, hkv, self.merge_slots, d, dev)
        self.dtype, self.device = dt, dev
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Single tokens go straight into a slot (evicting first); chunks are attended in full
        and compressed afterwards by ``attend``."""
        total = self.seen + key_states.shape[-2]
        check_within(self.context, total, "the sequence (shorten the prompt or max_new_tokens)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise LessKVError(
                f"this LessCache holds {self.keys.shape[0]} sequences, not "
                f"{key_states.shape[0]}: use one LessCache per generation"
            )
        if key_states.shape[-2] == 1 and self.seen > 0:
            self.pending = key_states, value_states
            self.seen += 1
            return self.keys, self.values
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # newer transformers pass the query length, older ones (5.2) the cache positions.
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:  # what newer transformers ask
        return -1

    def get_max_cache_shape(self) -> int:  # what older ones (5.2) ask
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise LessKVError(
            "an eviction cache cannot be cropped (assisted/speculative decoding needs that); "
            "use plain greedy, sampling or beam search"
        )

    def reset(self) -> None:
        self.is_initialized, self.seen = False, 0
        self.keys = self.values = self.pending = None

    def _per_batch(self) -> list[str]:
        return ["keys", "values", "positions", "scores", "valid", "real_seen"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.device)
            for name in self._per_batch():
                setattr(self, name, getattr(self, name)[indices])
            self.state = tuple(tensor[indices] for tensor in self.state)
            if self.merge is not None:
                self.merge = self.merge.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.keys.shape[0], device=self.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: kept K/V and the summary of the evicted pairs (the LESS state's
        tensors, or the merge slots)."""
        if not self.is_initialized:
            return {"kv": 0, "state": 0}
        kv = self.keys.numel() * self.keys.element_size() * 2
        state = sum(tensor.numel() * tensor.element_size() for tensor in self.state)
        if self.merge is not None:
            state = self.merge.nbytes()
        return {"kv": kv, "state": state}


class LessCache(Cache):
    """Drop-in cache for ``model.generate``: real eviction, optional LESS state.

    ``LessCache(model, policy="h2o", budget=64)`` is the sparse baseline with real eviction;
    pass ``kernels=`` (or use :meth:`from_pretrained`) for LESS, ``extra_tokens=`` for
    Baseline+, ``merge_slots=`` for the training-free merge of evicted pairs. A fractional
    budget is relative to the prompt: the first call, or the length given to
    :meth:`resolve_budget` before a prompt fed in chunks. ``compile`` (default: on, unless the
    environment sets ``LESSKV_COMPILE=0``) runs each layer's decoding step (the softmax over
    the slots, the policy's scores, LESS's state) as one graph compiled by ``torch.compile``
    on the first decoding step; it falls back to eager, with one warning, where compiling
    fails. ``cuda_graphs=True`` (CUDA only) then replays each layer's step as a CUDA graph
    (:mod:`lesskv.core.graphs`): the step's launches cost one replay.

    A LessCache holds one generation's state: it serves the model it was built for, one batch
    size, and the thread that first uses it; anything else raises :class:`LessKVError`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        policy: str | Policy = "h2o",
        budget: Budget | str | float | None = None,
        kernels: LessKernels | None = None,
        extra_tokens: int = 0,
        merge_slots: int = 0,
        compile: bool | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if cuda_graphs:
            require_cuda(next(model.parameters()).device)
        if merge_slots < 0 or (merge_slots and kernels is not None):
            raise LessKVError(
                f"merge_slots={merge_slots}: use a count >= 0, and either kernels (LESS) or "
                "merge slots, not both"
            )
        if isinstance(policy, str):
            if budget is None:
                raise LessKVError("LessCache needs a budget (tokens, or a fraction of the prompt)")
            policy = make_policy(policy, budget)
        attention.enable(model)
        if kernels is not None:
            kernels.check_compatible(model)
        context = max_context(model)
        if not policy.budget.is_fraction and policy.budget.tokens(context) > context:
            raise LessKVError(
                f"budget {policy.budget} is larger than the model's context of {context} tokens"
            )
        self.policy, self.kernels = policy, kernels
        compile = compile_by_default() if compile is None else compile
        modules = attention_modules(model)
        layers = []
        windows = sliding_windows(model)
        native = keeps_native_windows(windows)
        for i, (module, window) in enumerate(zip(modules, windows, strict=True)):
            if window is not None and native:  # the layer's own rule: the newest ``window``, and
                # no summary of what leaves
                rule = LambdaShape(window, sinks=0)
                layers.append(
                    LessLayer(
                        rule,
                        None,
                        context,
                        window=window,
                        compile=compile,
                        cuda_graphs=cuda_graphs,
                    )
                )
                continue
            layer_kernels = None if kernels is None else on_layer_device(kernels.layers[i], module)
            layers.append(
                LessLayer(
                    policy,
                    layer_kernels,
                    context,
                    extra=extra_tokens,
                    merge_slots=merge_slots,
                    window=window,
                    compile=compile,
                    cuda_graphs=cuda_graphs,
                )
            )
        super().__init__(layers=layers)
        self._config = model.config
        self._adapted = adapters.is_adapted(model)  # keeps its own attention implementation
        self._modules = [weakref.ref(m) for m in modules]
        self._owner: int | None = None  # the thread that uses this cache
        self._foreign = False  # another model's layer wrote into it: its state is mixed

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every attention layer calls this with its ``layer_idx`` just before attention:
        store the new pairs, then hand the layer over to lesskv's attention function."""
        self._check_caller(layer_idx)
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        attention.hand_over(self, layer_idx)
        return keys, values

    def _check_caller(self, layer_idx: int) -> None:
        if self._foreign or layer_idx >= len(self.layers):
            raise LessKVError(
                "this LessCache was built for another model: build one LessCache per model "
                "(and per generation)"
            )
        # Once per forward pass: reading the config's attention implementation costs ~4 µs.
        implementation = self._config._attn_implementation
        if layer_idx == 0 and implementation != attention.ATTN_NAME and not self._adapted:
            raise LessKVError(
                f"the model's attention implementation is {self._config._attn_implementation!r}; "
                f"a LessCache needs {attention.ATTN_NAME!r} (lesskv.enable(model))"
            )
        thread = threading.get_ident()
        if self._owner != thread:
            if self._owner is not None:
                raise LessKVError(
                    "this LessCache is in use by another thread: a LessCache holds one "
                    "generation's state, give each concurrent generation its own"
                )
            self._owner = thread

    def serves(self, module: nn.Module) -> bool:
        """Whether ``module`` is the attention layer this cache was built for; if not, the
        cache refuses every later call (that layer's update already went into it)."""
        self._foreign = self._foreign or self._modules[module.layer_idx]() is not module
        return not self._foreign

    def reset(self) -> None:
        """Empty every layer; the cache may then serve another thread."""
        super().reset()
        self._owner, self._foreign = None, False
        self.resolve_budget(None)

    def resolve_budget(self, prompt_tokens: int | None) -> None:
        """Fix a fractional budget against a prompt of ``prompt_tokens`` that will arrive in
        chunks (otherwise the first call, the whole prompt, fixes it): the same fraction of
        the same prompt keeps the same number of pairs however it is fed."""
        if any(layer.is_initialized for layer in self.layers) and prompt_tokens is not None:
            raise LessKVError("resolve_budget must come before the cache's first call")
        for layer in self.layers:
            layer.prompt_tokens = prompt_tokens

    @classmethod
    def from_pretrained(
        cls,
        kernels_dir: str,
        model: PreTrainedModel,
        budget: Budget | str | float | None = None,
        policy: str | None = None,
    ) -> LessCache:
        """The trained policy and budget unless overridden (kernels transfer across budgets)."""
        kernels = LessKernels.from_pretrained(kernels_dir, model)
        name = policy or kernels.meta.policy
        return cls(model, name, budget or kernels.meta.budget, kernels=kernels)

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    def memory_bytes(self) -> dict[str, int]:
        totals = {"kv": 0, "state": 0}
        for layer in self.layers:
            for key, value in layer.memory_bytes().items():
                totals[key] += value
        return totals
