"""The support table (README): on tiny random models of every family lesskv drives, a budget
at least the sequence length makes both forms the plain model; what cannot be exact is
refused."""

import pytest
import torch
import transformers as hf
from transformers import AutoModelForCausalLM

from helpers import BUDGET, decode_steps, kernel_set
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf.attention import LayerSetup, enable, using_setups
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import make_cache, set_method
from lesskv.hf.modules import attention_modules, attention_scale
from lesskv.training.per_layer import TrainConfig, train_kernels

SHAPE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
COMMON = dict(**SHAPE, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)
SUPPORTED = {
    "llama": lambda: hf.LlamaConfig(**COMMON),
    "qwen2": lambda: hf.Qwen2Config(**COMMON),
    "qwen3": lambda: hf.Qwen3Config(head_dim=16, **COMMON),
    "mistral": lambda: hf.MistralConfig(sliding_window=None, **COMMON),
    "phi3": lambda: hf.Phi3Config(pad_token_id=0, **COMMON),
    "olmo2": lambda: hf.Olmo2Config(**COMMON),
    "granite": lambda: hf.GraniteConfig(**COMMON),
    "cohere": lambda: hf.CohereConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON),
    "gemma": lambda: hf.GemmaConfig(head_dim=16, **COMMON),
    "starcoder2": lambda: hf.Starcoder2Config(**COMMON),
    "stablelm": lambda: hf.StableLmConfig(**COMMON),
    # every layer slides, the window shorter than the test sequences (the policy inside it)
    "mistral-sliding": lambda: hf.MistralConfig(sliding_window=12, **COMMON),
    "starcoder2-sliding": lambda: hf.Starcoder2Config(sliding_window=12, **COMMON),
    "qwen2-mixed": lambda: hf.Qwen2Config(
        use_sliding_window=True, sliding_window=16, max_window_layers=1, **COMMON
    ),
    "gemma3": lambda: hf.Gemma3TextConfig(
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        **COMMON,
    ),
    "falcon-mqa": lambda: hf.FalconConfig(**SHAPE, multi_query=True),
    "falcon-mha": lambda: hf.FalconConfig(**SHAPE, multi_query=False),
    "falcon-new": lambda: hf.FalconConfig(**SHAPE, new_decoder_architecture=True, num_kv_heads=2),
    # partial rotary (Pythia's rotary_pct 0.25: 4 of 16 dimensions rotate)
    "gpt_neox": lambda: hf.GPTNeoXConfig(
        **SHAPE, intermediate_size=128, max_position_embeddings=256
    ),
    # learned absolute positions, the query scaled before attention (the adapter moves it)
    "opt": lambda: hf.OPTConfig(**SHAPE, ffn_dim=128, max_position_embeddings=256),
    "gpt2": lambda: hf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # a per-layer scale (1 / (layer + 1)) on top of 1/sqrt(D), and the eager-only upcast flag
    "gpt2-layer-scaled": lambda: hf.GPT2Config(
        vocab_size=97,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
    ),
}
# Families driven through an adapter (hf/adapters/), and their real KV heads per layer.
ADAPTED_KV_HEADS = {"falcon-mqa": 1, "falcon-new": 2, "gpt_neox": 4, "opt": 4, "gpt2": 4}


def build(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_a_budget_covering_the_sequence_is_the_plain_model(family):
    model = build(SUPPORTED[family]())
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        reference = model(input_ids=plain).logits
    cache = LessCache(model, "h2o", 64)
    greedy = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, **cache_argument(model, cache)
    )
    assert torch.equal(greedy, plain)
    cache = LessCache(model, "h2o", 64)
    assert torch.allclose(decode_steps(model, cache, plain), reference, atol=1e-4)
    set_method(model, "baseline", policy=make_policy("h2o", 64))
    with torch.no_grad():
        parallel = model(input_ids=plain).logits
    set_method(model, "full")
    assert torch.allclose(parallel, reference, atol=1e-4)


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_small_budgets_decode_like_the_parallel_form(family):
    model = build(SUPPORTED[family]())
    policy = make_policy("h2o", BUDGET)
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    set_method(model, "baseline", policy=policy)
    with torch.no_grad():
        parallel = model(input_ids=ids).logits
    set_method(model, "full")
    cache = LessCache(model, policy)
    assert torch.allclose(decode_steps(model, cache, ids), parallel, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2-mixed", "gemma3"])
def test_local_layers_keep_their_window_batched_and_chunked(family):
    """In a model mixing local and global layers, the local layers keep exactly the newest
    ``window`` pairs (the model's own rule), so a left-padded batch, a chunked prefill and
    one-by-one generation all agree with the plain model's greedy tokens while the global
    layers evict to the budget."""
    model = build(SUPPORTED[family]())
    a = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    b = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0

    def generate(ids, attention_mask=None, budget=64):
        cache = LessCache(model, "h2o", budget)
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask,
            max_new_tokens=10,
            do_sample=False,
            **cache_argument(model, cache),
        )
        return out[:, ids.shape[1] :], cache

    together, cache = generate(batch, mask)
    assert torch.equal(together[0], generate(a)[0][0])
    assert torch.equal(together[1], generate(b)[0][0])
    plain = model.generate(input_ids=a, max_new_tokens=10, do_sample=False)[:, 40:]
    assert torch.equal(generate(a)[0], plain)  # budget 64 > 50: only the window evicts
    windows = [layer.capacity for layer in cache.layers if layer.window is not None]
    assert windows and set(windows) == {16}
    chunked = LessCache(model, "h2o", 64)
    with torch.no_grad():
        whole = model(input_ids=a).logits[:, -1]
        for start in range(0, 40, 12):
            last = model(input_ids=a[:, start : start + 12], **cache_argument(model, chunked))
    assert torch.allclose(last.logits[:, -1], whole, atol=1e-4)


@pytest.mark.parametrize("family", sorted(ADAPTED_KV_HEADS))
@pytest.mark.parametrize("method", ["baseline", "merge", "less"])
def test_adapted_families_decode_like_their_parallel_form_on_their_real_kv_heads(family, method):
    """Each adapter drives the family's own projections; the cache holds its real KV heads,
    and every method (LESS's kernels included) decodes like its teacher-forced form."""
    model = build(SUPPORTED[family]())
    kernels = kernel_set(model) if method == "less" else None
    policy = make_policy("h2o", BUDGET)
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    set_method(model, method, policy=policy, kernels=kernels and list(kernels.layers), rank=4)
    with torch.no_grad():
        parallel = model(input_ids=ids).logits
    set_method(model, "full")
    cache = make_cache(model, method, policy, kernels, rank=4)
    assert torch.allclose(decode_steps(model, cache, ids), parallel, atol=1e-4)
    assert cache.layers[0].keys.shape == (2, ADAPTED_KV_HEADS[family], BUDGET, 16)


def test_the_falcon_adapter_takes_the_calls_of_every_transformers_release():
    """transformers <= 5.24 passes ``alibi=None`` to Falcon's attention, 5.25 no longer does."""
    model = build(SUPPORTED["falcon-new"]())
    set_method(model, "baseline", policy=make_policy("h2o", 4))
    attention = model.transformer.h[0].self_attention
    assert attention.lesskv_adapter
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8)[None]
    inputs = dict(
        position_ids=positions, position_embeddings=model.transformer.rotary_emb(hidden, positions)
    )
    with torch.no_grad():
        new, _ = attention(hidden, attention_mask=None, **inputs)
        old, _ = attention(hidden, alibi=None, attention_mask=None, **inputs)
    set_method(model, "full")
    assert torch.equal(new, old)


def test_falcon_with_alibi_is_refused():
    with pytest.raises(LessKVError, match="ALiBi"):
        LessCache(build(hf.FalconConfig(**SHAPE, alibi=True)), "h2o", 8)


def test_opt_attention_sees_the_unscaled_query_and_its_own_scale():
    """OPT scales its query projection before attention; lesskv reads the scale off the
    module (training, analyses), so the adapter passes it to attention instead: attention
    sees the plain projection and the module's scale, the logits stay the plain model's."""
    model = build(SUPPORTED["opt"]())
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    module = attention_modules(enable(model))[0]
    projected, seen = [], []
    module.q_proj.register_forward_hook(lambda m, args, out: projected.append(out))
    setup = LayerSetup(observer=lambda module, query, key, value: seen.append(query))
    with using_setups(model, {module: setup}), torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert torch.allclose(adapted, plain, atol=1e-5)
    assert torch.equal(seen[0], projected[0].view(2, 20, 4, 16).transpose(1, 2))
    assert attention_scale(module) == 16**-0.5


def test_gpt2_with_cross_attention_is_refused():
    config = hf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, add_cross_attention=True)
    with pytest.raises(LessKVError, match="cross-attention"):
        LessCache(build(config), "h2o", 8)


def test_other_attention_styles_are_refused_by_name():
    """An architecture with no attention modules lesskv knows (GPT-Neo: its own attention
    code) is refused by the model's name, before any work."""
    config = hf.GPTNeoConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global"], 2]]
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    name = type(model).__name__
    with pytest.raises(LessKVError, match=f"{name} has no attention modules lesskv can drive"):
        LessCache(model, "h2o", 8)


@pytest.mark.parametrize("family", ["falcon-mqa", "gpt_neox", "opt", "gpt2"])
def test_per_layer_training_refuses_families_without_o_proj_before_any_work(family, tmp_path):
    config = TrainConfig(model=family, policy="h2o", budget="8", seq_lens=[32], sequences=2)
    windows = torch.randint(0, 97, (2, 32))
    with pytest.raises(LessKVError, match="not supported yet"):
        train_kernels(build(SUPPORTED[family]()), windows, make_policy("h2o", 8), config, tmp_path)
    assert not (tmp_path / "activations").exists()
