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


def test_a_run_that_fails_before_its_first_layer_leaves_no_out_folder(
    capsys, tmp_path, monkeypatch
):
    """An error after --out is claimed (here a GPU out of memory while a layer trains) is
    one line, and the run.json and activations it wrote go with the folder it made."""
    from helpers import save_tiny
    from lesskv.training import per_layer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(per_layer, "train_layer", out_of_memory)
    save_tiny(tmp_path / "model")
    out = tmp_path / "runs" / "out"
    args = ["train", "--model", str(tmp_path / "model"), "--data", "builtin", "--budget", "8"]
    args += ["--seq-len", "32", "--sequences", "2", "--epochs", "1", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "\nlesskv: error: not enough memory for the sizes asked for (CUDA out of" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
