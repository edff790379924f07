"""The helpers the commands share: the shipped-kernels announcement, methods, tables."""

import argparse
import json
import os

import pytest

from lesskv.cli.common import (
    check_evicts,
    check_output,
    int_list,
    kernels_folder,
    parse_methods,
    print_table,
    window_lengths,
    write_json,
)
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError, one_line
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


def test_a_table_without_rows_is_its_header(capsys):
    """bench with one method has no ratios to print; the results written after must not be
    lost to a table with no rows."""
    print_table([], ["context", "ratio"])
    assert capsys.readouterr().out.splitlines() == ["| context | ratio |", "|---------|-------|"]


@pytest.mark.parametrize("text", ["1024,x", "1", "64,64", ""])
def test_bad_window_lengths_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        window_lengths(text)


def test_window_lengths_and_a_window_the_budget_covers():
    assert window_lengths("1024,2048") == [1024, 2048]
    check_evicts(make_policy("h2o", 8), [16, 64])
    with pytest.raises(LessKVError, match="a 8-token window fits in the budget of 8 pairs"):
        check_evicts(make_policy("h2o", 8), [64, 8])


def test_int_lists_refuse_each_bad_integer():
    assert int_list(1)("1, 4,8,") == [1, 4, 8]
    for text, message in [
        ("1,inf", "not an integer: 'inf'"),
        ("0,4", "must be >= 1, got 0"),
        ("1," + "9" * 20, "must be at most 9223372036854775807"),
        (" , ", "no integer"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            int_list(1)(text)


def _entries(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_an_output_that_can_be_written_passes_and_leaves_nothing(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    before = _entries(tmp_path)
    check_output(tmp_path / "new" / "deeper" / "rows.json", "--json")
    check_output(tmp_path / "old.json", "--json")  # replaced at the end
    check_output(tmp_path / "runs" / "a", "--out", folder=True)
    check_output(tmp_path, "--out", folder=True)  # a run folder that exists (resumed)
    check_output(None, "--json")  # not asked for
    assert _entries(tmp_path) == before


@pytest.mark.parametrize(
    ("where", "folder", "message"),
    [
        ("a-file/rows.json", False, "a-file is not a directory"),
        ("a-file/deeper/rows.json", False, "a-file is not a directory"),
        ("a-folder", False, "Is a directory"),
        ("a-file", True, "Not a directory"),
        ("x" * 300 + "/rows.json", False, "File name too long"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(
    tmp_path, where, folder, message
):
    (tmp_path / "a-file").write_text("data")
    (tmp_path / "a-folder").mkdir()
    before = _entries(tmp_path)
    with pytest.raises(LessKVError, match=message) as err:
        check_output(tmp_path / where, "--out" if folder else "--json", folder)
    assert str(err.value).startswith("cannot write --")
    assert _entries(tmp_path) == before


def test_json_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "new" / "rows.json"
    write_json(path, [{"ppl": 1.5}])
    assert json.loads(path.read_text()) == [{"ppl": 1.5}]

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, [{"ppl": 2.5}])
    assert json.loads(path.read_text()) == [{"ppl": 1.5}]  # the old results, whole
    assert _entries(tmp_path) == [path.parent.relative_to(tmp_path), path.relative_to(tmp_path)]


def test_one_line_cuts_a_library_error_to_a_line():
    error = "Error(s) in loading state_dict:\n\t" + "size mismatch for a tensor.\n\t" * 500
    line = one_line(error, 100)
    assert "\n" not in line and len(line) == 100 and line.endswith("...")
    assert one_line("short\n message") == "short message"
