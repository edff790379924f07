"""The registered attention on tiny random models of every supported layout."""

import pytest
import torch

from helpers import (
    decode_steps,
    kernel_set,
    left_padded,
    make_tiny_model,
    prompt,
    tiny_kernels,
)
from lesskv.core.policies import POLICIES, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.attention import LayerSetup, using_setups
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import make_cache, set_method
from lesskv.hf.modules import attention_modules

T = 40


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 97, (2, T))


def logits_for(model, ids, method="full", **options):
    set_method(model, method, **options)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_method_equals_the_models_own_sdpa(tiny_model, ids):
    with torch.no_grad():
        reference = tiny_model(input_ids=ids).logits
    assert torch.allclose(logits_for(tiny_model, ids), reference, atol=1e-5)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", ["baseline", "baseline+", "merge", "less"])
def test_budget_covering_the_window_equals_full(tiny_model, ids, policy, method):
    with torch.no_grad():
        reference = tiny_model(input_ids=ids).logits
    kernels = tiny_kernels(tiny_model)
    got = logits_for(tiny_model, ids, method, policy=make_policy(policy, T), kernels=kernels)
    assert torch.allclose(got, reference, atol=1e-5)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_methods_differ_once_tokens_are_evicted(tiny_model, ids, policy):
    options = dict(policy=make_policy(policy, 8), kernels=tiny_kernels(tiny_model))
    full = logits_for(tiny_model, ids)
    baseline = logits_for(tiny_model, ids, "baseline", **options)
    others = [logits_for(tiny_model, ids, m, **options) for m in ("baseline+", "merge", "less")]
    # Before the budget fills nothing is evicted, so every method agrees there.
    for other in (baseline, *others):
        assert torch.allclose(other[:, :8], full[:, :8], atol=1e-5)
    assert not torch.allclose(baseline[:, 12:], full[:, 12:], atol=1e-3)
    for other in others:
        assert not torch.allclose(other[:, 12:], baseline[:, 12:], atol=1e-3)


def test_merge_without_slots_is_the_baseline_exactly(ids):
    model = make_tiny_model("llama-gqa")
    policy = make_policy("h2o", 8)
    baseline = logits_for(model, ids, "baseline", policy=policy)
    modules = attention_modules(model)
    setups = {m: LayerSetup(policy=policy, merge_slots=0) for m in modules}
    with using_setups(model, setups), torch.no_grad():
        parallel = model(input_ids=ids).logits
    assert torch.equal(parallel, baseline)
    cache = LessCache(model, policy, merge_slots=0)
    reference = LessCache(model, policy)
    set_method(model, "full")
    with torch.no_grad():
        for t in range(ids.shape[1]):
            step = ids[:, t : t + 1]
            got = model(input_ids=step, use_cache=True, **cache_argument(model, cache)).logits
            want = model(input_ids=step, use_cache=True, **cache_argument(model, reference)).logits
            assert torch.equal(got, want)


def test_switching_back_to_full_restores_the_model(ids):
    model = make_tiny_model("llama-gqa")
    full = logits_for(model, ids)
    logits_for(model, ids, "baseline", policy=make_policy("h2o", 8))
    assert torch.equal(logits_for(model, ids), full)


def test_zero_scales_make_less_the_baseline(ids):
    model = make_tiny_model("llama-gqa")
    kernels = tiny_kernels(model)
    for layer in kernels:
        torch.nn.init.constant_(layer.psi_scale, 0.0)
    policy = make_policy("h2o", 8)
    baseline = logits_for(model, ids, "baseline", policy=policy)
    less = logits_for(model, ids, "less", policy=policy, kernels=kernels)
    assert torch.allclose(less, baseline, atol=1e-6)  # sdpa vs our softmax: rounding only


def test_right_padding_does_not_change_real_positions():
    model = make_tiny_model("qwen2")
    policy = make_policy("h2o", 6)
    torch.manual_seed(1)
    long, short = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 20))
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 10, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 20:] = 0
    set_method(model, "baseline", policy=policy)
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=short).logits
    assert torch.allclose(together[1, :20], alone[0], atol=1e-5)


def test_bad_setups_are_refused():
    model = make_tiny_model("llama-mha")
    with pytest.raises(LessKVError, match="unknown method"):
        set_method(model, "magic")
    with pytest.raises(LessKVError, match="needs a policy"):
        set_method(model, "baseline")
    with pytest.raises(LessKVError, match="kernels"):
        set_method(model, "less", policy=make_policy("h2o", 8))


def test_each_layers_kernels_move_to_that_layers_device():
    """As with device_map="auto": layer 1 lives elsewhere (meta stands in for a second GPU)."""
    from lesskv.hf.cache import LessCache
    from lesskv.hf.checkpoint import KernelMeta, LessKernels

    model = make_tiny_model("llama-gqa")
    attention_modules(model)[1].to("meta")
    meta = KernelMeta.for_model(model, "tiny", policy="h2o", budget="8", rank=4, hidden=16)
    policy = make_policy("h2o", 8)

    def devices(kernels):
        return [{p.device.type for p in layer.parameters()} for layer in kernels.layers]

    kernels = LessKernels(meta, tiny_kernels(model))
    set_method(model, "less", policy=policy, kernels=list(kernels.layers))
    assert devices(kernels) == [{"cpu"}, {"meta"}]
    kernels = LessKernels(meta, tiny_kernels(model))
    LessCache(model, policy, kernels=kernels)
    assert devices(kernels) == [{"cpu"}, {"meta"}]


def test_softcapped_attention_is_refused_not_ignored(ids):
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4096,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(LessKVError, match="softcapping"):
        logits_for(model, ids, "baseline", policy=make_policy("h2o", 8))


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", ["baseline", "merge", "less"])
def test_where_every_layer_slides_the_policy_works_inside_the_window(ids, policy, method):
    """Mistral-like models slide every layer (here a 16-token window, 40 tokens): the
    policy keeps at most its budget of the pairs still in the window; a pair that falls out
    leaves for good without entering a summary. Decoding equals the teacher-forced form, and
    a budget that covers the window equals the plain model, in both forms."""
    model = make_tiny_model("mistral", sliding_window=16)
    kernels = kernel_set(model, policy) if method == "less" else None
    layers = None if kernels is None else list(kernels.layers)
    small = make_policy(policy, 8)
    parallel = logits_for(model, ids, method, policy=small, kernels=layers, rank=4)
    set_method(model, "full")
    decoded = decode_steps(model, make_cache(model, method, small, kernels, rank=4), ids)
    assert torch.allclose(decoded, parallel, atol=1e-4)
    plain = logits_for(model, ids)
    assert not torch.allclose(parallel, plain, atol=1e-3)  # the policy did evict
    covering = make_policy(policy, 20)  # more than the window holds
    parallel = logits_for(model, ids, method, policy=covering, kernels=layers, rank=4)
    set_method(model, "full")
    cache = make_cache(model, method, covering, kernels, rank=4)
    decoded = decode_steps(model, cache, ids)
    assert torch.allclose(parallel, plain, atol=1e-4)
    assert torch.allclose(decoded, plain, atol=1e-4)
    for layer in cache.layers:  # the window bounds what the cache holds
        assert int(layer.valid.sum(-1).max()) == 16
        if layer.merge is not None:
            assert layer.merge.counts.sum() == 0
        if layer.kernels is not None:
            assert all(t.abs().sum() == 0 for t in layer.state)


def test_a_sliding_model_batched_with_left_padding_decodes_each_row_as_alone():
    model = make_tiny_model("mistral", sliding_window=16)
    rows = [prompt(36, seed=1), prompt(27, seed=2)]
    padded, mask = left_padded(rows)
    kernels = kernel_set(model, "h2o")

    def generate(input_ids, attention_mask=None):
        cache = LessCache(model, make_policy("h2o", 8), kernels=kernels)
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=20,  # well past the window
            do_sample=False,
            **cache_argument(model, cache),
        )

    together = generate(padded, mask)
    for i, row in enumerate(rows):
        assert torch.equal(together[i, 36:], generate(row)[0, row.shape[1] :])
