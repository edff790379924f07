"""Attention modules lesskv cannot drive as they are, one file per model family, each adapter
as small as the family allows (:class:`~lesskv.hf.adapters.base.Adapter`):

* Falcon (``falcon.py``) does not call transformers' attention interface: its own
  projections and RoPE, then lesskv's attention, then its own output projection;
* OPT (``opt.py``) calls it with a pre-scaled query: the same forward, the scale passed to the
  attention function instead;
* GPT-NeoX / Pythia (``gpt_neox.py``) and GPT-2 (``gpt2.py``) call it as lesskv needs and only
  lack attributes lesskv reads off standard modules (``head_dim``, ``num_key_value_groups``).

Nothing of the model's code is copied beyond the head layout; the K/V cache is the one the
model passes (a LessCache evicts for real). What each family refuses, and why, is in its file.
"""

from __future__ import annotations

import types

from torch import nn
from transformers import PreTrainedModel

from lesskv.hf.adapters import falcon, gpt2, gpt_neox, opt
from lesskv.hf.adapters.base import ATTN_NAME, Adapter

__all__ = ["ADAPTERS", "ATTN_NAME", "Adapter", "is_adapted", "prepare"]

# Module type -> its adapter, gathered from the family files.
ADAPTERS: dict[type[nn.Module], Adapter] = {
    **falcon.ADAPTERS,
    **gpt_neox.ADAPTERS,
    **gpt2.ADAPTERS,
    **opt.ADAPTERS,
}


def prepare(model: PreTrainedModel) -> None:
    """Give every attention module of an adapted type its adapter (once): the attributes
    lesskv reads off standard modules and, where the family needs one, its forward."""
    for module in model.modules():
        adapter = ADAPTERS.get(type(module))
        if adapter is None or getattr(module, "lesskv_prepared", False):
            continue
        adapter.prepare(module)  # refuses first, so a refused module is left untouched
        if adapter.forward is not None:
            module.forward = types.MethodType(adapter.forward, module)
        module.lesskv_adapter = adapter.keeps_implementation
        module.lesskv_prepared = True


def is_adapted(model: PreTrainedModel) -> bool:
    """Whether ``model`` runs lesskv's attention through adapters that call it whatever its
    config says (its config then keeps its own attention implementation: such models cannot
    switch it)."""
    return any(getattr(m, "lesskv_adapter", False) for m in model.modules())
