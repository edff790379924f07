"""LessCache: real eviction that decodes exactly like the parallel (teacher-forced) form."""

import gc
import weakref

import pytest
import torch

from helpers import BUDGET, decode_steps, kernel_set, make_tiny_model, prompt
from lesskv.core.policies import POLICIES, make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.generation import prefill_in_chunks
from lesskv.hf import attention, recurrent
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import make_cache, set_method, using_method


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", ["baseline", "merge", "less"])
def test_token_by_token_decoding_equals_the_parallel_form(tiny_model, policy, method):
    ids = prompt(40, batch=2)
    pol = make_policy(policy, BUDGET)
    kernels = kernel_set(tiny_model, policy) if method == "less" else None
    layers = list(kernels.layers) if kernels is not None else None
    set_method(tiny_model, method, policy=pol, kernels=layers, rank=4)
    with torch.no_grad():
        parallel = tiny_model(input_ids=ids).logits
    set_method(tiny_model, "full")
    cache = make_cache(tiny_model, method, pol, kernels=kernels, rank=4)
    steps = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = tiny_model(
                input_ids=ids[:, t : t + 1], use_cache=True, **cache_argument(tiny_model, cache)
            )
            steps.append(out.logits)
            for layer in cache.layers:  # the cache really holds only the budget
                assert layer.keys.shape[2] == layer.values.shape[2] == BUDGET
                assert int(layer.valid.sum(-1).max()) == min(t + 1, BUDGET)
    assert torch.allclose(torch.cat(steps, 1), parallel, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]
    if method == "merge":  # every evicted pair sits in exactly one slot
        for layer in cache.layers:
            counts = layer.merge.counts.sum(-1)
            assert torch.equal(counts, torch.full_like(counts, 40.0 - BUDGET))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_plain_prompt_takes_the_prompt_path_to_the_same_cache(policy, monkeypatch):
    """A prompt without padding takes its own path (blocked softmax with the policy's column
    sums, or one fused causal call); it must leave exactly what the general masked path
    leaves."""
    model = make_tiny_model("llama-gqa")
    ids = prompt(60, batch=2)
    kernels = kernel_set(model, policy)
    caches, taken = {}, []
    real = recurrent._prompt_attention
    for fast in (True, False):
        fake = (lambda *a: taken.append(1) or real(*a)) if fast else (lambda *a: None)
        monkeypatch.setattr(recurrent, "_prompt_attention", fake)
        cache = LessCache(model, make_policy(policy, BUDGET), kernels=kernels)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=True, **cache_argument(model, cache)).logits
        caches[fast] = cache, logits
    (fast, fast_logits), (general, general_logits) = caches[True], caches[False]
    assert len(taken) == 2  # both layers of the first run took the prompt path
    assert torch.allclose(fast_logits, general_logits, atol=1e-5)
    for a, b in zip(fast.layers, general.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
        # later layers' keys carry the first layer's float rounding (another summation order)
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        for held_a, held_b in zip(a.state, b.state, strict=True):
            assert torch.allclose(held_a, held_b, atol=1e-5)


@pytest.mark.parametrize("method", ["merge", "less"])
def test_batched_left_padded_generation_equals_one_by_one(method):
    model = make_tiny_model("llama-gqa")
    kernels = kernel_set(model) if method == "less" else None
    a, b = prompt(20, seed=1), prompt(14, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0

    def generate(ids, attention_mask=None):
        cache = make_cache(model, method, make_policy("h2o", BUDGET), kernels, rank=4)
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask,
            **cache_argument(model, cache),
            max_new_tokens=12,
            do_sample=False,
        )
        return out[:, ids.shape[1] :], cache

    together, cache = generate(batch, mask)
    assert torch.equal(together[0], generate(a)[0][0])
    assert torch.equal(together[1], generate(b)[0][0])
    for layer in cache.layers:
        assert not any(t.isnan().any() for t in layer.state)
        assert method != "merge" or not layer.merge.keys.isnan().any()


def summary(layer):
    """What a layer keeps of its evicted pairs: LESS's state or the merge slots."""
    if layer.merge is not None:
        return [layer.merge.keys, layer.merge.values, layer.merge.counts]
    return list(layer.state)


@pytest.mark.parametrize("method", ["merge", "less"])
def test_padding_never_enters_the_state(method):
    model = make_tiny_model("qwen2")
    kernels = kernel_set(model) if method == "less" else None
    ids = prompt(20)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], 1)
    mask = torch.ones_like(padded)
    mask[:, :7] = 0
    states = []
    for inputs, attention_mask in ((ids, None), (padded, mask)):
        cache = make_cache(model, method, make_policy("h2o", BUDGET), kernels, rank=4)
        positions = None if attention_mask is None else (attention_mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            model(
                input_ids=inputs,
                attention_mask=attention_mask,
                position_ids=positions,
                **cache_argument(model, cache),
            )
        states.append([summary(layer) for layer in cache.layers])
    for unpadded, padded_state in zip(*states, strict=True):
        for a, b in zip(unpadded, padded_state, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    if method == "merge":
        for layer in cache.layers:
            assert torch.equal(layer.merge.counts.sum(-1), torch.full((1, 2), 20.0 - BUDGET))


def test_fully_padded_rows_give_no_nan():
    model = make_tiny_model("llama-mha")
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # only the last token of row 1 is real
    cache = LessCache(model, "h2o", 4, kernels=kernel_set(model))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **cache_argument(model, cache)).logits
    assert not logits[:, -1].isnan().any()


def test_long_generation_keeps_cache_memory_flat():
    model = make_tiny_model("llama-gqa", max_position_embeddings=8192)
    cache = LessCache(model, "h2o", 32, kernels=kernel_set(model))
    model.generate(
        input_ids=prompt(64), **cache_argument(model, cache), max_new_tokens=8, do_sample=False
    )
    before = cache.memory_bytes()
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    ids = torch.randint(1, 97, (1, 4000))
    with torch.no_grad():
        for t in range(4000):
            model(input_ids=ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True)
    assert cache.get_seq_length() == 64 + 8 + 4000 - 1
    assert cache.memory_bytes() == before
    assert [layer.keys.data_ptr() for layer in cache.layers] == pointers  # written in place


def test_beam_search_and_sampling_work():
    model = make_tiny_model("mistral")
    ids = prompt(12)
    beams = model.generate(
        input_ids=ids,
        **cache_argument(model, LessCache(model, "lambda", 8)),
        num_beams=3,
        max_new_tokens=6,
        do_sample=False,
    )
    assert beams.shape == (1, 18)
    samples = model.generate(
        input_ids=ids,
        **cache_argument(model, LessCache(model, "h2o", 8)),
        do_sample=True,
        num_return_sequences=3,
        max_new_tokens=6,
    )
    assert samples.shape == (3, 18)


@pytest.mark.parametrize("method", ["merge", "less"])
def test_cache_size_equals_budget_plus_state(method):
    model = make_tiny_model("llama-gqa")
    kernels = kernel_set(model) if method == "less" else None
    cache = make_cache(model, method, make_policy("h2o", BUDGET), kernels, rank=4)
    with torch.no_grad():
        model(input_ids=prompt(30), **cache_argument(model, cache))
    kv_heads, head_dim, layers, rank = 2, 16, 2, 4
    state = rank * (head_dim + 1) * 4  # LESS: H and z, fp32
    if method == "merge":  # as many slots (key sum, value sum, count) as fit in that
        state = state // ((2 * head_dim + 1) * 4) * (2 * head_dim + 1) * 4
    assert cache.memory_bytes() == {
        "kv": layers * 2 * kv_heads * BUDGET * head_dim * 4,
        "state": layers * kv_heads * state,
    }


def test_baseline_plus_holds_its_extra_pairs():
    model = make_tiny_model("llama-gqa")
    cache = LessCache(model, "h2o", BUDGET, extra_tokens=3)
    with torch.no_grad():
        model(input_ids=prompt(30), **cache_argument(model, cache))
    assert all(layer.keys.shape[2] == BUDGET + 3 for layer in cache.layers)


def test_bad_requests_are_refused():
    model = make_tiny_model("llama-gqa")
    with pytest.raises(LessKVError, match="budget"):
        LessCache(model, "h2o")
    with pytest.raises(LessKVError, match="context"):
        LessCache(model, "h2o", 100_000)
    with pytest.raises(LessKVError, match="trained for"):
        LessCache(model, "h2o", 8, kernels=kernel_set(make_tiny_model("llama-mha")))
    cache = LessCache(model, "h2o", 8)
    with pytest.raises(LessKVError, match="cropped"):
        cache.crop(-1)


def test_assisted_decoding_is_refused_with_a_clear_error():
    """Speculative decoding rolls rejected tokens back, which evicted pairs cannot undo."""
    model = make_tiny_model("llama-gqa")
    # newer transformers refuse it from is_croppable, older ones when crop() raises
    with pytest.raises(ValueError, match="(?i)assisted"):
        model.generate(
            input_ids=prompt(12),
            **cache_argument(model, LessCache(model, "h2o", BUDGET)),
            assistant_model=make_tiny_model("llama-gqa"),
            max_new_tokens=6,
            do_sample=False,
        )


def test_a_finished_cache_is_freed():
    model = make_tiny_model("llama-gqa")
    cache = LessCache(model, "h2o", BUDGET)
    model.generate(
        input_ids=prompt(10), **cache_argument(model, cache), max_new_tokens=2, do_sample=False
    )
    alive = weakref.ref(cache)
    del cache
    gc.collect()
    assert alive() is None


def test_a_cache_that_attention_never_sees_raises():
    model = make_tiny_model("llama-gqa")
    cache = LessCache(model, "h2o", BUDGET)
    model.set_attn_implementation("sdpa")  # attention would no longer go through lesskv
    with pytest.raises(LessKVError, match="attention implementation"), torch.no_grad():
        model(input_ids=prompt(12), **cache_argument(model, cache))
    attention.enable(model)
    cache = LessCache(model, "h2o", BUDGET)
    states = torch.zeros(1, 2, 3, 16)
    cache.update(states, states, 0)  # as an attention layer that then bypasses lesskv would
    with pytest.raises(LessKVError, match="attention never used the LessCache"):
        cache.update(states, states, 1)


@pytest.mark.parametrize("method", ["baseline", "less"])
def test_sparse_decoding_without_a_less_cache_raises(method):
    model = make_tiny_model("llama-gqa")
    kernels = kernel_set(model)
    options = {"kernels": list(kernels.layers)} if method == "less" else {}
    with (
        using_method(model, method, policy=make_policy("h2o", BUDGET), **options),
        pytest.raises(LessKVError, match="LessCache"),
    ):
        model.generate(input_ids=prompt(20), max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("method", ["baseline", "merge", "less"])
def test_a_bf16_model_caches_bf16_pairs_beside_an_fp32_summary(method):
    """fp32 kernels serve a bf16 model; both forms still agree (to bf16's precision)."""
    model = make_tiny_model("llama-gqa").to(torch.bfloat16)
    kernels = kernel_set(model) if method == "less" else None
    ids, pol = prompt(40, batch=2), make_policy("h2o", BUDGET)
    set_method(model, method, policy=pol, kernels=kernels and list(kernels.layers), rank=4)
    with torch.no_grad():
        parallel = model(input_ids=ids).logits.float()
    set_method(model, "full")
    cache = make_cache(model, method, pol, kernels, rank=4)
    assert torch.allclose(decode_steps(model, cache, ids).float(), parallel, atol=3e-2)
    layer = cache.layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in summary(layer))
    full_precision = make_tiny_model("llama-gqa")
    fp32 = make_cache(full_precision, method, pol, kernels and kernel_set(full_precision), rank=4)
    with torch.no_grad():
        full_precision(input_ids=ids, **cache_argument(full_precision, fp32))
    assert cache.memory_bytes()["kv"] * 2 == fp32.memory_bytes()["kv"]


def test_generate_past_the_context_stops_at_the_boundary_with_a_clear_error():
    """``model.generate`` cannot tell the cache its length up front: the step that would
    pass the model's context raises, and the cache keeps what it held (no torn state)."""
    model = make_tiny_model("llama-gqa")  # a 256-token context
    cache = LessCache(model, make_policy("h2o", BUDGET))
    with pytest.raises(LessKVError, match="exceed the model's context of 256"):
        model.generate(
            input_ids=prompt(250),
            max_new_tokens=20,
            do_sample=False,
            **cache_argument(model, cache),
        )
    assert cache.get_seq_length() == 256
    assert all(layer.seen == 256 for layer in cache.layers)


def test_cuda_graphs_on_a_cpu_model_are_refused_in_one_line():
    model = make_tiny_model("llama-gqa")
    with pytest.raises(LessKVError, match="needs the model on a CUDA device; it is on cpu"):
        LessCache(model, "h2o", BUDGET, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("method", ["baseline", "merge", "less"])
def test_decoding_replayed_as_cuda_graphs_equals_the_plain_steps(policy, method):
    model = make_tiny_model("llama-gqa").cuda()
    pol = make_policy(policy, BUDGET)
    kernels = kernel_set(model, policy).cuda() if method == "less" else None
    ids = prompt(40, batch=2).cuda()
    plain = make_cache(model, method, pol, kernels=kernels, rank=4)
    graphed = make_cache(model, method, pol, kernels=kernels, rank=4, cuda_graphs=True)
    want, got = decode_steps(model, plain, ids), decode_steps(model, graphed, ids)
    assert all(layer.captured.graph is not None for layer in graphed.layers)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 8, 39])
def test_a_fractional_budget_is_the_same_fraction_of_a_prompt_fed_in_chunks(chunk):
    """0.25 of a 40-token prompt is 10 pairs per head whether the prompt arrives at once or
    in chunks (a chunk alone would have fixed 0.25 of itself)."""
    model, ids = make_tiny_model("llama-gqa"), prompt(40)
    at_once = LessCache(model, "h2o", 0.25)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_argument(model, at_once))
    chunked = LessCache(model, "h2o", 0.25)
    with torch.no_grad():
        prefill_in_chunks(model, ids, chunked, chunk)
    assert [layer.capacity for layer in chunked.layers] == [10] * len(chunked.layers)
    assert [layer.capacity for layer in at_once.layers] == [10] * len(at_once.layers)
    with pytest.raises(LessKVError, match="before the cache's first call"):
        chunked.resolve_budget(80)
    chunked.reset()  # a new generation resolves anew, from its own first call
    with torch.no_grad():
        model(input_ids=ids[:, :20], use_cache=True, **cache_argument(model, chunked))
    assert chunked.layers[0].capacity == 5
