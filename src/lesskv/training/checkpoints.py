"""Each trained layer's kernels in a file of its own under the run folder (written
atomically, so a rerun resumes after the finished layers), and the single checkpoint
assembled from them once every layer exists."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import load_file, save_file

from lesskv.core.forms import StateForm
from lesskv.core.kernels import make_kernels
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.checkpoint import KernelMeta, LessKernels, atomic_write
from lesskv.training.run import RECORDING

LAYERS_DIR = "layers"  # in the run folder: each trained layer's kernels, one file each


def missing_layers(out_dir: str | Path, layers: Iterable[int]) -> list[int]:
    """The layers among ``layers`` without a finished checkpoint in ``out_dir``."""
    return [i for i in layers if not layer_path(Path(out_dir), i).exists()]


def layer_path(out: Path, layer: int) -> Path:
    """Where a run in ``out`` keeps one trained layer (also read by the per-layer probe)."""
    return out / LAYERS_DIR / f"layer_{layer:03d}.safetensors"


def save_layer(out: Path, layer: int, kernels: StateForm, losses: dict[str, float]) -> None:
    path = layer_path(out, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in kernels.state_dict().items()}
    metadata = {k: repr(v) for k, v in losses.items()}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))


def assemble(out: Path, meta: KernelMeta, keep_activations: bool = False) -> LessKernels | None:
    """Once every kernel layer exists, write the single from_pretrained-able checkpoint (and
    delete what is left of the recorded activations, unless ``keep_activations``)."""
    if missing_layers(out, meta.kernel_layers):
        return None
    layers: list[StateForm | None] = [None] * meta.num_layers
    for i in meta.kernel_layers:
        path = layer_path(out, i)
        layer = make_kernels(meta.layer_shape)
        try:
            layer.load_state_dict(load_file(path))
            with open(path, "rb") as f:  # losses live in the safetensors header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except Exception as err:
            raise LessKVError(
                f"{short_path(path)} is corrupt ({one_line(err, 120)}); delete it and rerun"
            ) from None
        losses = header.get("__metadata__", {})
        meta.val_loss[str(i)] = float(losses.get("val_loss", "nan"))
        meta.baseline_plus_val_loss[str(i)] = float(losses.get("baseline_plus_val_loss", "nan"))
        layers[i] = layer
    kernels = LessKernels(meta, layers).eval()
    kernels.save_pretrained(out)
    if not keep_activations:
        shutil.rmtree(out / RECORDING, ignore_errors=True)
    return kernels
