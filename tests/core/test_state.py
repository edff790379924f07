"""LESS's decoding state: one step is fade, fold, read; and, for every state form, the fold
and read of a prompt's chunks agree with decoding's."""

import pytest
import torch

from lesskv.core import state
from lesskv.core.kernels import FORMS, KernelShape, LayerKernels, make_kernels


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


def _trained_like(form: str):
    kernels = make_kernels(KernelShape(6, 2, 16, rank=4, hidden=8, state=form)).eval()
    with torch.no_grad():
        for p in kernels.parameters():
            p.normal_(0, 0.3)
    return kernels


@pytest.mark.parametrize("form", sorted(FORMS))
def test_pairs_folded_at_once_equal_pairs_folded_as_they_left(form):
    """A prompt's compression folds many pairs at once, each at its distance; decoding folds
    one per step and ages the state in between: the same state."""
    torch.manual_seed(3)
    kernels = _trained_like(form)
    keys, values = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    weight = torch.ones(2, 2, 5)
    weight[1, :, 2] = 0  # padding
    one_by_one = kernels.empty(2, torch.device("cpu"))
    with torch.no_grad():
        for j in range(5):
            if j:
                kernels.age(one_by_one, torch.ones(2))
            pair = slice(j, j + 1)
            zero = torch.zeros(2, 2, 1)
            kernels.fold(one_by_one, keys[:, :, pair], values[:, :, pair], weight[..., pair], zero)
        at_once = kernels.empty(2, torch.device("cpu"))
        kernels.fold(at_once, keys, values, weight, (4 - torch.arange(5)).expand(2, 2, 5))
    for a, b in zip(one_by_one, at_once, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_reading_ahead_is_reading_the_state_aged_so_far(form):
    """A prompt chunk's query ``a`` tokens after the state's last age reads what decoding
    would read once the state has aged ``a`` tokens."""
    torch.manual_seed(4)
    kernels = _trained_like(form)
    held = kernels.empty(2, torch.device("cpu"))
    query = torch.randn(2, 2, 3, 4, 16)
    ahead = torch.tensor([[1, 2, 2, 5], [0, 1, 3, 4]])
    with torch.no_grad():
        kernels.fold(
            held,
            torch.randn(2, 2, 6, 16),
            torch.randn(2, 2, 6, 16),
            torch.ones(2, 2, 6),
            torch.randint(0, 9, (2, 2, 6)),
        )
        out, lse = kernels.read(held, query, ahead=ahead)
        for row in range(4):
            aged = tuple(t.clone() for t in held)
            kernels.age(aged, ahead[:, row])
            want_out, want_lse = kernels.read(aged, query[..., row : row + 1, :])
            torch.testing.assert_close(out[..., row : row + 1, :], want_out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[..., row : row + 1, :], want_lse, rtol=1e-5, atol=1e-5)
