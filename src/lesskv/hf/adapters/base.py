"""What every adapter shares: the name lesskv's attention is registered under and the shape of
one adapter. Kept apart from the package's ``__init__`` so that the family modules can import
it while ``__init__`` imports them (no cycle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

ATTN_NAME = "less"  # the name lesskv's attention is registered under (lesskv.hf.attention)


@dataclass(frozen=True)
class Adapter:
    """How lesskv drives one attention module type.

    ``prepare`` refuses (LessKVError) a configuration lesskv cannot run exactly, then gives the
    module the attributes lesskv reads off standard modules (``head_dim``,
    ``num_key_value_groups``, ``scaling``). ``forward``, if any, replaces the module's own.
    ``keeps_implementation``: the forward calls lesskv's attention whatever the config's
    attention implementation says (the model then keeps its own and cannot switch it);
    otherwise the model switches to lesskv's implementation like any standard model.
    """

    prepare: Callable[[nn.Module], None]
    forward: Callable | None = None
    keeps_implementation: bool = False
