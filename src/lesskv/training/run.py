"""What every training stage shares: its run folder (locked, claimed, resumed or refused), a
frozen model, and snapshots of the best weights seen so far."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import atomic_write

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor


def freeze(model: nn.Module) -> None:
    """Only the kernels learn; the LLM's weights never get gradients."""
    model.requires_grad_(False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s weights: the best state so far, restored at the end."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def claim_output_dir(out: Path, config: object, overwrite: bool) -> None:
    """Lock ``out`` for this process, then resume our own run (``config`` is its dataclass);
    refuse to mix with another run's kernels unless told to."""
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    run_file = out / RUN_FILE
    mine = json.loads(json.dumps(asdict(config)))  # as stored: tuples become lists
    if run_file.exists():
        theirs = json.loads(run_file.read_text())
        if theirs != mine:
            if not overwrite:
                differing = sorted(k for k in mine if theirs.get(k) != mine[k])
                raise LessKVError(
                    f"{out} holds another training run (differs in {', '.join(differing)}); "
                    "choose another --out or pass --overwrite"
                )
            _empty(out)
    elif any(p.name != LOCK_FILE for p in out.iterdir()):
        if not overwrite:
            raise LessKVError(f"{out} is not empty; choose another --out or pass --overwrite")
        _empty(out)
    atomic_write(run_file, lambda p: Path(p).write_text(json.dumps(mine, indent=2) + "\n"))


def _lock(out: Path) -> None:
    """An exclusive lock on ``out/.lock`` until this process exits, so two training runs
    pointed at one folder cannot interleave their files: the second one refuses."""
    path = out / LOCK_FILE
    key = out.resolve()
    held = _held.get(key)
    if held is not None and path.exists() and os.fstat(held).st_ino == path.stat().st_ino:
        return  # ours already (a resumed call in the same process)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LessKVError(
            f"{out} is in use by another lesskv run (it holds {path}); wait for that run to "
            "finish or choose another --out"
        ) from None
    _held[key] = fd


def _empty(out: Path) -> None:
    """Remove everything in ``out`` but the lock this process holds."""
    for child in out.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
