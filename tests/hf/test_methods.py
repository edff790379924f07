"""The method registry, one matrix over every method (kvpress-style): what each says it
spends per KV head is what its cache holds; its parallel form and its cache agree; names are
checked in one place."""

from pathlib import Path

import pytest
import torch

from helpers import BUDGET, decode_steps, kernel_set, make_tiny_model, prompt
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf import methods
from lesskv.hf.methods import METHODS, REGISTRY, get_method, make_cache, using_method
from lesskv.hf.methods.performer import RandomFeatures
from lesskv.hf.modules import attention_modules, kv_heads

RANK = 4  # the tiny kernel set's


def test_a_method_is_a_file_the_registry_finds():
    """Adding a method is adding a file to hf/methods: each file defines one, found by name."""
    files = {p.stem for p in Path(methods.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert {type(m).__module__.rsplit(".", 1)[1] for m in REGISTRY.values()} == files


def test_every_method_is_registered_under_its_own_name():
    assert METHODS == ("full", "baseline", "baseline+", "merge", "less", "performer")
    assert all(REGISTRY[name].name == name for name in METHODS)
    with pytest.raises(LessKVError, match="unknown method 'magic': choose from full, baseline"):
        get_method("magic")


@pytest.mark.parametrize("name", METHODS)
def test_the_cache_holds_what_the_method_says_it_spends(name):
    model = make_tiny_model("llama-gqa")
    method, policy = get_method(name), make_policy("h2o", BUDGET)
    kernels = kernel_set(model) if method.needs_kernels else None
    cache = make_cache(model, name, policy, kernels, rank=RANK)
    ids = prompt(40)
    if not method.sparse:
        assert cache is None and method.kept_tokens(policy, 40, 16, RANK) == 40
        return
    decode_steps(model, cache, ids)
    head_dim = attention_modules(model)[0].head_dim
    heads = kv_heads(model) * len(attention_modules(model))
    held = cache.memory_bytes()
    kept = method.kept_tokens(policy, 40, head_dim, RANK)
    assert held["kv"] == heads * kept * 2 * head_dim * 4  # fp32 K and V
    assert held["state"] == heads * method.state_bytes(RANK, head_dim)


@pytest.mark.parametrize("name", METHODS)
def test_decoding_with_the_methods_cache_is_its_parallel_form(name):
    model = make_tiny_model("llama-gqa")
    method, policy = get_method(name), make_policy("h2o", BUDGET)
    kernels = kernel_set(model) if method.needs_kernels else None
    ids = prompt(30)
    # the same LessKernels as make_cache takes below (one kernel module per layer works too)
    with using_method(model, name, policy=policy, kernels=kernels, rank=RANK), torch.no_grad():
        parallel = model(input_ids=ids).logits
    if kernels is not None:
        layers = list(kernels.layers)
        with using_method(model, name, policy=policy, kernels=layers, rank=RANK):
            assert torch.equal(model(input_ids=ids).logits, parallel)
    cache = make_cache(model, name, policy, kernels, rank=RANK)
    if cache is None:
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, parallel, atol=1e-5)
        return
    decoded = decode_steps(model, cache, ids)
    assert torch.allclose(decoded, parallel, atol=1e-4), (decoded - parallel).abs().max()


@pytest.mark.parametrize("name", METHODS)
def test_result_rows_are_labelled_by_the_method(name):
    policy = make_policy("h2o", 0.1)
    labels = get_method(name).labels(policy)
    expected = (
        {"policy": "none", "budget": ""} if name == "full" else {"policy": "h2o", "budget": "0.1"}
    )
    assert labels == expected
    assert get_method(name).labels(None) == {"policy": "none", "budget": ""}


def test_random_features_estimate_the_attention_weight_without_bias():
    """Performer's φ(q)·ψ(k) averages to exp(q·k·scale): with many features, within a few %."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 1, 16) * 0.5, torch.randn(1, 1, 1, 16) * 0.5
    features = RandomFeatures(kv_heads=1, head_dim=16, rank=20000, scale=0.25, seed=0)
    estimate = (features.phi(q)[0, 0, 0, 0] * features.psi(k)[0, 0, 0]).sum()
    exact = torch.exp((q[0, 0, 0, 0] * k[0, 0, 0]).sum() * 0.25)
    assert estimate.item() == pytest.approx(exact.item(), rel=0.05)
    assert (features.phi(q) > 0).all() and (features.decay_rate() == 0).all()
