"""LESS's running state while decoding: one step is fade, fold, read.

A decoding cache keeps each layer's state as its form's tensors
(:class:`~lesskv.core.forms.StateForm`, fp32). One decoding step of a LESS layer does all of
its state work in :func:`decode_step`: for the low-rank form about thirty one-token operations
(φ and ψ MLPs, the fade, the fold, the log-space join) whose cost is dispatch, not arithmetic.
:mod:`lesskv.core.decoding` runs it inside the layer's decoding attention, one compiled graph;
eager and compiled run the same code.
"""

from __future__ import annotations

import torch

from lesskv.core import math
from lesskv.core.forms import State, StateForm


def decode_step(
    form: StateForm,
    query: torch.Tensor,
    sparse_out: torch.Tensor,
    lse: torch.Tensor,
    evicted: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    state: State,
) -> torch.Tensor:
    """A LESS layer's whole state work for one decoding step: the state fades by one token,
    takes the pair the step evicted (``evicted`` = keys, values, weight, distance, as
    :meth:`~lesskv.core.forms.StateForm.fold` takes them), and is read with the query
    ``(B, Hkv, G, 1, D)`` and joined to the sparse output."""
    form.age(state, torch.ones(query.shape[0], device=query.device))
    form.fold(state, *evicted)
    return math.join_summary(sparse_out, lse, form.read(state, query))
