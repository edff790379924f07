"""What every training stage shares: its run folder (claimed, resumed or refused), a frozen
model, and snapshots of the best weights seen so far."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import atomic_write

RUN_FILE = "run.json"


def freeze(model: nn.Module) -> None:
    """Only the kernels learn; the LLM's weights never get gradients."""
    model.requires_grad_(False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s weights: the best state so far, restored at the end."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def claim_output_dir(out: Path, config: object, overwrite: bool) -> None:
    """Resume our own run (``config`` is its dataclass); refuse to mix with another run's
    kernels unless told to."""
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
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LessKVError(f"{out} is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda p: Path(p).write_text(json.dumps(mine, indent=2) + "\n"))
