"""One model shared by many threads: every call's result equals the same call run alone."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import kernel_set, make_tiny_model, tiny_kernels
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf import attention
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import make_cache, set_method, using_method

ROUNDS = 3  # a race shows up only sometimes: run the whole mix several times
# (method, policy, budget, batch): every method beside transformers' own full cache.
MIX = [
    ("full", "h2o", 6, 1),
    ("baseline", "h2o", 6, 2),
    ("baseline", "lambda", 10, 1),
    ("baseline+", "h2o", 10, 1),
    ("baseline+", "lambda", 6, 2),
    ("less", "h2o", 6, 1),
    ("less", "h2o", 10, 2),
    ("less", "lambda", 6, 1),
    ("less", "lambda", 10, 2),
]


def prompt(length, batch=1, seed=0):
    """Token ids from a private generator: the global one would race between threads."""
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_together(task, cases):
    """``task(case)`` for every case in its own thread, all released at once."""
    start = threading.Barrier(len(cases))

    def synchronised(case):
        start.wait()
        return task(case)

    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(synchronised, cases))


@pytest.fixture(scope="module")
def shared():
    model = make_tiny_model("llama-gqa")
    kernels = {name: kernel_set(model, name) for name in ("h2o", "lambda")}
    return model, kernels


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_generations_equal_sequential_ones(shared, round_):
    model, kernels = shared

    def generate(case):
        method, policy_name, budget, batch = case
        ids = prompt(16 + 3 * MIX.index(case), batch=batch, seed=MIX.index(case))
        policy = make_policy(policy_name, budget)
        cache = make_cache(model, method, policy, kernels[policy_name], rank=4)
        out = model.generate(
            input_ids=ids, max_new_tokens=10, do_sample=False, **cache_argument(model, cache)
        )
        return out[:, ids.shape[1] :]

    alone = [generate(case) for case in MIX]
    together = run_together(generate, MIX)
    for case, a, b in zip(MIX, alone, together, strict=True):
        assert torch.equal(a, b), case


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_teacher_forced_scoring_equals_sequential(shared, round_):
    model, _ = shared
    layers = tiny_kernels(model)

    def score(case):
        method, policy_name, budget, batch = case
        ids = prompt(30, batch=batch, seed=MIX.index(case))
        options = {} if method == "full" else {"policy": make_policy(policy_name, budget)}
        if method == "less":
            options["kernels"] = layers
        with using_method(model, method, rank=4, **options), torch.no_grad():
            return model(input_ids=ids).logits

    alone = [score(case) for case in MIX]
    together = run_together(score, MIX)
    for case, a, b in zip(MIX, alone, together, strict=True):
        assert torch.allclose(a, b, atol=1e-6), case


def test_a_method_set_in_one_thread_is_invisible_to_others(shared):
    model, _ = shared
    ids = prompt(30)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    set_method(model, "baseline", policy=make_policy("h2o", 6))
    try:
        with ThreadPoolExecutor(1) as pool, torch.no_grad():
            elsewhere = pool.submit(lambda: model(input_ids=ids).logits).result()
            here = model(input_ids=ids).logits
    finally:
        set_method(model, "full")
    assert torch.equal(elsewhere, reference)
    assert not torch.allclose(here, reference, atol=1e-4)


def test_one_cache_in_two_threads_is_refused(shared):
    model, _ = shared
    cache = LessCache(model, "h2o", 6)
    ids = prompt(12)
    with torch.no_grad():
        model(input_ids=ids, **cache_argument(model, cache))
        with ThreadPoolExecutor(1) as pool, pytest.raises(LessKVError, match="another thread"):
            pool.submit(model, input_ids=ids[:, :1], **cache_argument(model, cache)).result()


def test_a_cache_serves_only_its_model_and_batch_size(shared):
    model, _ = shared
    cache = LessCache(model, "h2o", 6)
    twin = make_tiny_model("llama-gqa")
    attention.enable(twin)
    with torch.no_grad():
        with pytest.raises(LessKVError, match="another model"):
            twin(input_ids=prompt(12), **cache_argument(twin, cache))
        with pytest.raises(LessKVError, match="another model"):  # its state is mixed now
            model(input_ids=prompt(12), **cache_argument(model, cache))
        cache = LessCache(model, "h2o", 6)
        model(input_ids=prompt(12), **cache_argument(model, cache))
        with pytest.raises(LessKVError, match="holds 1 sequences, not 2"):
            model(input_ids=prompt(1, batch=2), **cache_argument(model, cache))


@pytest.mark.slow
def test_default_model_serves_eight_threads_like_one():
    """The report's case: SmolLM2, 4 prompts x {H2O, Λ} LESS, budget 48, 24 new tokens."""
    from lesskv.hf.checkpoint import LessKernels, shipped_kernels
    from lesskv.hf.loading import load_model

    model, tokenizer = load_model()
    kernels = {
        name: LessKernels.from_pretrained(
            shipped_kernels("smollm2-135m", make_policy(name, 0.1)), model
        )
        for name in ("h2o", "lambda")
    }
    texts = [
        "The history of the city begins with a small settlement on the river, where",
        "In mathematics, a prime number is a natural number greater than one that",
        "The old lighthouse keeper climbed the stairs every evening and",
        "Photosynthesis is the process by which green plants use sunlight to",
    ]
    cases = [(text, name) for text in texts for name in ("h2o", "lambda")]

    def generate(case):
        text, name = case
        ids = tokenizer(text * 2, return_tensors="pt").input_ids
        cache = LessCache(model, name, 48, kernels=kernels[name])
        out = model.generate(
            input_ids=ids, max_new_tokens=24, do_sample=False, **cache_argument(model, cache)
        )
        return out[:, ids.shape[1] :]

    alone = [generate(case) for case in cases]
    for _ in range(2):
        together = run_together(generate, cases)
        assert sum(torch.equal(a, b) for a, b in zip(alone, together, strict=True)) == len(cases)
