import math

import pytest
import torch
import torch.nn.functional as F

from helpers import BOS, WORDS, make_tiny_model, tiny_tokenizer
from lesskv.core.policies import make_policy
from lesskv.data import token_windows
from lesskv.evaluation.perplexity import evaluate_perplexity


def test_full_perplexity_is_the_models_own_and_methods_share_windows():
    model = make_tiny_model("llama-gqa")
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (3, 32))
    rows = evaluate_perplexity(
        model, windows, ["full", "baseline", "baseline+"], make_policy("h2o", 8), progress=False
    )
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 97), windows[:, 1:].reshape(-1))
    full, baseline, plus = rows
    assert math.isclose(full.ppl, math.exp(nll.item()), rel_tol=1e-5)
    assert full.tokens == baseline.tokens == 3 * 31
    assert (full.budget_tokens, baseline.budget_tokens, plus.budget_tokens) == (32, 8, 12)
    assert baseline.ppl != full.ppl


def test_full_perplexity_with_a_bos_tokenizer_is_plain_transformers_after_bos():
    """As plain transformers (and lm-eval) score a model whose tokenizer adds BOS: each window
    is BOS and the next seq_len - 1 tokens of text, every text token predicted, BOS not."""
    model, tokenizer = make_tiny_model("llama-gqa"), tiny_tokenizer(adds_bos=True)
    generator = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[2 + i] for i in torch.randint(0, 8, (80,), generator=generator))
    windows = token_windows(tokenizer, [text], 16, max_windows=4)
    (row,) = evaluate_perplexity(model, windows, ["full"], progress=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        losses = [
            model(input_ids=window, labels=window).loss
            for window in (torch.tensor([[BOS, *ids[15 * i : 15 * (i + 1)]]]) for i in range(4))
        ]
    assert row.ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert row.tokens == 4 * 15 and row.seq_len == 16


def test_budget_covering_the_window_gives_full_perplexity():
    model = make_tiny_model("qwen2")
    windows = torch.randint(0, 97, (2, 16))
    rows = evaluate_perplexity(
        model, windows, ["full", "baseline"], make_policy("lambda", 16), progress=False
    )
    assert math.isclose(rows[0].ppl, rows[1].ppl, rel_tol=1e-6)


def test_reported_head_bytes_are_what_the_caches_hold():
    """The table's memory column against the tensors a LessCache really allocates."""
    from helpers import kernel_set
    from lesskv.hf.compat import cache_argument
    from lesskv.hf.methods import make_cache

    model = make_tiny_model("llama-gqa")
    kernels = kernel_set(model)
    policy = make_policy("h2o", 8)
    windows = torch.randint(0, 97, (1, 32))
    methods = ["baseline", "baseline+", "merge", "less"]
    rows = evaluate_perplexity(
        model, windows, methods, policy, list(kernels.layers), rank=4, progress=False
    )
    for method, row in zip(methods, rows, strict=True):
        cache = make_cache(model, method, policy, kernels if method == "less" else None, rank=4)
        with torch.no_grad():
            model(input_ids=windows, **cache_argument(model, cache))
        held = cache.memory_bytes()
        heads = len(cache.layers) * 2  # layers x KV heads
        assert row.head_bytes == (held["kv"] + held["state"]) // heads, method
    pair = 2 * 16 * 4  # one K/V pair in fp32: the equal-memory methods agree within one
    assert all(abs(r.head_bytes - rows[1].head_bytes) <= pair for r in rows[2:])
    assert rows[1].head_bytes > rows[0].head_bytes


def test_methods_are_compared_with_baseline_plus_window_by_window():
    from lesskv.evaluation.perplexity import against

    model = make_tiny_model("llama-gqa")
    windows = torch.randint(1, 90, (3, 24), generator=torch.Generator().manual_seed(0))
    results = evaluate_perplexity(
        model,
        windows,
        ["full", "baseline", "baseline+"],
        policy=make_policy("h2o", 6),
        rank=2,
        progress=False,
    )
    rows = {r.method: r for r in results}
    assert all(len(r.window_nlls) == 3 for r in results)
    assert rows["full"].nll == pytest.approx(sum(rows["full"].window_nlls) / 3)
    (compared,) = against(results)
    diffs = torch.tensor(rows["baseline"].window_nlls) - torch.tensor(rows["baseline+"].window_nlls)
    assert compared["method"] == "baseline"
    assert compared["delta_nll"] == pytest.approx(diffs.mean().item())
    assert compared["se"] == pytest.approx(diffs.std().item() / 3**0.5)
    assert compared["lower_in"] == f"{int((diffs < 0).sum())}/3"
    gap = rows["baseline+"].nll - rows["full"].nll
    assert compared["gap_closed"] == pytest.approx(-diffs.mean().item() / gap)
    assert against(results[:2]) == []  # no baseline+, nothing to compare with
