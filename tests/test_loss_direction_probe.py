"""docs/loss_direction_probe.py: its gradient is the NLL's at the layer's attention output (a
finite difference agrees), and fitting lowers the objective it fits."""

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import SHAPES, kernel_set, make_tiny_model, prompt
from lesskv.analysis.layers import less_outputs
from lesskv.core.policies import make_policy
from lesskv.hf.attention import using_setups
from lesskv.hf.methods import layer_setups
from lesskv.hf.modules import attention_modules, policy_layers

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "loss_direction_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("loss_direction_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nll_moved(model, window, setups, module, direction, eps):
    """The NLL with ``eps · direction`` added to ``module``'s attention output."""
    hook = module.o_proj.register_forward_pre_hook(
        lambda _, args: (args[0] + eps * direction, *args[1:])
    )
    try:
        with using_setups(model, setups), torch.no_grad():
            logits = model(window[None]).logits[0, :-1]  # in float64, unlike transformers' loss
            return torch.nn.functional.cross_entropy(logits, window[1:]).item()
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", SHAPES)
def test_the_gradient_is_the_nlls(probe, kind):
    model = make_tiny_model(kind).double().requires_grad_(False)
    policy, window = make_policy("h2o", 8), prompt(32)[0]
    setups = layer_setups(model, "baseline", policy)
    module = attention_modules(model)[policy_layers(model)[-1]]  # a global layer of gemma3
    g, q, key, _ = probe.layer_gradient(model, window, setups, module)
    assert g.shape == q.shape and key.shape[1] == q.shape[1]
    torch.manual_seed(1)
    direction = torch.randn(1, 32, g.shape[1] * g.shape[2] * g.shape[-1], dtype=g.dtype)
    # the same (B, Hkv, G, T, D) layout as g: heads before positions
    grouped = direction.view(1, 32, -1, g.shape[-1]).transpose(1, 2).reshape(g.shape)
    eps = 1e-3
    up = nll_moved(model, window, setups, module, direction, eps)
    down = nll_moved(model, window, setups, module, direction, -eps)
    assert (up - down) / (2 * eps) == pytest.approx((g * grouped).sum().item(), rel=1e-4)


def test_fitting_lowers_what_it_fits(probe):
    model = make_tiny_model("llama-gqa").requires_grad_(False)
    policy, windows = make_policy("h2o", 8), prompt(32, batch=2)
    module = attention_modules(model)[1]
    reads = probe.read_layer(
        model, windows, layer_setups(model, "baseline", policy), module, policy
    )
    start = kernel_set(model).layers[1]

    def weighted_error(kernels):
        total = 0.0
        for g, q, key, value, split in reads:
            error = split.full() - less_outputs(split, kernels, q, key, value)[""]
            total += (g * error).sum(-1).square().sum().item()
        return total

    fitted = probe.fit(start, reads, weighted=True, steps=20, lr=1e-2)
    assert weighted_error(fitted) < weighted_error(start)
