"""The slots form: its size, the mass and mean it claims where they are exact, and gradients
that stay finite where nothing is evicted yet."""

import torch

from lesskv.core import math
from lesskv.core.forms import KernelShape
from lesskv.core.forms.slots import SlotsForm
from lesskv.core.policies import keep_mask_from_steps


def test_the_slots_fit_in_a_rank_r_state():
    form = SlotsForm(KernelShape(9, 3, 64))  # SmolLM2's layout at the default rank 8
    assert form.slots == 4 and form.nbytes == 4 * 129 * 4 <= 8 * 65 * 4
    (state,) = form.empty(2, torch.device("cpu"))
    assert state.shape == (2, 3, 4, 129) and state.dtype == torch.float32


def test_slots_of_equal_keys_claim_the_exact_mass_and_mean():
    """With β = 0, τ the layer's scale and no fade, pairs sharing one key are claimed exactly:
    their mass ``n·exp(τ q·k)`` and the mean of their values, whatever the assignment."""
    b, hkv, g, t, d = 1, 2, 3, 16, 8
    form = SlotsForm(KernelShape(hkv * g, hkv, d, rank=4))
    with torch.no_grad():
        form.decay.zero_()
        form.assign.normal_()  # shares far from uniform
    torch.manual_seed(0)
    q, v = torch.randn(b, hkv, g, t, d), torch.randn(b, hkv, t, d)
    k = torch.randn(b, hkv, 1, d).expand(b, hkv, t, d)
    steps = (torch.arange(t) + 4).clamp(max=t).expand(b, hkv, t)  # keep the newest 4
    out, lse = form.parallel(q, k, v, steps)
    evicted = torch.ones(t, t, dtype=torch.bool).tril() & ~keep_mask_from_steps(steps)
    want_out, want_lse = math.sparse_attention(q, k, v, evicted.unsqueeze(2), d**-0.5)
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    assert lse[..., :4, :].eq(math.NEG_INF).all() and out[..., :4, :].eq(0).all()


def test_gradients_are_finite_where_nothing_is_evicted_yet():
    b, hkv, g, t, d = 2, 2, 2, 12, 8
    form = SlotsForm(KernelShape(hkv * g, hkv, d, rank=4))
    torch.manual_seed(1)
    q, k, v = torch.randn(b, hkv, g, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    out, lse = torch.randn(b, hkv, g, t, d), torch.randn(b, hkv, g, t, 1)
    steps = (torch.arange(t) + 6).clamp(max=t).expand(b, hkv, t)  # rows 0..5: nothing evicted
    math.join_summary(out, lse, form.parallel(q, k, v, steps)).square().sum().backward()
    for name, parameter in form.named_parameters():
        assert parameter.grad.isfinite().all(), name
    assert form.assign.grad.abs().sum() > 0 and form.read_bias.grad.abs().sum() > 0
