"""What every training stage shares: its run folder (locked, claimed, resumed or refused), a
frozen model, and snapshots of the best weights seen so far."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.checkpoint import atomic_write

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Recorded activations: a fresh run may find them already there, linked from a run that kept
# them (train_kernels' keep_activations), and records only what they lack.
RECORDING = "activations"
_held: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor


def freeze(model: nn.Module) -> None:
    """Only the kernels learn; the LLM's weights never get gradients."""
    model.requires_grad_(False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s weights: the best state so far, restored at the end."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_output_dir` did: whether it ``started`` the run in ``out`` (wrote
    its run file) rather than resumed or joined one, and the topmost folder it ``made`` for
    ``out`` (``out`` itself, one of its parents, or none)."""

    out: Path
    started: bool
    made: Path | None

    @contextlib.contextmanager
    def undone_on_error(self, work: str) -> Iterator[None]:
        """Run the block; should it raise an error in a run this claim started, before the
        run kept anything (``work``: a glob, in ``out``, of what it keeps), remove all the
        run wrote and the folders the claim made: a first attempt that fails (a size too
        large for memory, a full disk) leaves nothing behind. An interrupted run keeps its
        files (a rerun resumes it), and so does a folder that another process running the
        same configuration has joined."""
        try:
            yield
        except Exception:
            if self.started and not any(self.out.glob(work)):
                with contextlib.suppress(OSError):  # the error to report is the block's
                    _withdraw(self.out, self.made)
            raise


def claim_output_dir(out: Path, config: object, overwrite: bool, shared: bool = False) -> Claim:
    """Lock ``out`` for this process, then resume our own run (``config`` is its dataclass);
    refuse to mix with another run's kernels unless told to.

    A run alone in the folder claims it (and may empty it, with ``overwrite``). With
    ``shared`` (per-layer training, whose layers are separate atomic files), later processes
    running the very same configuration may join it, e.g. ``--layers`` splitting the work;
    anything else is refused while the folder is in use.
    """
    made = next((p for p in (*reversed(out.parents), out) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    mine = _as_stored(asdict(config))
    held = _held_lock(out)
    fd = held if held is not None else os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd, fcntl.LOCK_EX):  # someone else is in the folder
        if shared and _try_lock(fd, fcntl.LOCK_SH) and _stored_run(out, config) == mine:
            _held[out.resolve()] = fd
            return Claim(out, started=False, made=None)  # the same training: share the folder
        if held is None:
            os.close(fd)
        raise LessKVError(
            f"{out} is in use by another lesskv run (it holds {out / LOCK_FILE}); wait for "
            "that run to finish or choose another --out"
        )
    _held[out.resolve()] = fd
    started = _claim(out, config, overwrite)
    if shared:  # from now on, processes running this same configuration may join
        fcntl.flock(fd, fcntl.LOCK_SH)
    return Claim(out, started, made)


def _claim(out: Path, config: object, overwrite: bool) -> bool:
    """Resume ``config``'s run in ``out``, or start it there (emptying only with
    ``overwrite``); whether it started."""
    mine = _as_stored(asdict(config))
    try:
        theirs = _stored_run(out, config)
    except LessKVError:
        if not overwrite:
            raise
        theirs = {}  # unreadable: replaced like another run's
    if theirs == mine:
        return False
    if theirs is not None:
        if not overwrite:
            differing = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise LessKVError(
                f"{out} holds another training run (differs in {', '.join(differing)}); "
                "choose another --out or pass --overwrite"
            )
        _empty(out)
    elif theirs is None and any(p.name not in (LOCK_FILE, RECORDING) for p in out.iterdir()):
        if not overwrite:
            raise LessKVError(f"{out} is not empty; choose another --out or pass --overwrite")
        _empty(out)
    atomic_write(out / RUN_FILE, lambda p: Path(p).write_text(json.dumps(mine, indent=2) + "\n"))
    return True


def _withdraw(out: Path, made: Path | None) -> None:
    """Empty ``out``, then remove the folders from it up to ``made``, unless another process
    shares it: one that joined holds the lock too, so this one cannot take it alone. Only
    empty folders are removed: another run may have put its own beside ``out`` meanwhile."""
    fd = _held[out.resolve()]
    if not _try_lock(fd, fcntl.LOCK_EX):
        return
    _empty(out)
    if made is None:
        return
    del _held[out.resolve()]
    (out / LOCK_FILE).unlink()
    os.close(fd)
    for folder in (out, *out.parents):
        folder.rmdir()
        if folder == made:
            return


def _as_stored(config: dict) -> dict:
    """``config`` as its JSON file holds it: tuples become lists."""
    return json.loads(json.dumps(config))


def _defaults(config: object) -> dict:
    """The knobs of ``config``'s dataclass that have a default, at it."""
    return {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(config)
        if f.default is not MISSING or f.default_factory is not MISSING
    }


def _stored_run(out: Path, config: object) -> dict | None:
    """The configuration of the run that ``out`` holds, if any (a damaged one is named), with
    the knobs of ``config``'s dataclass it predates at their defaults: what it ran at."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        return None
    try:
        stored = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = one_line(err, 80)
    else:
        if isinstance(stored, dict):
            return _as_stored(_defaults(config)) | stored
        reason = "not a JSON object"
    raise LessKVError(
        f"{short_path(run_file)} is corrupt ({reason}): choose another --out or pass --overwrite"
    )


def _held_lock(out: Path) -> int | None:
    """This process's lock on ``out`` (a resumed call), if it still guards the lock file."""
    fd = _held.get(out.resolve())
    path = out / LOCK_FILE
    if fd is not None and path.exists() and os.fstat(fd).st_ino == path.stat().st_ino:
        return fd
    return None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _empty(out: Path) -> None:
    """Remove everything in ``out`` but the lock this process holds."""
    for child in out.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
