"""The ``exp`` form: the paper's state ``(H, z)`` with exponential feature maps.

The learned ``decay`` form's φ and ψ are ``|MLP|``: smooth, so a query's read of the state,
``φ(q)·H / φ(q)·z``, mixes the R per-rank value means ``H_r / z_r`` gently, while the
per-layer probe finds that mean, not the mass, to be what the state gets wrong (docs/RESULTS.md
§16). Here (after Hedgehog's exp-family maps, Zhang et al., arXiv 2402.04347) both maps are
exponentials of a linear map per head:

    φ_r(q) = exp(q·W_r + b_r),    ψ_r(k) = exp(k·U_r + c_r)

so the read is a softmax over the ranks, ``softmax_r(q·W_r + b_r + log z_r)``, each rank a
pseudo-pair with value ``H_r / z_r`` and log-mass ``log z_r``: sharp where the query's
direction is, monotone in it as softmax attention is, and its mass ``Σ_r e^{q·W_r + b_r} z_r``
as spiky. The state, its memory (R·(D + 1) fp32 numbers per KV head), its fold and the
teacher-forced form are the paper's (:class:`~lesskv.core.forms.lowrank.LowRankForm`);
pairs fade with distance as in ``decay``. ``c`` starts at ``-log R``, so an untrained state
counts each evicted pair about once (a merge of them, not the plain policy).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lesskv.core.forms import DECAY_INIT, KernelShape, per_head_weight
from lesskv.core.forms.lowrank import LowRankForm

# The largest exponent a feature takes: φ·ψ stays below e^40 per pair (a logit of 40, more
# than any evicted pair's), so the teacher-forced prefix states (up to e^EXP_LIMIT = e^30 for
# the fade), summed over many pairs and read with φ, stay finite in fp32 (max e^88).
MAX_EXPONENT = 20.0


class ExpKernels(LowRankForm):
    """Learned exponential φ (per query head) and ψ (per KV head) and fade rates λ."""

    def __init__(self, shape: KernelShape) -> None:
        super().__init__(shape.kv_heads, shape.head_dim, shape.rank)
        self.shape = shape
        d, r = shape.head_dim, shape.rank
        self.phi_map = per_head_weight(shape.query_heads, d, r)
        self.phi_bias = nn.Parameter(torch.zeros(shape.query_heads, r))
        self.psi_map = per_head_weight(shape.kv_heads, d, r)
        self.psi_bias = nn.Parameter(torch.full((shape.kv_heads, r), -math.log(r)))
        self.decay = nn.Parameter(torch.full((shape.kv_heads,), math.sqrt(DECAY_INIT)))

    def decay_rate(self) -> torch.Tensor:
        return self.decay.square()

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        b, hkv, g, t, d = q.shape
        x = q.reshape(b, hkv * g, t, d).to(self.phi_map.dtype) @ self.phi_map
        return _exp(x + self.phi_bias.unsqueeze(-2)).view(b, hkv, g, t, -1)

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        return _exp(k.to(self.psi_map.dtype) @ self.psi_map + self.psi_bias.unsqueeze(-2))


def _exp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_max(MAX_EXPONENT).exp()
