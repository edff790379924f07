"""Training for a distribution loss on a tiny random model."""

import pytest
import torch

from helpers import TRAINING_T as T
from helpers import tiny_kernels
from helpers import training_setup as setup
from lesskv.core import math
from lesskv.core.distribution import attention_kl
from lesskv.hf.methods import observing
from lesskv.hf.modules import attention_modules
from lesskv.training.per_layer import train_kernels


@pytest.mark.parametrize("loss", ["kl", "mse+kl"])
def test_a_distribution_loss_lowers_the_kl_and_is_recorded(tmp_path, loss):
    """Kernels trained for the KL (alone or with the MSE) imply attention weights closer to
    the true ones than untrained kernels (the plain policy's, in effect); the checkpoint says
    which loss and schedule."""
    model, windows, policy, config = setup(epochs=6, loss=loss)
    kernels = train_kernels(model, windows, policy, config, tmp_path / loss, progress=False)
    assert kernels.meta.training["loss"] == loss and kernels.meta.training["epochs"] == 6
    assert kernels.meta.training["windows"] == 24
    untrained = tiny_kernels(model)
    kl = {
        name: _training_kl(model, windows, policy, k)
        for name, k in (
            ("trained", list(kernels.layers)),
            ("untrained", untrained),
        )
    }
    assert kl["trained"] < kl["untrained"], kl


def _training_kl(model, windows, policy, kernels):
    """Mean over layers and windows of the KL the distribution loss measures."""
    seen = []
    with observing(model, lambda m, q, k, v: seen.append((m, q, k))), torch.no_grad():
        model(windows[:8])
    index = {id(m): i for i, m in enumerate(attention_modules(model))}
    total = 0.0
    for module, query, key in seen:
        q = math.group_queries(query, key.shape[1])
        scale = module.scaling
        steps = policy.eviction_steps(math.causal_logits(q, key, scale), policy.slots(T), T)
        steps = steps.expand(*key.shape[:2], T)
        k = kernels[index[id(module)]]
        with torch.no_grad():
            total += attention_kl(
                q, key, steps, k.phi(q), k.psi(key), k.decay_rate(), scale, start=8
            ).item()
    return total / len(seen)
