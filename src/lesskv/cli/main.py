"""The ``lesskv`` command: parses arguments and calls the library; errors print on one line.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args)``; the
modules import torch and transformers only inside ``run``, so ``lesskv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from lesskv.cli import analyze, bench, demo, evaluate, finetune, generate, train
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.compat import check_versions

DESCRIPTION = """\
lesskv: LESS (Dong et al., ICML 2024) for Hugging Face models. A sparse KV-cache policy
(H2O, Λ-shaped attention sinks, TOVA) keeps a small budget of key/value pairs per head; LESS adds
a tiny learned low-rank state that absorbs every evicted pair, so no past token is forgotten.

Methods compared everywhere:
  full       the model's own attention over every past token
  baseline   the sparse policy alone, keeping BUDGET pairs per KV head
  baseline+  the policy with extra pairs weighing as much as LESS's state (fair comparison)
  merge      the policy plus training-free merge slots for the evicted pairs (same memory)
  less       the policy plus the learned low-rank state (needs kernels)
  performer  the policy plus LESS's state with random features, untrained (paper's baseline)

Examples:
  lesskv demo
  lesskv eval ppl --data wiki.test.raw --seq-len 1024 --windows 12 --policy h2o --budget 0.1 \\
      --methods full,baseline,baseline+,merge,less
  lesskv train --policy h2o --budget 0.1 --data c4.jsonl --sequences 64 --out runs/h2o-0.1
  lesskv finetune --policy h2o --budget 0.1 --data c4.jsonl --sequences 32 --out runs/h2o-ft
  lesskv generate --method less --budget 0.1 --prompt "Once upon a time"
  lesskv eval tasks --tasks piqa,arc_easy --data-dir ../shared/data --num-fewshot 5 --limit 100
  lesskv analyze residual --budget 0.1 --out figs/
  lesskv bench --contexts 1024,8000 --batch-sizes 1,8 --methods full,baseline,less
"""

# In the order ``lesskv --help`` lists them; ``evaluate`` and ``analyze`` are command groups.
COMMANDS = (demo, evaluate, analyze, generate, bench, train, finetune)
MAX_LINE = 299  # characters of an error's line, all of it: one terminal line, or close
# What torch says when a size cannot be allocated (CPU, CUDA, MPS), or overflows int64 (its
# bytes, its count of items, or that count plus one) although each count asked for fits:
# counts too large for the machine, not a bug.
OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "Storage size calculation overflowed",
    "integer multiplication overflow",
    "cannot be represented as a SymInt",
)


def error_line(message: object, where: str = "", hint: str = "") -> str:
    """The one line an error prints, ``message`` cut to fit :data:`MAX_LINE` with ``where``
    and ``hint``: a wrapped library error, or a hostile argument echoed back, can run to
    thousands of characters."""
    head = f"lesskv: error: {where}"
    return head + one_line(message, MAX_LINE - len(head) - len(hint)) + hint


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of ``lesskv`` (the
    command's usage is one ``--help`` away); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("lesskv").strip()
        where = f"{command}: " if command else ""
        hint = f" (see: {self.prog} --help)"
        self.exit(2, error_line(message, where, hint) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; every command module registers its own subcommand(s)."""
    parser = Parser(
        prog="lesskv", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status; a bad argument, a LessKVError, a size
    too large for memory or a path the system refuses is one line on stderr and status 2."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0), or an argument error already printed (2)
        return int(exit_.code or 0)
    args.command_line = shlex.join(["lesskv", *argv])  # recorded in the checkpoints written
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_versions()  # before any model is loaded
        for warning in caught:
            print(f"lesskv: warning: {warning.message}", file=sys.stderr)
        args.run(args)
    except LessKVError as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(error_line(f"not enough memory for the sizes asked for ({err})"), file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:
            raise
        # a path given that no check caught: too long a name, a folder not searchable...
        print(error_line(f"{short_path(err.filename)}: {err.strerror or err}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lesskv: interrupted", file=sys.stderr)
        return 130
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: a count too large for this machine (a
    batch size, a rank), reported like any bad input rather than as a traceback."""
    return isinstance(err, MemoryError) or any(text in str(err) for text in OUT_OF_MEMORY)


if __name__ == "__main__":
    sys.exit(main())
