"""One test matrix over every policy: the keep-mask must be what real decoding would keep."""

import pytest
import torch

from lesskv.core.policies import H2O, POLICIES, LambdaShape, Policy, make_policy
from lesskv.errors import LessKVError

T = 48


def causal_logits(b=2, hkv=2, g=3, t=T, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(b, hkv, g, t, t) * 2
    return logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))


@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    return make_policy(request.param, 12)


def test_rows_keep_exactly_the_budget(policy):
    slots = policy.slots(T)
    mask = policy.keep_mask(causal_logits(), slots, T)
    counts = mask.sum(-1)
    expected = torch.arange(T).add(1).clamp(max=slots.total)
    assert torch.equal(counts, expected.expand_as(counts))


def test_mask_is_causal_and_full_before_budget_fills(policy):
    slots = policy.slots(T)
    mask = policy.keep_mask(causal_logits(), slots, T)
    assert not mask.triu(1).any()
    assert mask[..., : slots.total, : slots.total].equal(
        torch.ones(slots.total, slots.total, dtype=torch.bool)
        .tril()
        .expand_as(mask[..., : slots.total, : slots.total])
    )


def test_recent_window_and_sinks_always_kept(policy):
    slots = policy.slots(T)
    mask = policy.keep_mask(causal_logits(), slots, T)
    for i in range(T):
        recent = slice(max(0, i - slots.recent + 1), i + 1)
        assert mask[..., i, recent].all()
        assert mask[..., i, : min(slots.sinks, i + 1)].all()


def test_evicted_tokens_never_return(policy):
    mask = policy.keep_mask(causal_logits(), policy.slots(T), T)
    for j in range(T):
        column = mask[..., j:, j].int()  # from the step token j arrives
        assert (column.diff(dim=-1) <= 0).all(), f"token {j} came back"


def test_budget_at_least_window_keeps_everything(policy):
    big = type(policy)(T)
    mask = big.keep_mask(causal_logits(), big.slots(T), T)
    assert mask.equal(torch.ones(T, T, dtype=torch.bool).tril().expand_as(mask))


def test_lambda_closed_form_matches_the_shared_simulation():
    policy = LambdaShape(10, sinks=3)
    logits = causal_logits()
    slots = policy.slots(T)
    assert policy.eviction_steps(logits, slots, T).equal(
        Policy.eviction_steps(policy, logits, slots, T)
    )


def reference_h2o(logits, heavy, recent):
    """A plain loop, one KV head at a time, written from the definition."""
    b, hkv, g, t, _ = logits.shape
    total = heavy + recent
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            kept, scores = [], torch.zeros(t)
            for i in range(t):
                kept.append(i)
                if len(kept) > total:
                    candidates = [j for j in kept if j <= i - recent]
                    kept.remove(min(candidates, key=lambda j: (scores[j].item(), j)))
                out[bi, h, i, kept] = True
                row = logits[bi, h, :, i, kept].softmax(-1).sum(0)  # summed over the group
                scores[kept] += row
    return out


def test_h2o_matches_a_plain_reference_loop_with_gqa():
    logits = causal_logits(b=2, hkv=2, g=3)
    policy = H2O(10)
    slots = policy.slots(T)
    expected = reference_h2o(logits, slots.total - slots.recent, slots.recent)
    assert policy.keep_mask(logits, slots, T).equal(expected)


def test_h2o_kept_set_is_per_kv_head():
    logits = causal_logits(b=1, hkv=2, g=2)
    logits[0, 1, :, :, 20] += 8.0  # only KV head 1's queries love token 20
    mask = H2O(8).keep_mask(logits, H2O(8).slots(T), T)
    assert mask[0, 1, -1, 20] and not mask[0, 0, -1, 20]


@pytest.mark.parametrize(("name", "budget"), [("lambda", 4), ("lambda", 2), ("nope", 8)])
def test_bad_policy_settings_are_refused(name, budget):
    with pytest.raises(LessKVError):
        make_policy(name, budget).slots(T)


def reference_tova(logits, total):
    """TOVA from its definition: after each query attends, the cache over budget drops the
    pair that query attended to least (summed over the group); the newest one stays."""
    b, hkv, g, t, _ = logits.shape
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            kept, last = [], None
            for i in range(t):
                kept.append(i)
                if len(kept) > total:
                    candidates = [j for j in kept if j < i]
                    kept.remove(min(candidates, key=lambda j: (last[j].item(), j)))
                out[bi, h, i, kept] = True
                last = torch.zeros(t)
                last[kept] = logits[bi, h, :, i, kept].softmax(-1).sum(0)
    return out


def test_tova_matches_a_plain_reference_loop_with_gqa():
    logits = causal_logits(b=2, hkv=2, g=3)
    policy = make_policy("tova", 10)
    assert policy.keep_mask(logits, policy.slots(T), T).equal(reference_tova(logits, 10))


def test_every_policy_is_named_where_the_cli_lists_them():
    from lesskv.core.budget import POLICY_NAMES

    assert tuple(POLICIES) == POLICY_NAMES


def windowed(logits, window):
    """Causal logits of a layer that slides: keys ``window`` or more behind are -inf."""
    t = logits.shape[-1]
    old = torch.ones(t, t, dtype=torch.bool).tril(-window)
    return logits.masked_fill(old, float("-inf"))


def reference_with_window(logits, slots, window, scored):
    """The cache from the definitions, one KV head at a time: the token entering at step i,
    every pair ``window`` or more behind leaving (the model no longer sees it), and, if the
    cache is still over budget, the lowest-scored eligible pair (``scored``: H2O's
    accumulated attention; else the oldest eligible, Λ) leaving; ``expired`` marks pairs that
    left by the window (they enter no summary)."""
    b, hkv, g, t, _ = logits.shape
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    expired = torch.zeros(b, hkv, t, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            kept, scores = [], torch.zeros(t)
            for i in range(t):
                kept.append(i)
                for j in [j for j in kept if j <= i - window]:
                    kept.remove(j)
                    expired[bi, h, j] = True
                if len(kept) > slots.total:
                    candidates = [j for j in kept if slots.sinks <= j <= i - slots.recent]
                    key = (lambda j, s=scores: (s[j].item(), j)) if scored else (lambda j: j)
                    kept.remove(min(candidates, key=key))
                out[bi, h, i, kept] = True
                scores[kept] += logits[bi, h, :, i, kept].softmax(-1).sum(0)
    return out, expired


@pytest.mark.parametrize("name", ["h2o", "lambda"])
@pytest.mark.parametrize("window", [7, 20, 30, 60])
def test_a_sliding_window_expires_pairs_and_frees_their_place(name, window):
    from lesskv.core.policies import keep_mask_from_steps, state_steps

    policy = make_policy(name, 12)
    slots = policy.slots(T)
    logits = windowed(causal_logits(b=2, hkv=2, g=3), window)
    steps = policy.eviction_steps(logits, slots, T, window)
    expected, expired = reference_with_window(logits, slots, window, policy.uses_attention)
    assert keep_mask_from_steps(steps).equal(expected)
    entering = state_steps(steps, window)  # expired pairs never enter a summary
    assert entering.eq(T).logical_and(steps.lt(T)).equal(expired)


@pytest.mark.parametrize("window", [None, 12])
def test_steps_without_logits_land_on_the_given_device(window):
    """Position-only policies have no logits to take a device from: the caller names it
    (a GPU model's parallel form once mixed CUDA masks with CPU steps)."""
    policy = make_policy("lambda", 8)
    steps = policy.eviction_steps(None, policy.slots(30), 30, window, device=torch.device("meta"))
    assert steps.device.type == "meta" and steps.shape[-1] == 30
