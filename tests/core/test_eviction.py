"""The eviction loops and their blocked attention against the reference: the policy's Python
simulation over T x T logits, then a masked softmax. One matrix over every policy and every
loop: numba's (the CPU), and the torch slot loop (any device) eager and compiled."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lesskv.core import eviction, math
from lesskv.core.policies import POLICIES, keep_mask_from_steps, make_policy


def inputs(b=2, hkv=2, g=3, t=80, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv, g, t, d, generator=generator) * 1.5
    key = torch.randn(b, hkv, t, d, generator=generator)
    value = torch.randn(b, hkv, t, d, generator=generator)
    return q, key, value, d**-0.5


@pytest.fixture(params=["numba", "torch", "torch-compiled"])
def loop(request, monkeypatch):
    """Which loop scores the rows: the torch loops run here by taking numba away."""
    if request.param != "numba":
        monkeypatch.setattr(eviction, "_KERNEL", None)
    compiled = request.param == "torch-compiled"
    monkeypatch.setattr(eviction, "_compiles", lambda device: compiled)
    return request.param


def reference(policy, slots, q, key, value, scale):
    t = key.shape[2]
    logits = math.causal_logits(q, key, scale) if policy.uses_attention else None
    steps = policy.eviction_steps(logits, slots, t).expand(*key.shape[:2], t)
    out, lse = math.sparse_attention(q, key, value, keep_mask_from_steps(steps)[:, :, None], scale)
    return out, lse, steps


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize(("t", "budget", "block"), [(80, 12, 2**22), (80, 12, 700), (33, 8, 1)])
def test_steps_are_identical_and_outputs_equal_the_reference(
    name, t, budget, block, loop, monkeypatch
):
    """Blocks of every size (one row at a time included) give the same steps and outputs."""
    monkeypatch.setattr(eviction, "BLOCK_ELEMENTS", block)
    policy = make_policy(name, budget)
    slots = policy.slots(t)
    q, key, value, scale = inputs(t=t)
    assert eviction.fused_applies(policy, q, key, value)
    out, lse, steps = eviction.policy_attention(policy, slots, q, key, value, scale)
    ref_out, ref_lse, ref_steps = reference(policy, slots, q, key, value, scale)
    assert torch.equal(steps, ref_steps)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_budget_covering_the_sequence_is_causal_attention(name):
    policy = make_policy(name, 64)
    q, key, value, scale = inputs(t=40)
    out, lse, steps = eviction.policy_attention(policy, policy.slots(40), q, key, value, scale)
    full_out, full_lse = math.causal_attention(q, key, value, scale)
    assert (steps == 40).all()
    assert torch.allclose(out, full_out, atol=1e-5) and torch.allclose(lse, full_lse, atol=1e-5)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_16_bit_inputs_are_simulated_in_float32(name, loop):
    """bf16 tensors (a GPU model's) take the blocked path: the reference's steps and outputs
    on the same values in fp32, returned in fp32 (the caller casts)."""
    policy = make_policy(name, 12)
    slots = policy.slots(60)
    q, key, value, scale = (t.bfloat16() if torch.is_tensor(t) else t for t in inputs(t=60))
    assert eviction.fused_applies(policy, q, key, value)
    out, lse, steps = eviction.policy_attention(policy, slots, q, key, value, scale)
    ref_out, ref_lse, ref_steps = reference(
        policy, slots, q.float(), key.float(), value.float(), scale
    )
    assert out.dtype == torch.float32
    assert torch.equal(steps, ref_steps)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_other_conditions_take_the_reference_path():
    policy = make_policy("h2o", 8)
    q, key, value, _ = inputs(t=16)
    assert not eviction.fused_applies(policy, q.double(), key.double(), value.double())
    assert not eviction.fused_applies(policy, q, key, value, window=8)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_gradients_equal_the_references(name, loop, monkeypatch):
    """Training through the blocked form: the same gradients as autograd through the T x T
    reference, for a loss on the output and on the log-sum-exp (LESS's combination uses it)."""
    monkeypatch.setattr(eviction, "BLOCK_ROWS", 16)  # several blocks, each row sees few keys
    policy = make_policy(name, 12)
    slots = policy.slots(50)
    weights = torch.randn(2, 2, 3, 50, 16), torch.randn(2, 2, 3, 50, 1)
    grads = []
    for form in (eviction.policy_attention, reference):
        q, key, value, scale = (
            t.requires_grad_() if torch.is_tensor(t) else t for t in inputs(t=50)
        )
        out, lse, _ = form(policy, slots, q, key, value, scale)
        ((out * weights[0]).sum() + (lse * weights[1]).sum()).backward()
        grads.append((q.grad, key.grad, value.grad))
    for fused, expected in zip(*grads, strict=True):
        assert torch.allclose(fused, expected, atol=1e-4), (fused - expected).abs().max()


class LargestTensor(TorchDispatchMode):
    """Records the most elements any operation returned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.most = max(self.most, tensor.numel())
        return out


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_tensor_grows_with_the_square_of_the_sequence(name, loop, monkeypatch):
    """The point of the blocked form: at 1024 tokens and a 64-token budget, no tensor holds
    even a quarter of one head's ``T x T`` logits (the reference builds ``G x T x T``)."""
    if loop == "torch-compiled":
        pytest.skip("compiled code allocates inside its kernels, out of the mode's sight")
    monkeypatch.setattr(eviction, "BLOCK_ROWS", 32)
    policy = make_policy(name, 64)
    q, key, value, scale = inputs(b=1, hkv=1, g=2, t=1024, d=8)
    with LargestTensor() as largest:
        eviction.policy_attention(policy, policy.slots(1024), q, key, value, scale)
    assert largest.most < 1024 * 1024 // 4, largest.most
