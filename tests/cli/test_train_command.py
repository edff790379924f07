"""``lesskv train``'s own argument: the store budget, parsed at the argparse edge."""

import argparse

import pytest

from lesskv.cli import main
from lesskv.cli.train import byte_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("123", 123),
        ("20GB", 20 * 10**9),
        ("500MiB", 500 * 2**20),
        ("1.5 gb", 1_500_000_000),
        ("2TiB", 2 * 2**40),
        ("7k", 7000),
    ],
)
def test_store_budgets_in_bytes_or_with_a_unit(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1", "1.5XB", "0", "0.0001KB"])
def test_a_store_budget_that_is_not_a_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size(text)


def test_the_command_line_refuses_a_malformed_budget_before_anything_runs(capsys, tmp_path):
    args = ["train", "--budget", "8", "--out", str(tmp_path / "out"), "--store-budget", "lots"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lesskv: error: train: argument --store-budget: 'lots' is not a size: a byte count or "
        "a number with a unit (500MB, 20GiB) (see: lesskv train --help)"
    )
    assert not (tmp_path / "out").exists()
