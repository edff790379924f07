import pytest

from lesskv.core.budget import Budget, state_size_in_tokens
from lesskv.errors import LessKVError


@pytest.mark.parametrize(
    ("text", "seq_len", "tokens"),
    [
        ("102", 1024, 102),
        ("0.1", 1024, 102),
        ("10%", 1024, 102),
        ("0.05", 1024, 51),
        ("0.2", 1024, 205),
        (64, 10, 64),
        (0.001, 100, 1),
    ],
)
def test_budget_resolves_to_tokens(text, seq_len, tokens):
    assert Budget.parse(text).tokens(seq_len) == tokens


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "abc", "150%", float("nan"), True])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(LessKVError):
        Budget.parse(bad)


def test_state_weighs_about_half_rank_pairs():
    assert state_size_in_tokens(8, 64) == 4
    assert state_size_in_tokens(8, 128) == 4
    assert state_size_in_tokens(16, 64) == 8


def test_a_policy_takes_a_budget_or_a_number_never_text():
    """Text is parsed once, at the edge (``make_policy``, the CLI's argparse type); a policy
    built directly checks a number and refuses text rather than parsing it a second time."""
    from lesskv.core.policies import H2O, make_policy

    assert H2O(0.1).budget == Budget(0.1) == make_policy("h2o", "10%").budget
    assert H2O(Budget(64)).budget == Budget(64)
    with pytest.raises(LessKVError, match="must be a number"):
        H2O("0.1")
