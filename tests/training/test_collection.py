"""Recording activations on a tiny random model."""

import functools

import numpy as np
import pytest
import torch

from helpers import SHAPES, tiny_kernels
from helpers import TRAINING_T as T
from helpers import training_setup as setup
from lesskv.core import math
from lesskv.core.policies import POLICIES, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.methods import using_method
from lesskv.hf.modules import attention_modules
from lesskv.training import collection
from lesskv.training.collection import collect_activations


@pytest.mark.parametrize("kind", SHAPES)
def test_the_target_is_o_projs_output_at_the_models_hidden_size(tmp_path, kind):
    """o_proj maps the heads back to the hidden size, which need not be heads x head_dim
    (Gemma 3, Qwen3): the stored target is what o_proj outputs in the model's own forward,
    and o_proj of full attention over the stored Q/K/V."""
    model, windows, policy, _ = setup(kind=kind)
    module = attention_modules(model)[1]  # a global layer in every layout
    seen = []
    handle = module.o_proj.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        for window in windows[:2]:
            model(input_ids=window[None])
    handle.remove()
    stores = collect_activations(model, windows[:2], [1], policy, tmp_path, 4, progress=False)
    batch = stores[1].read([0, 1])
    assert batch["target"].shape == (2, T, model.config.hidden_size)
    assert torch.allclose(batch["target"], torch.cat(seen), rtol=1e-3, atol=1e-3)
    hq, d = batch["query"].shape[1], module.head_dim
    q = batch["query"].view(2, batch["key"].shape[1], -1, T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = math.sparse_output(q, batch["key"], batch["value"], causal, module.scaling)
    expected = module.o_proj(out.reshape(2, hq, T, d).transpose(1, 2).flatten(2))
    assert torch.allclose(expected, batch["target"], rtol=1e-2, atol=2e-3)


def test_upstream_kernels_record_each_layer_on_its_inference_inputs(tmp_path):
    model, windows, policy, _ = setup()
    kernels = tiny_kernels(model)
    record = functools.partial(collect_activations, model, windows[:2], [0, 1], policy)
    full = record(tmp_path / "full", 4, progress=False)
    sparse = record(tmp_path / "sparse", 4, progress=False, upstream=kernels)
    for name in ("query", "key", "value", "target", "sparse_out"):  # layer 0: nothing upstream
        assert np.allclose(full[0].arrays[name], sparse[0].arrays[name], atol=1e-3)
    assert not np.allclose(full[1].arrays["query"], sparse[1].arrays["query"], atol=1e-2)
    # The target stays full attention, over the inputs LESS upstream gave this layer.
    batch = sparse[1].read([0, 1])
    module = attention_modules(model)[1]
    q = batch["query"].view(2, 2, 3, T, -1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = math.sparse_output(q, batch["key"], batch["value"], causal, module.scaling)
    expected = module.o_proj(out.flatten(1, 2).transpose(1, 2).flatten(2))
    assert torch.allclose(expected, batch["target"], atol=2e-3)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fused_collection_records_what_the_reference_does(name):
    """Collection's compiled, blocked simulation against the stacked T x T one it replaces on
    the CPU: the same steps, and the same outputs at the budget and at Baseline+'s."""
    generator = torch.Generator().manual_seed(4)
    seen = {
        layer: (
            torch.randn(1, 2, 3, T, 16, generator=generator),
            torch.randn(1, 2, T, 16, generator=generator),
            torch.randn(1, 2, T, 16, generator=generator),
            0.25,
        )
        for layer in (0, 1)
    }
    policy = make_policy(name, 12)
    budgets = [policy.slots(T), policy.slots(T, 4)]
    reference = collection._reference_records([0, 1], seen, policy, budgets, {})
    for layer in (0, 1):
        steps, recorded = collection._fused_records(policy, budgets, *seen[layer])
        ref_steps, ref_recorded = reference[layer]
        assert torch.equal(steps, ref_steps)
        assert recorded.keys() == ref_recorded.keys() == {"sparse_out", "lse", "plus_out"}
        for key, tensor in recorded.items():
            assert torch.allclose(tensor, ref_recorded[key], atol=1e-5), key


def test_an_interrupted_collection_runs_only_the_missing_windows(tmp_path):
    model, windows, policy, _ = setup()
    record = functools.partial(collect_activations, model, windows[:6], [0, 1], policy, rank=4)
    whole = record(tmp_path / "whole", progress=False)
    seen, allowed = [], {"windows": 3}

    def interrupt_when_allowed_runs_out(module, args, kwargs):
        seen.append(kwargs["input_ids"])
        if len(seen) > allowed["windows"]:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_when_allowed_runs_out, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            record(tmp_path / "resumed", progress=False)
        seen.clear()
        allowed["windows"] = len(windows)
        resumed = record(tmp_path / "resumed", progress=False)
        assert torch.equal(torch.cat(seen), windows[3:6])
        seen.clear()
        record(tmp_path / "resumed", progress=False)
        assert seen == []  # complete: not one forward pass
    finally:
        handle.remove()
    for layer in (0, 1):
        assert resumed[layer].complete == 6
        for name, array in whole[layer].arrays.items():
            assert np.array_equal(array, resumed[layer].arrays[name], equal_nan=True), name
        assert np.array_equal(whole[layer].steps, resumed[layer].steps)


@pytest.mark.parametrize("kind", SHAPES)
def test_grads_are_the_plain_policys_nll_gradient_at_the_output(tmp_path, kind):
    """With grads, each window's stored ``grad`` is the gradient of its summed NLL at the
    layer's o_proj output with the plain policy in every layer (a finite difference along a
    random direction agrees), at the model's hidden size; a recording made without them is
    refused, not read as zeros."""
    model, windows, policy, _ = setup(kind=kind)
    model = model.double()
    stores = collect_activations(
        model, windows[:1], [1], policy, tmp_path, 4, progress=False, grads=True
    )
    grad = stores[1].read([0])["grad"][0].double()
    assert grad.shape == (T, model.config.hidden_size) and grad.abs().sum() > 0
    torch.manual_seed(0)
    direction = torch.randn(T, model.config.hidden_size, dtype=torch.float64)
    o_proj, ids = attention_modules(model)[1].o_proj, windows[:1]

    def nll(eps: float) -> float:
        hook = o_proj.register_forward_hook(lambda m, args, out: out + eps * direction)
        try:
            with using_method(model, "baseline", policy=policy), torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
        finally:
            hook.remove()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()

    eps = 1e-3
    expected = (grad * direction).sum().item()  # fp32/fp16 storage: a loose match
    assert (nll(eps) - nll(-eps)) / (2 * eps) == pytest.approx(expected, rel=2e-2)
    with pytest.raises(LessKVError, match="without the NLL's gradients"):
        collect_activations(model, windows[:1], [1], policy, tmp_path / "plain", 4, progress=False)
        collect_activations(
            model, windows[:1], [1], policy, tmp_path / "plain", 4, progress=False, grads=True
        )
