import math

import torch
import torch.nn.functional as F

from helpers import make_tiny_model
from lesskv.core.policies import make_policy
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


def test_budget_covering_the_window_gives_full_perplexity():
    model = make_tiny_model("qwen2")
    windows = torch.randint(0, 97, (2, 16))
    rows = evaluate_perplexity(
        model, windows, ["full", "baseline"], make_policy("lambda", 16), progress=False
    )
    assert math.isclose(rows[0].ppl, rows[1].ppl, rel_tol=1e-6)
