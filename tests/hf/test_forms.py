"""Every registered state form (:data:`lesskv.core.kernels.FORMS`) through the same checks, on
the tiny layouts of ``SHAPES`` and every policy: decoding token by token through a real
LessCache gives the teacher-forced form's logits, the cache holds exactly the kept pairs plus
the forms' own ``nbytes``, and an untrained form starts as the plain policy where its
initialisation makes it one (every form must learn to beat Baseline+: tests/training)."""

import pytest
import torch

from helpers import BUDGET, SHAPES, decode_steps, left_padded, make_tiny_model, prompt
from lesskv.core.budget import STATES
from lesskv.core.kernels import FORMS
from lesskv.core.policies import POLICIES, make_policy
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import KernelMeta, LessKernels
from lesskv.hf.compat import cache_argument
from lesskv.hf.methods import set_method
from lesskv.hf.modules import attention_modules

# Forms whose untrained kernels add (next to) nothing to the plain policy; ``slots`` starts as
# a soft merge of the evicted pairs instead.
START_AS_THE_POLICY = ["decay", "paper"]


def test_every_state_name_has_its_form():
    assert set(FORMS) == set(STATES) and set(START_AS_THE_POLICY) <= set(FORMS)


def form_kernels(model, state, policy="h2o", trained=True):
    """Kernels of form ``state``: as initialised, or with every parameter drawn far from its
    start (``trained``), so that every term of the form matters."""
    meta = KernelMeta.for_model(
        model, "tiny", policy=policy, budget=str(BUDGET), rank=4, hidden=16, state=state
    )
    torch.manual_seed(0)
    kernels = LessKernels(meta).eval()
    if trained:
        with torch.no_grad():
            for parameter in kernels.parameters():
                parameter.normal_(0, 0.3)
    return kernels


def parallel_logits(model, ids, method, policy, kernels=None):
    set_method(model, method, policy=policy, kernels=kernels, rank=4)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        set_method(model, "full")


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("state", sorted(FORMS))
def test_decoding_equals_the_teacher_forced_form(kind, policy, state):
    model, pol = make_tiny_model(kind), make_policy(policy, BUDGET)
    kernels = form_kernels(model, state, policy)
    ids = prompt(40, batch=2)
    parallel = parallel_logits(model, ids, "less", pol, kernels)
    decoded = decode_steps(model, LessCache(model, pol, kernels=kernels), ids)
    assert torch.allclose(decoded, parallel, atol=1e-5, rtol=1e-5)
    baseline = parallel_logits(model, ids, "baseline", pol)
    assert not torch.allclose(parallel, baseline, atol=1e-3)  # the state did take part


@pytest.mark.parametrize("state", sorted(FORMS))
def test_a_left_padded_batch_generates_as_each_row_alone(state):
    """A prompt's compression (many pairs folded at once, padding at weight 0) and then
    decoding: each row of a left-padded batch generates what it generates alone."""
    model = make_tiny_model("llama-gqa")
    kernels = form_kernels(model, state)
    rows = [prompt(20, seed=1), prompt(14, seed=2)]

    def generate(ids, attention_mask=None):
        cache = LessCache(model, make_policy("h2o", BUDGET), kernels=kernels)
        out = model.generate(
            input_ids=ids,
            attention_mask=attention_mask,
            max_new_tokens=12,
            do_sample=False,
            **cache_argument(model, cache),
        )
        return out[:, ids.shape[1] :]

    together = generate(*left_padded(rows))
    for i, row in enumerate(rows):
        assert torch.equal(together[i], generate(row)[0])


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("state", sorted(FORMS))
def test_the_cache_holds_the_kept_pairs_and_the_forms_own_bytes(kind, state):
    model = make_tiny_model(kind)
    kernels = form_kernels(model, state)
    cache = LessCache(model, make_policy("h2o", BUDGET), kernels=kernels)
    batch = 3
    with torch.no_grad():
        model(input_ids=prompt(30, batch=batch), **cache_argument(model, cache))
    heads = model.config.num_key_value_heads
    head_dim = attention_modules(model)[0].head_dim
    forms = [kernels.layers[i] for i in kernels.meta.kernel_layers]
    pairs = sum(layer.capacity for layer in cache.layers)  # the budget, or a local window
    assert cache.memory_bytes() == {
        "kv": batch * heads * pairs * 2 * head_dim * 4,
        "state": batch * heads * sum(form.nbytes for form in forms),
    }
    for form in forms:  # within a rank-R state's memory, as the --rank option promises
        assert form.nbytes <= 4 * (head_dim + 1) * 4


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("state", START_AS_THE_POLICY)
def test_an_untrained_form_is_the_plain_policy(kind, policy, state):
    model, pol = make_tiny_model(kind), make_policy(policy, BUDGET)
    ids = prompt(40, batch=2)
    untrained = form_kernels(model, state, policy, trained=False)
    less = parallel_logits(model, ids, "less", pol, untrained)
    assert torch.allclose(less, parallel_logits(model, ids, "baseline", pol), atol=1e-4)
