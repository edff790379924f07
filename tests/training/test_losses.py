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
from lesskv.training.collection import collect_activations
from lesskv.training.losses import _projected, layer_weighted
from lesskv.training.per_layer import train_kernels
from lesskv.training.run import RECORDING


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


def test_the_weighted_loss_is_the_first_order_error_and_training_lowers_it(tmp_path):
    """``layer_weighted`` is ``Σ_t (g_t·e_t)²`` relative to the plain policy's, plus a tenth
    of the relative MSE (by hand on a recorded batch); kernels trained on it leave less of it
    on their recording than untrained ones; the checkpoint says which loss."""
    model, windows, policy, config = setup(epochs=6, loss="weighted")
    out = tmp_path / "weighted"
    kernels = train_kernels(
        model, windows, policy, config, out, progress=False, keep_activations=True
    )
    assert kernels.meta.training["loss"] == "weighted"
    stores = collect_activations(
        model, windows, [1], policy, out / RECORDING, config.rank, progress=False, grads=True
    )
    batch, kept = stores[1].read(list(range(8))), stores[1].kept
    o_proj, kv = attention_modules(model)[1].o_proj, batch["key"].shape[1]
    untrained = tiny_kernels(model)[1]
    grad, target = batch["grad"][:, kept:], batch["target"][:, kept:]
    error = _projected(untrained, o_proj, batch, kv)[:, kept:] - target
    plain = _projected(None, o_proj, batch, kv)[:, kept:] - target
    expected = (grad * error).sum(-1).square().mean() / (grad * plain).sum(-1).square().mean()
    expected += 0.1 * error.square().mean() / plain.square().mean()
    with torch.no_grad():
        assert layer_weighted(untrained, o_proj, batch, kept, kv) == pytest.approx(expected.item())
        trained = layer_weighted(kernels.layers[1], o_proj, batch, kept, kv)
        assert trained < layer_weighted(untrained, o_proj, batch, kept, kv)
