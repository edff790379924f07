"""Merge slots: the assignment rule, its bookkeeping, and the parallel form against a loop."""

import math

import pytest
import torch

from lesskv.core.budget import merge_slots_in_state
from lesskv.core.merge import MergeSlots, merge_parallel, slot_attention
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError


def test_four_slots_fit_the_default_state():
    assert merge_slots_in_state(8, 64) == 4
    assert 4 * (2 * 64 + 1) * 4 <= 8 * (64 + 1) * 4  # bytes: slots <= LESS's state


def test_a_state_too_small_for_one_slot_is_refused():
    with pytest.raises(LessKVError, match="holds no merge slot"):
        merge_slots_in_state(1, 64)


def test_pairs_seed_empty_slots_then_join_the_most_similar():
    slots = MergeSlots.empty(1, 1, 2, 2, torch.device("cpu"))
    one = torch.ones(1, 1)
    for key in ([1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 3.0]):
        slots.absorb(torch.tensor([[key]]), torch.tensor([[key]]), one)
    assert slots.counts.tolist() == [[[2.0, 2.0]]]
    assert torch.allclose(slots.keys, torch.tensor([[[[1.9, 0.1], [0.2, 4.0]]]]))


def test_counts_sum_to_the_real_pairs_absorbed():
    torch.manual_seed(0)
    slots = MergeSlots.empty(2, 3, 4, 8, torch.device("cpu"))
    weights = (torch.rand(20, 2, 3) > 0.3).float()
    for w in weights:
        slots.absorb(torch.randn(2, 3, 8), torch.randn(2, 3, 8), w)
    assert torch.equal(slots.counts.sum(-1), weights.sum(0))


def test_a_slot_weighs_as_many_pairs_as_it_holds():
    """n identical pairs in one slot attend exactly like n kept copies of that pair."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 1, 1, 4), torch.randn(1, 1, 1, 1, 4), torch.randn(1, 1, 4)
    slots = MergeSlots.empty(1, 1, 1, 4, torch.device("cpu"))
    for _ in range(5):
        slots.absorb(k[:, :, 0, 0], v, torch.ones(1, 1))
    _, lse = slots.attend(q, 0.5)
    assert torch.allclose(lse, (q * k).sum(-1, keepdim=True) * 0.5 + math.log(5))


def test_empty_slots_give_zero_output_and_minus_infinity():
    out, lse = slot_attention(
        torch.randn(1, 1, 2, 3, 4),
        torch.zeros(1, 1, 1, 2, 4),
        torch.zeros(1, 1, 1, 2, 4),
        torch.zeros(1, 1, 1, 2),
        0.5,
    )
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_parallel_form_equals_replaying_the_evictions_step_by_step():
    torch.manual_seed(2)
    b, hkv, g, t, d = 2, 2, 2, 30, 8
    q, key, value = (
        torch.randn(b, hkv, g, t, d),
        torch.randn(b, hkv, t, d),
        torch.randn(b, hkv, t, d),
    )
    policy = make_policy("h2o", 8)
    logits = torch.randn(b, hkv, g, t, t).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")
    )
    steps = policy.eviction_steps(logits, policy.slots(t), t)
    out, lse = merge_parallel(q, key, value, steps, 3, 0.3)
    slots = MergeSlots.empty(b, hkv, 3, d, torch.device("cpu"))
    for i in range(t):
        evicted = steps == i  # exactly one pair per head once the budget is full
        if evicted.any():
            j = evicted.float().argmax(-1, keepdim=True)
            pick = j.unsqueeze(-1).expand(-1, -1, -1, d)
            weight = evicted.any(-1).float()
            slots.absorb(key.gather(2, pick)[:, :, 0], value.gather(2, pick)[:, :, 0], weight)
        step_out, step_lse = slots.attend(q[..., i : i + 1, :], 0.3)
        assert torch.allclose(out[..., i : i + 1, :], step_out, atol=1e-5)
        assert torch.allclose(lse[..., i : i + 1, :], step_lse, atol=1e-5)
