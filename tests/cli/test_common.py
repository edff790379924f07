"""The helpers the commands share: the shipped-kernels announcement, methods, tables."""

import argparse

import pytest

from lesskv.cli.common import (
    check_evicts,
    kernels_folder,
    parse_methods,
    print_table,
    window_lengths,
)
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import available


@pytest.mark.skipif(
    "smollm2-135m-h2o-0.1" not in available(), reason="the shipped kernels are not installed"
)
def test_the_shipped_set_is_named_on_one_stderr_line(capsys):
    folder = kernels_folder(None, "smollm2-135m", make_policy("h2o", 64))
    assert folder.name == "smollm2-135m-h2o-0.1"
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "lesskv: using the shipped kernels smollm2-135m-h2o-0.1 "
        "(trained for h2o at budget 0.1) for budget 64\n"
    )


def test_a_kernels_folder_given_is_used_silently(capsys, tmp_path):
    assert kernels_folder(tmp_path, "smollm2-135m", make_policy("h2o", 64)) == tmp_path
    assert capsys.readouterr().err == ""


def test_no_shipped_kernels_for_another_model_is_an_error_not_an_announcement(capsys):
    with pytest.raises(LessKVError, match="--kernels"):
        kernels_folder(None, "some/other-model", make_policy("h2o", 0.1))
    assert capsys.readouterr().err == ""


def test_parse_methods_refuses_unknown_names():
    assert parse_methods(" full, less ,") == ["full", "less"]
    with pytest.raises(LessKVError, match="unknown method"):
        parse_methods("full,magic")
    with pytest.raises(LessKVError, match="unknown method"):
        parse_methods(" , ")


def test_print_table_is_markdown(capsys):
    print_table([{"a": 1.23456, "bb": "x"}], ["a", "bb"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["| a     | bb |", "|-------|----|", "| 1.235 | x  |"]


@pytest.mark.parametrize("text", ["1024,x", "1", "64,64", ""])
def test_bad_window_lengths_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        window_lengths(text)


def test_window_lengths_and_a_window_the_budget_covers():
    assert window_lengths("1024,2048") == [1024, 2048]
    check_evicts(make_policy("h2o", 8), [16, 64])
    with pytest.raises(LessKVError, match="a 8-token window fits in the budget of 8 pairs"):
        check_evicts(make_policy("h2o", 8), [64, 8])
