"""What a layer's kernels minimise on a batch of its stored activations: the MSE of the
output after ``o_proj`` (the paper's), the attention distribution's KL, or both (:data:`LOSSES`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lesskv.core import math as math_ops
from lesskv.core.distribution import attention_kl
from lesskv.core.forms import StateForm
from lesskv.core.forms.lowrank import LowRankForm
from lesskv.errors import LessKVError


def layer_loss(
    kernels: StateForm | None,
    o_proj: nn.Module,
    batch: dict[str, torch.Tensor],
    budget: int,
    kv_heads: int,
    sparse: str = "sparse_out",
) -> torch.Tensor:
    """MSE of ``o_proj(LESS output)`` against the true output, at positions >= budget.

    ``kernels=None`` scores a sparse output alone: ``sparse="plus_out"`` is Baseline+.
    """
    query, key, value = batch["query"], batch["key"], batch["value"]
    b, hq, t, d = query.shape
    out = batch[sparse].view(b, kv_heads, hq // kv_heads, t, d)
    if kernels is not None:
        q = math_ops.group_queries(query, kv_heads)
        lse = batch["lse"].view(b, kv_heads, hq // kv_heads, t, 1)
        out = math_ops.join_summary(out, lse, kernels.parallel(q, key, value, batch["steps"]))
    # in fp32 whatever the model's dtype (the kernels and the stored activations are fp32)
    weight, bias = o_proj.weight.float(), None if o_proj.bias is None else o_proj.bias.float()
    projected = F.linear(
        out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d), weight, bias
    )
    return F.mse_loss(projected[:, budget:], batch["target"][:, budget:])


def layer_kl(
    kernels: StateForm,
    batch: dict[str, torch.Tensor],
    budget: int,
    kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """KL between each query's true attention weights and LESS's implied ones
    (:func:`lesskv.core.distribution.attention_kl`), at positions >= budget."""
    check_loss(kernels, "kl")
    q = math_ops.group_queries(batch["query"], kv_heads)
    key = batch["key"]
    phi_q, psi_k, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
    return attention_kl(q, key, batch["steps"], phi_q, psi_k, decay, scale, start=budget)


def _mse_and_kl(kernels, o_proj, batch, budget, kv_heads, scale) -> torch.Tensor:
    """The share of the plain policy's output error left, plus the KL: both scale-free, where
    a layer's MSE alone spans 10^4 across layers."""
    with torch.no_grad():
        sparse = layer_loss(None, o_proj, batch, budget, kv_heads)
    mse = layer_loss(kernels, o_proj, batch, budget, kv_heads)
    return mse / sparse.clamp_min(torch.finfo(sparse.dtype).tiny) + layer_kl(
        kernels, batch, budget, kv_heads, scale
    )


# What a layer's kernels can minimise, each called (kernels, o_proj, batch, budget, kv_heads,
# scale): the output MSE (the paper's), the attention distribution's KL (Hedgehog-style), or
# both. Checkpoints record which.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": lambda kernels, o_proj, batch, budget, kv, scale: layer_loss(
        kernels, o_proj, batch, budget, kv
    ),
    "kl": lambda kernels, o_proj, batch, budget, kv, scale: layer_kl(
        kernels, batch, budget, kv, scale
    ),
    "mse+kl": _mse_and_kl,
}


def check_loss(kernels: StateForm, loss: str) -> None:
    """Refuse a loss the form cannot give: the KL needs a weight for every evicted pair, which
    the low-rank forms have (``φ(q)·ψ(k)``) and the others do not."""
    if loss != "mse" and not isinstance(kernels, LowRankForm):
        raise LessKVError(
            f"--loss {loss} needs each evicted pair's weight, which only the low-rank state "
            f"forms (decay, paper) give: use --loss mse for {type(kernels).__name__}"
        )
