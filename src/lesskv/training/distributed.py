"""Layer-parallel kernel training on PyTorch's distributed runtime, launched by ``torchrun``.

LESS trains every layer on its own, so ranks only have to agree on who trains which layer.
Rank 0 claims the output folder and lists the requested layers still missing; each rank
collects activations for, and trains, a contiguous share of them (ranks holding early layers
stop their forward pass early); after a barrier rank 0 assembles the final checkpoint. The
per-layer files in the shared folder are the only state and are written atomically, so a rank
that dies loses at most the layer it was training, and rerunning the same command trains only
what is missing. Each layer's seeds derive from the run's seed and the layer index, never from
the rank, so the result is the single-process one whatever the number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from lesskv.errors import LessKVError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks meet at a barrier once their layers are trained; the slowest may arrive hours after the
# others, far beyond torch's default collective timeout (10 to 30 minutes).
BARRIER_TIMEOUT = timedelta(days=7)

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether torchrun (or a launcher with its environment) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Worker:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device


@contextmanager
def process_group() -> Iterator[Worker]:
    """Join torchrun's job: NCCL on GPU ``LOCAL_RANK`` where CUDA is available, else gloo."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise LessKVError(
            f"distributed training needs torchrun's environment ({', '.join(missing)} unset): "
            "launch it with `torchrun --nproc-per-node N -m lesskv train ...`"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LessKVError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, timeout=BARRIER_TIMEOUT, device_id=device if backend == "nccl" else None
    )
    try:
        yield Worker(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def shard(layers: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``layers``; shares differ by at most one layer."""
    n = len(layers)
    return layers[rank * n // world_size : (rank + 1) * n // world_size]


def decided_by_rank0(worker: Worker, decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 alone (no races on the folder) and give every rank its result,
    or its LessKVError, so that all ranks stop with the same message instead of hanging."""
    box: list[object] = [None]
    if worker.rank == 0:
        try:
            box[0] = (decide(), None)
        except LessKVError as err:
            box[0] = (None, str(err))
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise LessKVError(error)
    return result
