"""Kernel sets a per-layer probe compares beside the shipped ones: an assembled checkpoint, or
the layers an unfinished ``lesskv train --layers a:b`` run has written so far, so a candidate
state can be judged before every layer is trained."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from lesskv.core.kernels import KernelShape, make_kernels
from lesskv.core.policies import Policy
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.checkpoint import CONFIG_FILE, KernelMeta, LessKernels
from lesskv.hf.modules import attention_modules
from lesskv.training.checkpoints import LAYERS_DIR, layer_path
from lesskv.training.run import RUN_FILE


def load_candidate(folder: Path, model: PreTrainedModel, policy: Policy) -> list[nn.Module | None]:
    """One kernel module per attention layer of ``model`` from ``folder``, None where an
    unfinished run has not trained that layer yet; kernels trained for another policy are
    refused, as ``--kernels`` refuses them."""
    if (folder / CONFIG_FILE).is_file():
        return list(LessKernels.from_pretrained(folder, model, policy.name).layers)
    if not (folder / LAYERS_DIR).is_dir():
        raise LessKVError(
            f"candidate {short_path(folder)} holds neither kernels ({CONFIG_FILE}) nor a "
            f"training run's per-layer files ({LAYERS_DIR}/)"
        )
    shape = KernelMeta.for_model(model, "", policy="", budget="").layer_shape
    shape = _run_shape(folder, policy, shape)
    return [
        _trained_layer(layer_path(folder, i), shape) for i in range(len(attention_modules(model)))
    ]


def _run_shape(folder: Path, policy: Policy, shape: KernelShape) -> KernelShape:
    """The state form, rank and width the run in ``folder`` trains (its run file; runs from
    before the form existed trained the paper's), once its policy is checked."""
    path = folder / RUN_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LessKVError(f"candidate {short_path(path)}: {one_line(err, 80)}") from None
    if not isinstance(config, dict) or config.get("policy") != policy.name:
        trained = config.get("policy") if isinstance(config, dict) else None
        raise LessKVError(
            f"candidate {short_path(folder)} trains kernels for policy {trained!r}, not "
            f"{policy.name!r}: pass the matching --policy"
        )
    sizes = {k: config[k] for k in ("rank", "hidden") if isinstance(config.get(k), int)}
    return replace(shape, state=config.get("state", "paper"), **sizes)


def _trained_layer(path: Path, shape: KernelShape) -> nn.Module | None:
    """A layer's state form from its training file, the low-rank ones at the hidden width and
    rank they were trained with (read from the weights); None where the file is not written
    yet."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        if "phi_mlp.w2" in tensors:
            _, hidden, rank = tensors["phi_mlp.w2"].shape
            shape = replace(shape, hidden=hidden, rank=rank)
        kernels = make_kernels(shape)
        kernels.load_state_dict(tensors)
    except Exception as err:  # safetensors raises several types; a shape mismatch, KeyError
        raise LessKVError(
            f"{short_path(path)} holds no kernels for this model ({one_line(err, 120)})"
        ) from None
    return kernels.eval()
