"""The LESS math against direct formulas, and the parallel form against the recurrent one."""

import pytest
import torch
import torch.nn.functional as F

from lesskv.core import math
from lesskv.core.policies import keep_mask_from_steps


def random_inputs(b=2, hkv=2, g=3, t=10, d=8, r=4, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, hkv, g, t, d)
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    phi, psi = torch.rand(b, hkv, g, t, r), torch.rand(b, hkv, t, r)
    return q, k, v, phi, psi


def causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def combine(out, lse, num, den):
    """LESS's output: the sparse part joined with the low-rank terms' mean and mass."""
    return math.join_attention(out, lse, *math.state_summary(num, den))


def test_sparse_attention_with_causal_mask_equals_sdpa():
    q, k, v, *_ = random_inputs()
    b, hkv, g, t, d = q.shape
    out, _ = math.sparse_attention(q, k, v, causal(t), d**-0.5)
    ref = F.scaled_dot_product_attention(
        q.reshape(b, hkv * g, t, d),
        k.repeat_interleave(g, 1),
        v.repeat_interleave(g, 1),
        is_causal=True,
    )
    assert torch.allclose(out.reshape(b, hkv * g, t, d), ref, atol=1e-6)


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sparse_attention_equals_the_reference_softmax(g, dtype):
    """The fused CPU kernel (no autograd) and the reference softmax (autograd) agree, rows
    with nothing kept included (output 0, lse -inf)."""
    q, k, v, *_ = (x.to(dtype) for x in random_inputs(g=g, t=12))
    keep = torch.rand(2, 2, 1, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.5
    keep &= causal(12)
    keep[..., 2, :] = False
    with torch.no_grad():
        fused = math.sparse_attention(q, k, v, keep, 0.3)
    q.requires_grad_(True)
    reference = math.sparse_attention(q, k, v, keep, 0.3)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bf16 softmax: ~3 digits
    for got, expected in zip(fused, reference, strict=True):
        assert got.dtype == expected.dtype == dtype
        assert torch.allclose(got.float(), expected.detach().float(), atol=tolerance)
    assert fused[1][..., 2, :].eq(math.NEG_INF).all()


def test_combination_equals_the_naive_formula():
    q, k, v, phi, psi = random_inputs()
    b, hkv, g, t, d = q.shape
    torch.manual_seed(1)
    steps = torch.randperm(t).add(1).expand(b, hkv, t).clone()  # token j leaves at steps[j]
    steps = torch.maximum(steps, torch.arange(t) + 1).clamp(max=t)  # not before it arrives
    keep = keep_mask_from_steps(steps).unsqueeze(2)
    evicted = causal(t) & ~keep
    out, lse = math.sparse_attention(q, k, v, keep, d**-0.5)
    num, den = math.lowrank_parallel(phi, psi, v, steps)
    got = combine(out, lse, num, den)

    expected = torch.empty_like(got)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (b, hkv, g, t))):
        bi, h, gi, i = idx.tolist()
        weights = torch.exp(q[bi, h, gi, i] @ k[bi, h].T / d**0.5) * keep[bi, h, 0, i]
        lin = (phi[bi, h, gi, i] @ psi[bi, h].T) * evicted[bi, h, 0, i]
        expected[bi, h, gi, i] = (weights @ v[bi, h] + lin @ v[bi, h]) / (weights.sum() + lin.sum())
    assert torch.allclose(got, expected, atol=1e-5)


def random_steps(b, hkv, t, seed=1):
    torch.manual_seed(seed)
    steps = torch.randperm(t).add(1).expand(b, hkv, t).clone()  # token j leaves at steps[j]
    return torch.maximum(steps, torch.arange(t) + 1).clamp(max=t)  # not before it arrives


@pytest.mark.parametrize("block", [1, 5, None])  # queries per block: any size gives the same
@pytest.mark.parametrize("rates", [None, [0.05, 0.0], [3.0, 40.0]])  # 40: blocks of one query
def test_decayed_state_equals_the_naive_formula(rates, block):
    q, k, v, phi, psi = random_inputs(t=12)
    steps = random_steps(2, 2, 12)
    steps[1, 0] = torch.arange(12).add(1).clamp(max=12)  # heads evict at different paces
    decay = torch.tensor(rates) if rates is not None else None
    num, den = math.lowrank_parallel(phi, psi, v, steps, decay, block=block)
    rates = rates or [0.0, 0.0]
    pos = torch.arange(12)
    evicted = steps.unsqueeze(-2) <= pos.view(12, 1)  # (B, Hkv, i, j): j evicted by step i
    distance = (pos.view(12, 1) - pos).clamp_min(0)
    weights = torch.exp(-torch.tensor(rates).view(2, 1, 1) * distance) * evicted
    lin = torch.einsum("bhgir,bhjr->bhgij", phi, psi) * weights.unsqueeze(2)
    assert torch.allclose(num, lin @ v.unsqueeze(2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(den, lin.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [1, 5, None])
@pytest.mark.parametrize("rates", [None, [0.05, 3.0]])
def test_prefix_states_of_any_features_are_the_naive_sums(rates, block):
    """Each query reads Σ_j w_j ⊗ p_j over the pairs evicted by its step, faded, for features
    of any width: what every state form's teacher-forced form builds on."""
    torch.manual_seed(2)
    weights, payload = torch.randn(2, 2, 12, 3), torch.randn(2, 2, 12, 5)
    steps = random_steps(2, 2, 12)
    decay = torch.tensor(rates) if rates is not None else None

    def read(states, rows, fade):  # every query's whole state, faded on to it
        states = states if fade is None else states * fade[:, :, 0, :, :, None]
        return (states.flatten(-2).unsqueeze(2),)

    (got,) = math.prefix_states(weights, payload, steps, read, decay, block=block)
    pos = torch.arange(12)
    evicted = steps.unsqueeze(-2) <= pos.view(12, 1)  # (B, Hkv, i, j)
    fade = torch.exp(-torch.tensor(rates or [0.0, 0.0]).view(2, 1, 1) * (pos.view(12, 1) - pos))
    w = (evicted * fade).float()
    want = torch.einsum("bhij,bhjf,bhjp->bhifp", w, weights, payload).flatten(-2).unsqueeze(2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_zero_decay_is_the_papers_state_exactly():
    _, _, v, phi, psi = random_inputs()
    steps = random_steps(2, 2, 10)
    paper = math.lowrank_parallel(phi, psi, v, steps)
    assert all(map(torch.equal, paper, math.lowrank_parallel(phi, psi, v, steps, torch.zeros(2))))


def test_without_lowrank_mass_the_combination_is_the_sparse_output():
    q, k, v, phi, psi = random_inputs()
    out, lse = math.sparse_attention(q, k, v, causal(q.shape[3]), q.shape[-1] ** -0.5)
    never = torch.full((2, 2, q.shape[3]), q.shape[3])
    num, den = math.lowrank_parallel(phi, psi, v, never)
    assert torch.equal(combine(out, lse, num, den), out)


def test_recurrent_state_equals_parallel_rows():
    q, k, v, phi, psi = random_inputs(t=6)
    steps = torch.tensor([5, 4, 5, 6, 6, 6]).expand(2, 2, 6)  # by step 5, tokens 0..2 are out
    num_p, den_p = math.lowrank_parallel(phi, psi, v, steps)
    state_h = torch.einsum("bhtr,bhtd->bhrd", psi[:, :, :3], v[:, :, :3])
    state_z = psi[:, :, :3].sum(2)
    num_r, den_r = math.lowrank_recurrent(phi[..., 5:6, :], state_h, state_z)
    assert torch.allclose(num_p[..., 5:6, :], num_r, atol=1e-6)
    assert torch.allclose(den_p[..., 5:6, :], den_r, atol=1e-6)


def test_rows_with_nothing_visible_give_zeros_not_nan():
    q, k, v, phi, psi = random_inputs()
    nothing = torch.zeros(1, dtype=torch.bool)
    out, lse = math.sparse_attention(q, k, v, nothing, 1.0)
    num, den = math.lowrank_parallel(phi, psi, v, torch.full((2, 2, 10), 10))
    got = combine(out, lse, num, den)
    assert not got.isnan().any() and torch.equal(got, torch.zeros_like(got))


def test_gradients_flow_through_the_join_without_nan():
    q, k, v, phi, psi = random_inputs()
    phi.requires_grad_(True)
    psi.requires_grad_(True)
    steps = (torch.arange(10) + 4).clamp(max=10).expand(2, 2, 10)  # keep the last 4
    keep = keep_mask_from_steps(steps).unsqueeze(2)
    out, lse = math.sparse_attention(q, k, v, keep, q.shape[-1] ** -0.5)
    num, den = math.lowrank_parallel(phi, psi, v, steps)
    combine(out, lse, num, den).sum().backward()
    assert phi.grad.isfinite().all() and psi.grad.isfinite().all()
    assert phi.grad.abs().sum() > 0


@pytest.mark.parametrize("grad", [False, True], ids=["in-place", "autograd"])
def test_attention_from_logits_is_the_masked_softmax_attention(grad):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 5, 6, requires_grad=grad)
    keep = torch.rand(2, 2, 1, 5, 6) > 0.4
    keep[0, 0, 0, 1] = False  # a row with nothing kept
    value = torch.randn(2, 2, 6, 4)
    probs, want_lse = math.masked_softmax(logits, keep)
    want = torch.einsum("bhgqk,bhkd->bhgqd", probs, value)
    source = logits if grad else logits.detach().clone()
    out, lse = math.attention_from_logits(source, keep, value)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert out[0, 0, :, 1].abs().sum() == 0 and torch.isneginf(lse[0, 0, :, 1]).all()
    if grad:  # autograd needs the logits: they are left as they were
        out.sum().backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
