"""What a layer's kernels minimise on a batch of its stored activations: the MSE of the
output after ``o_proj`` (the paper's), the attention distribution's KL, both, or the output
error weighted by the NLL's gradient (:data:`LOSSES`)."""

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

# The relative MSE's weight beside the loss-weighted error in ``--loss weighted``: it only
# constrains each position's error along one direction, the MSE keeps the rest in check.
WEIGHTED_MSE = 0.1


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
    projected = _projected(kernels, o_proj, batch, kv_heads, sparse)
    return F.mse_loss(projected[:, budget:], batch["target"][:, budget:])


def _projected(
    kernels: StateForm | None,
    o_proj: nn.Module,
    batch: dict[str, torch.Tensor],
    kv_heads: int,
    sparse: str = "sparse_out",
) -> torch.Tensor:
    """``o_proj`` of the sparse output joined to the state's summary (``kernels``; None: the
    sparse output alone), ``(B, T, hidden)``."""
    query, key, value = batch["query"], batch["key"], batch["value"]
    b, hq, t, d = query.shape
    out = batch[sparse].view(b, kv_heads, hq // kv_heads, t, d)
    if kernels is not None:
        q = math_ops.group_queries(query, kv_heads)
        lse = batch["lse"].view(b, kv_heads, hq // kv_heads, t, 1)
        out = math_ops.join_summary(out, lse, kernels.parallel(q, key, value, batch["steps"]))
    # in fp32 whatever the model's dtype (the kernels and the stored activations are fp32)
    weight, bias = o_proj.weight.float(), None if o_proj.bias is None else o_proj.bias.float()
    return F.linear(out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d), weight, bias)


def layer_weighted(
    kernels: StateForm,
    o_proj: nn.Module,
    batch: dict[str, torch.Tensor],
    budget: int,
    kv_heads: int,
) -> torch.Tensor:
    """The error as the loss feels it: ``Σ_t (g_t·(o_proj(LESS)_t − target_t))²``, ``g`` the
    NLL's gradient at the layer's output with the plain policy running (each token's
    first-order loss change), relative to the plain policy's, plus a tenth of the relative
    MSE; at positions >= budget. Fitted to the MSE alone, a state removes error where the
    loss hardly looks (RESULTS §16, "What the loss feels")."""
    grad, target = batch["grad"][:, budget:], batch["target"][:, budget:]
    with torch.no_grad():
        plain = _projected(None, o_proj, batch, kv_heads)[:, budget:] - target
        scales = [(grad * plain).sum(-1).square().mean(), plain.square().mean()]
    error = _projected(kernels, o_proj, batch, kv_heads)[:, budget:] - target
    weighted = _share((grad * error).sum(-1).square().mean(), scales[0])
    return weighted + WEIGHTED_MSE * _share(error.square().mean(), scales[1])


def _share(loss: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """``loss`` as a share of the plain policy's: scale-free, where a layer's MSE alone spans
    10^4 across layers."""
    return loss / plain.clamp_min(torch.finfo(plain.dtype).tiny)


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
    """The share of the plain policy's output error left, plus the KL: both scale-free."""
    with torch.no_grad():
        sparse = layer_loss(None, o_proj, batch, budget, kv_heads)
    mse = layer_loss(kernels, o_proj, batch, budget, kv_heads)
    return _share(mse, sparse) + layer_kl(kernels, batch, budget, kv_heads, scale)


# What a layer's kernels can minimise, each called (kernels, o_proj, batch, budget, kv_heads,
# scale): the output MSE (the paper's), the attention distribution's KL (Hedgehog-style),
# both, or the loss-weighted error (ours; its stores hold the NLL's gradients). Checkpoints
# record which.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": lambda kernels, o_proj, batch, budget, kv, scale: layer_loss(
        kernels, o_proj, batch, budget, kv
    ),
    "kl": lambda kernels, o_proj, batch, budget, kv, scale: layer_kl(
        kernels, batch, budget, kv, scale
    ),
    "mse+kl": _mse_and_kl,
    "weighted": lambda kernels, o_proj, batch, budget, kv, scale: layer_weighted(
        kernels, o_proj, batch, budget, kv
    ),
}


def check_loss(kernels: StateForm, loss: str) -> None:
    """Refuse a loss the form cannot give: the KL needs a weight for every evicted pair, which
    the low-rank forms have (``φ(q)·ψ(k)``) and the others do not."""
    if loss in ("kl", "mse+kl") and not isinstance(kernels, LowRankForm):
        raise LessKVError(
            f"--loss {loss} needs each evicted pair's weight, which only the low-rank state "
            f"forms (decay, paper) give: use --loss mse for {type(kernels).__name__}"
        )
