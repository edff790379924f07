"""What a method is: how one layer runs it in the parallel form, which cache decodes with it,
and what memory it spends per KV head. One subclass per method, one file each; the registry
(:mod:`lesskv.hf.methods`) finds them and maps names to instances, so nothing else branches on
a name."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from lesskv.core.policies import Policy
from lesskv.hf.attention import LayerSetup
from lesskv.hf.cache import LessCache
from lesskv.hf.modules import attention_modules

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lesskv.hf.checkpoint import LessKernels

PAIR_SUMMARY_BYTES = 4  # the summaries of evicted pairs are fp32


class Method:
    """A sparse method by default: the policy's budget, nothing summarising the evicted
    pairs. Subclasses say what they add."""

    name: ClassVar[str]
    order: ClassVar[int]  # where help texts and tables list it: the reference first
    summary: ClassVar[str]  # one line, for help texts and tables
    sparse: ClassVar[bool] = True  # False: the model's own attention, no policy
    needs_kernels: ClassVar[bool] = False

    def extra_tokens(self, rank: int, head_dim: int) -> int:
        """Pairs kept per KV head on top of the policy's budget."""
        return 0

    def merge_slots(self, rank: int, head_dim: int) -> int:
        """Merge slots per KV head summarising the evicted pairs."""
        return 0

    def state_bytes(self, rank: int, head_dim: int) -> int:
        """fp32 bytes per KV head summarising the evicted pairs (merge slots by default: key
        sum, value sum and count each)."""
        return self.merge_slots(rank, head_dim) * (2 * head_dim + 1) * PAIR_SUMMARY_BYTES

    def kept_tokens(self, policy: Policy, seq_len: int, head_dim: int, rank: int) -> int:
        """KV pairs per head this method keeps for a ``seq_len``-token sequence."""
        return min(seq_len, policy.slots(seq_len, self.extra_tokens(rank, head_dim)).total)

    def layer_setup(
        self, policy: Policy, module: nn.Module, kernels: nn.Module | None, rank: int
    ) -> LayerSetup | None:
        """The setup of attention layer ``module`` in the parallel form (``kernels``: that
        layer's; None: full attention)."""
        return LayerSetup(
            policy=policy,
            extra_tokens=self.extra_tokens(rank, module.head_dim),
            merge_slots=self.merge_slots(rank, module.head_dim),
        )

    def cache(
        self,
        model: PreTrainedModel,
        policy: Policy,
        kernels: LessKernels | None,
        rank: int,
        options: dict,
    ) -> LessCache | None:
        """The cache that decodes with this method (``options``: its step options)."""
        head_dim = attention_modules(model)[0].head_dim
        return LessCache(
            model,
            policy,
            extra_tokens=self.extra_tokens(rank, head_dim),
            merge_slots=self.merge_slots(rank, head_dim),
            **options,
        )

    def labels(self, policy: Policy | None) -> dict[str, str]:
        """The ``policy`` and ``budget`` columns of a result row."""
        if policy is None or not self.sparse:
            return {"policy": "none", "budget": ""}
        return {"policy": policy.name, "budget": str(policy.budget)}
