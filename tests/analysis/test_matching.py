"""Attention matching's compaction: exact where the evicted pairs need no more pseudo-pairs
than it has, causal, and its NNLS the constrained optimum."""

import itertools

import torch

from lesskv.analysis.matching import _nnls, attention_matching
from lesskv.core.math import NEG_INF

SCALE = 0.25


def evicted(t: int, start: int, groups: int = 1, d: int = 8):
    """``(q, key, value, steps)`` for one sequence and KV head whose pair j is evicted at step
    ``start + j`` (the rest never), with ``groups`` query heads."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, groups, t, d)
    key, value = torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)
    steps = (torch.arange(t) + start).clamp(max=t).view(1, 1, t)
    return q, key, value, steps


def truth(q, key, value, members):
    """The true (out, lse) of attention over the pairs ``members`` of one head."""
    logits = q[0, 0] @ key[0, 0, members].T * SCALE
    return torch.softmax(logits, -1) @ value[0, 0, members], logits.logsumexp(-1, keepdim=True)


def test_pairs_sharing_one_key_and_value_compact_exactly():
    q, key, value, steps = evicted(64, start=4, groups=2)
    key[:], value[:] = key[0, 0, 0], value[0, 0, 0]
    out, lse = attention_matching(q, key, value, steps, SCALE, slots=2, every=8)
    for i in range(8, 64):  # each block reads every pair evicted before the block
        members = torch.arange((i // 8) * 8 - 4)
        want_out, want_lse = truth(q[..., i : i + 1, :], key, value, members)
        assert torch.allclose(out[0, 0, :, i], want_out[:, 0], atol=1e-4)
        assert torch.allclose(lse[0, 0, :, i], want_lse[:, 0], atol=1e-4)


def test_as_many_slots_as_pairs_keep_the_keys_and_nothing_reads_ahead():
    q, key, value, steps = evicted(16, start=2, groups=4)
    out, lse = attention_matching(q, key, value, steps, SCALE, slots=16, every=8)
    assert (lse[..., :8, :] == NEG_INF).all() and (out[..., :8, :] == 0).all()
    want_out, want_lse = truth(q[..., 8:, :], key, value, torch.arange(6))
    # 6 pairs, 32 reference queries: the masses and values are identifiable, so exact
    assert torch.allclose(lse[0, 0, :, 8:], want_lse, atol=1e-3)
    assert torch.allclose(out[0, 0, :, 8:], want_out, atol=1e-3)


def test_nnls_is_the_best_non_negative_solution():
    torch.manual_seed(1)
    a, b = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    x = _nnls(a, b)
    assert (x >= 0).all()
    residual = (a @ x - b).norm()
    faces = (cols for r in range(1, 5) for cols in itertools.combinations(range(4), r))
    for cols in faces:
        sub = torch.linalg.lstsq(a[:, list(cols)], b.unsqueeze(-1)).solution.squeeze(-1)
        if (sub >= 0).all():  # every feasible face's optimum is no better
            assert residual <= (a[:, list(cols)] @ sub - b).norm() + 1e-9
    assert residual <= b.norm() + 1e-9
