"""Kernel training end to end on a tiny random model."""

import functools
import json

import numpy as np
import pytest
import torch

from helpers import make_tiny_model, tiny_kernels
from lesskv.core import math
from lesskv.core.policies import POLICIES, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.methods import set_method
from lesskv.hf.modules import attention_modules
from lesskv.training.per_layer import (
    TrainConfig,
    collect_activations,
    parse_layers,
    train_kernels,
)

T = 64


def setup(epochs=12, policy="h2o", **overrides):
    model = make_tiny_model("llama-gqa")
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (24, T))
    config = TrainConfig(
        model="tiny",
        policy=policy,
        budget="8",
        **{
            "seq_lens": [T],
            "sequences": 24,
            "epochs": epochs,
            "rank": 4,
            "hidden": 32,
            "lr": 1e-2,
            **overrides,
        },
    )
    return model, windows, make_policy(policy, 8), config


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_training_beats_baseline_plus_on_validation(tmp_path, name):
    model, windows, policy, config = setup(policy=name)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer], f"layer {layer}"
    loaded = LessKernels.from_pretrained(tmp_path, model, policy=name)
    assert loaded.meta.val_loss == kernels.meta.val_loss
    assert not (tmp_path / "activations").exists()


def test_a_mix_of_window_lengths_trains_one_set_for_both(tmp_path):
    model, windows, policy, config = setup(epochs=4, seq_lens=[T, 2 * T])
    mix = [windows[:12], windows[12:].reshape(6, 2 * T)]
    kernels = train_kernels(model, mix, policy, config, tmp_path, progress=False)
    assert kernels.meta.seq_len == 2 * T
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer]
    assert not (tmp_path / "activations").exists()


def test_gradients_reach_only_kernel_parameters(tmp_path):
    model, windows, policy, config = setup(epochs=1)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    set_method(model, "less", policy=policy, kernels=list(kernels.layers))
    model(input_ids=windows[:1]).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in kernels.parameters())


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


def test_another_runs_folder_is_refused_unless_overwritten(tmp_path):
    model, windows, policy, config = setup(epochs=1)
    train_kernels(model, windows, policy, config, tmp_path, progress=False)
    _, _, _, other = setup(epochs=2)
    with pytest.raises(LessKVError, match="another training run"):
        train_kernels(model, windows, policy, other, tmp_path, progress=False)
    train_kernels(model, windows, policy, other, tmp_path, overwrite=True, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("spec", ["5", "0:9", "3:1", "x"])
def test_layer_ranges_out_of_bounds_are_refused(spec):
    with pytest.raises(LessKVError, match="--layers"):
        parse_layers(spec, 4)


def test_layer_ranges():
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("1:", 3) == [1, 2]
    assert parse_layers("2", 3) == [2]


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
    from lesskv.training import per_layer

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
    reference = per_layer._reference_records([0, 1], seen, policy, budgets, {})
    for layer in (0, 1):
        steps, recorded = per_layer._fused_records(policy, budgets, *seen[layer])
        ref_steps, ref_recorded = reference[layer]
        assert torch.equal(steps, ref_steps)
        assert recorded.keys() == ref_recorded.keys() == {"sparse_out", "lse", "plus_out"}
        for key, tensor in recorded.items():
            assert torch.allclose(tensor, ref_recorded[key], atol=1e-5), key


def test_a_bf16_models_activations_keep_their_range_and_dtype(tmp_path):
    """fp16 would turn 70000 into inf; a store is never read back as another dtype."""
    from lesskv.training.per_layer import ActivationStore

    shape = dict(n=1, hq=1, hkv=1, t=3, d=1, budget=1)
    store = ActivationStore(tmp_path, 0, **shape, dtype=torch.bfloat16)
    query = torch.tensor([70000.0, -3.5, 1e-3]).view(1, 3, 1).bfloat16()
    store.write(0, query=query, steps=torch.tensor([[3, 3, 3]]))
    batch = store.read([0])
    assert torch.equal(batch["query"][0], query.float())
    assert batch["steps"].tolist() == [[[3, 3, 3]]]
    with pytest.raises(LessKVError, match="stored as bf16.*this run stores f16"):
        ActivationStore(tmp_path, 0, **shape, dtype=torch.float32)
