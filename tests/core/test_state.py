"""LESS's decoding state: one step is fade, fold, read."""

import torch

from lesskv.core import state
from lesskv.core.kernels import KernelShape, LayerKernels


def _step_inputs(batch=2, kv_heads=2, groups=3, dim=16, seed=0):
    torch.manual_seed(seed)
    kernels = LayerKernels(KernelShape(kv_heads * groups, kv_heads, dim, rank=4, hidden=8)).eval()
    with torch.no_grad():
        for p in kernels.parameters():
            p.normal_(0, 0.3)  # far from the 1e-4 start, so every term matters
    query = torch.randn(batch, kv_heads, groups, 1, dim)
    sparse_out = torch.randn(batch, kv_heads, groups, 1, dim)
    lse = torch.randn(batch, kv_heads, groups, 1, 1)
    evicted = (
        torch.randn(batch, kv_heads, 1, dim),
        torch.randn(batch, kv_heads, 1, dim),
        torch.tensor([1.0, 0.0])[:batch].view(batch, 1, 1).expand(batch, kv_heads, 1),
        torch.randint(1, 50, (batch, kv_heads, 1)),
    )
    held = (torch.rand(batch, kv_heads, 4, dim), torch.rand(batch, kv_heads, 4))
    return kernels, query, sparse_out, lse, evicted, held


def test_the_step_is_fade_then_fold_then_read():
    kernels, query, out, lse, (key, value, weight, distance), (h, z) = _step_inputs()
    held = h.clone(), z.clone()
    with torch.no_grad():
        got = state.decode_step(kernels, query, out, lse, (key, value, weight, distance), held)
        fade = torch.exp(-kernels.decay_rate())[None, :, None]  # one token: (1, Hkv, 1)
        w = weight * torch.exp(-kernels.decay_rate()[None, :, None] * distance)
        psi = kernels.psi(key) * w.unsqueeze(-1)  # (B, Hkv, 1, R)
        want_h = h * fade.unsqueeze(-1) + psi.transpose(-1, -2) @ value
        want_z = z * fade + psi[:, :, 0]
        phi = kernels.phi(query)  # (B, Hkv, G, 1, R)
        num = phi @ want_h.unsqueeze(2)
        den = phi @ want_z[:, :, None, :, None]
        want = (lse.exp() * out + num) / (lse.exp() + den)
    torch.testing.assert_close(held[0], want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(held[1], want_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
