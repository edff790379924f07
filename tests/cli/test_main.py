"""The command line: help that explains itself, one-line errors for bad input, and one module
per command behind the parser."""

import argparse
import json
from pathlib import PurePath

import pytest

from lesskv.cli import (
    analyze,
    bench,
    demo,
    eval_ppl,
    eval_summarize,
    eval_tasks,
    finetune,
    generate,
    main,
    train,
)
from lesskv.cli.main import build_parser

COMMAND_MODULES = {
    ("demo",): demo,
    ("eval", "ppl"): eval_ppl,
    ("eval", "summarize"): eval_summarize,
    ("eval", "tasks"): eval_tasks,
    ("analyze", "residual"): analyze,
    ("analyze", "oracle"): analyze,
    ("analyze", "layers"): analyze,
    ("analyze", "attention"): analyze,
    ("generate",): generate,
    ("bench",): bench,
    ("train",): train,
    ("finetune",): finetune,
}


def test_help_explains_the_methods(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "baseline+" in out and "low-rank" in out


def _leaf_commands(parser: argparse.ArgumentParser, prefix=()):
    """Every runnable command path, e.g. ("eval", "ppl"), with its parser."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield prefix, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from _leaf_commands(sub, (*prefix, name))


def test_every_command_is_a_module_with_add_parser_and_run():
    leaves = dict(_leaf_commands(build_parser()))
    assert leaves.keys() == COMMAND_MODULES.keys()
    for path, module in COMMAND_MODULES.items():
        assert callable(module.add_parser) and callable(module.run), module.__name__
        assert leaves[path].get_default("run") is module.run, path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "nope", "--budget", "8"], "unknown policy"),
        (["--budget", "0"], "argument --budget: budget must be > 0"),
        (["--budget", "ten"], "argument --budget: budget 'ten' is not a number"),
        (["--policy", "lru", "--budget", "8"], "argument --policy: unknown policy 'lru'"),
        (["--budget", "1.5"], "ambiguous"),
        (["--policy", "lambda", "--budget", "4"], "sinks"),
        (["--budget", "8", "--methods", "full,magic"], "unknown method"),
        (["--budget", "8", "--data", "/no/such/file.txt"], "file.txt"),
        (["--budget", "inf"], "argument --budget: budget 'inf' is not a finite number"),
        (["--budget", "1e400"], "argument --budget: budget '1e400' is not a finite number"),
        (["--budget", "1e300"], "argument --budget: budget must be at most 9223372036854775807"),
        (["--budget", "8", "--policy", "x" * 5000], "argument --policy: unknown policy 'xxx"),
        (["--budget", "8", "--methods", "x" * 5000], "unknown method(s) ['xxx"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(capsys, tmp_path, args, message):
    base = ["eval", "ppl", "--data", str(tmp_path / "x.txt")]
    (tmp_path / "x.txt").write_text("hello world " * 50)
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesskv: error:") and message in err and "\n" not in err
    assert len(err) < 300, len(err)  # a hostile argument echoed back is cut, not a page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "ppl", "--batch-size", "0"], "eval ppl: argument --batch-size: must be >= 1"),
        (["eval", "ppl", "--seq-len", "abc"], "argument --seq-len: not an integer: 'abc'"),
        (["eval", "ppl", "--windows", "-2"], "argument --windows: must be >= 1, got -2"),
        (["train", "--out", "x", "--lr", "0"], "train: argument --lr: must be > 0"),
        (["train", "--out", "x", "--lr", "nan"], "argument --lr: not a finite number: 'nan'"),
        (["generate", "--temperature", "-1"], "argument --temperature: must be >= 0.0"),
        (["eval", "tasks", "--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0"),
        (["bench", "--memory-budget-gib", "0"], "argument --memory-budget-gib: must be > 0"),
        (["eval", "ppl", "--budget", "8", "--bad"], "unrecognized arguments: --bad"),
        (["train"], "train: the following arguments are required:"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_argument_errors_are_one_line_naming_the_command(capsys, args, message):
    """argparse's own errors read like every other: one line, exit status 2, no usage dump."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesskv: error:") and message in err and "\n" not in err, err
    assert "--help)" in err


def _numeric_options():
    """Every (command, option) whose argparse type makes a number (or numbers, or a budget)
    of its text, found by parsing "8" with it: an option added later is covered unaided."""
    for path, parser in _leaf_commands(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.nargs is not None or action.type is None:
                continue
            if any(_is_number(action.type, probe) for probe in ("8", "0.5")):  # a share < 1
                yield path, action.option_strings[-1]


def _is_number(parse, text: str) -> bool:
    """Whether ``parse`` reads ``text`` as a number (not a name like --policy, or a path)."""
    try:
        parsed = parse(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return not isinstance(parsed, str | PurePath)


NUMERIC_OPTIONS = sorted(_numeric_options())
NOT_NUMBERS = ["nan", "inf", "-inf", "1e400", "NaN", "Infinity", "9" * 30]


def test_numeric_options_are_found_on_every_command():
    """The discovery below is not vacuous: it finds the options the issue named."""
    found = set(NUMERIC_OPTIONS)
    for path, _ in _leaf_commands(build_parser()):
        assert any(p == path for p, _ in found), path  # every command has at least one
    expected = [
        (("eval", "ppl"), "--budget"),
        (("eval", "ppl"), "--seq-len"),
        (("generate",), "--temperature"),
        (("bench",), "--contexts"),
        (("bench",), "--memory-budget-gib"),
        (("analyze", "oracle"), "--ranks"),
        (("train",), "--seed"),
        (("train",), "--store-budget"),
        (("finetune",), "--lr"),
        (("train",), "--val-fraction"),
        (("train",), "--dropout"),
    ]
    assert set(expected) <= found
    assert len(found) >= 50  # 59 when written


@pytest.mark.parametrize("value", NOT_NUMBERS)
@pytest.mark.parametrize(
    ("command", "option"), NUMERIC_OPTIONS, ids=[" ".join([*c, o]) for c, o in NUMERIC_OPTIONS]
)
def test_every_numeric_option_refuses_values_that_are_not_finite(capsys, command, option, value):
    """nan, infinities and numbers past int64 are refused where they enter, in one line naming
    the option, by the parser main() runs: nothing starts, so nothing overflows later."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesskv: error:") and f"argument {option}:" in err, err
    assert "\n" not in err and len(err) < 300, err


def test_a_binary_prompt_file_is_named_in_one_line(capsys, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(128, 256)) * 4)
    assert main(["generate", "--file", str(tmp_path / "blob.bin"), "--model", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"lesskv: error: cannot read prompt file {tmp_path / 'blob.bin'}: it is not UTF-8 text"
    )


def test_empty_text_and_missing_field(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["eval", "ppl", "--data", str(tmp_path / "empty.txt"), "--budget", "8"]) == 2
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    args = ["eval", "ppl", "--data", str(tmp_path / "d.jsonl"), "--field", "text", "--budget", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "empty" in err.lower() and "body" in err


@pytest.mark.parametrize(
    "command", [["generate", "--prompt", "x"], ["bench"], ["eval", "summarize"]]
)
def test_no_compile_reaches_the_cache_options(command):
    """--no-compile means eager decoding; without it the environment decides
    (LESSKV_COMPILE, default on)."""
    parser = build_parser()
    assert parser.parse_args(command).compile is None
    assert parser.parse_args([*command, "--no-compile"]).compile is False
