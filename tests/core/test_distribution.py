"""LESS's implied attention distribution is the one its output is made of, and the KL to the
true distribution behaves as a divergence (0 with nothing evicted, blocks agree, gradients
reach the kernels)."""

import pytest
import torch

from lesskv.core import math
from lesskv.core.distribution import attention_kl, implied_distributions
from lesskv.core.kernels import KernelShape, LayerKernels
from lesskv.core.policies import make_policy


def setting(t=48, seed=0):
    torch.manual_seed(seed)
    b, hkv, g, d = 2, 2, 3, 16
    q, key, value = (
        torch.randn(b, hkv, g, t, d),
        torch.randn(b, hkv, t, d),
        torch.randn(b, hkv, t, d),
    )
    policy = make_policy("h2o", 10)
    steps = policy.eviction_steps(math.causal_logits(q, key, d**-0.5), policy.slots(t), t)
    kernels = LayerKernels(KernelShape(hkv * g, hkv, d, rank=4, hidden=16, dropout=0.0))
    with torch.no_grad():
        kernels.psi_scale.fill_(2.0)
        kernels.decay.fill_(0.2)
    return q, key, value, steps.expand(b, hkv, t).contiguous(), kernels, d**-0.5


def test_less_output_is_the_implied_distribution_times_the_values():
    q, key, value, steps, kernels, scale = setting()
    phi, psi, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
    _, log_q = implied_distributions(q, key, steps, phi, psi, decay, scale)
    out, lse = math.sparse_attention(q, key, value, math_keep(steps), scale)
    less = math.join_summary(out, lse, kernels.parallel(q, key, value, steps))
    implied = torch.einsum("bhgts,bhsd->bhgtd", log_q.exp(), value)
    assert (implied - less).abs().max().item() < 1e-4


def math_keep(steps):
    t = steps.shape[-1]
    pos = torch.arange(t)
    return ((pos[None, :] <= pos[:, None]) & (pos[:, None] < steps[..., None, :])).unsqueeze(2)


def test_kl_is_zero_without_eviction_and_positive_with_it():
    q, key, _, steps, kernels, scale = setting()
    phi, psi, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
    never = torch.full_like(steps, key.shape[2])
    assert attention_kl(q, key, never, phi, psi, decay, scale).item() == pytest.approx(0, abs=1e-6)
    assert attention_kl(q, key, steps, phi, psi, decay, scale).item() > 1e-3


def test_blocks_agree_and_gradients_reach_the_kernels():
    q, key, _, steps, kernels, scale = setting()
    values = []
    for block in (1, 7, 1000):
        kernels.zero_grad()
        phi, psi, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
        kl = attention_kl(q, key, steps, phi, psi, decay, scale, 10, block)
        kl.backward()
        values.append((kl.item(), kernels.psi_scale.grad.clone()))
    for kl, grad in values[1:]:
        assert kl == pytest.approx(values[0][0], rel=1e-5)
        assert grad == pytest.approx(values[0][1], rel=1e-4, abs=1e-7)
    assert values[0][1].abs().sum() > 0
