"""Each layer's checkpoint file: a run resumes from them, and a corrupt one is named."""

import pytest
import torch
from safetensors.torch import save_file

from helpers import training_setup as setup
from lesskv.errors import LessKVError
from lesskv.training.per_layer import train_kernels


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    model, windows, policy, config = setup(epochs=2)
    whole = train_kernels(model, windows, policy, config, tmp_path / "a", progress=False)
    first = train_kernels(
        model, windows, policy, config, tmp_path / "b", layers=[1], progress=False
    )
    assert first is None  # layer 0 still missing: nothing assembled yet
    assert not (tmp_path / "b" / "kernels.safetensors").exists()
    resumed = train_kernels(model, windows, policy, config, tmp_path / "b", progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_corrupt_layer_files_error_keeps_its_advice(tmp_path):
    """torch lists every unexpected key of a state dict: the line is cut inside that
    message, so it still ends with what to do."""
    model, windows, policy, config = setup(epochs=1)
    train_kernels(model, windows, policy, config, tmp_path, progress=False)
    layer = tmp_path / "layers" / "layer_001.safetensors"
    save_file({f"junk_{i}": torch.zeros(1) for i in range(100)}, layer)
    with pytest.raises(LessKVError) as caught:
        train_kernels(model, windows, policy, config, tmp_path, progress=False)
    message = str(caught.value)
    assert "layer_001.safetensors is corrupt (Error(s) in loading state_dict" in message
    assert message.endswith("...); delete it and rerun") and len(message) < 260, message
