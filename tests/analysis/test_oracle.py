"""The rank-r residual oracle (paper Fig. 3, right): its SVD, its two ends (rank 0 is the plain
policy, rank = head dim is full attention), the report and the CLI on a tiny model."""

import json
from dataclasses import replace

import pytest
import torch

from helpers import SHAPES, WORDS, kernel_set, make_tiny_model, prompt, save_tiny
from lesskv.analysis.oracle import oracle_perplexity, plot_oracle
from lesskv.cli import main
from lesskv.core import math
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf.attention import using_setups
from lesskv.hf.methods import layer_setups, using_method
from lesskv.hf.modules import attention_modules

HEAD_DIM = 16  # the tiny models' (hidden 96 over 6 query heads)


def test_truncated_is_the_svd_reconstruction_of_the_top_singular_values():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 8)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    for rank in (1, 3, 7):
        expected = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
        assert math.truncated(x, rank).double() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(math.truncated(x, 0), torch.zeros_like(x))
    assert math.truncated(x, 8) == pytest.approx(x, abs=1e-5)
    assert math.truncated(x, 50) == pytest.approx(x, abs=1e-5)  # beyond the rank: all of it
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.ones(4))
    assert math.truncated(rank_one, 1) == pytest.approx(rank_one, abs=1e-5)
    assert math.truncated(x.bfloat16(), 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rank"):
        math.truncated(x, -1)


def oracle_logits(model, ids, policy, rank, attention_mask=None):
    setups = layer_setups(model, "baseline", policy)
    setups = {module: replace(s, oracle_rank=rank) for module, s in setups.items()}
    with using_setups(model, setups), torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def method_logits(model, ids, method, policy):
    with using_method(model, method, policy=policy), torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("policy", ["h2o", "lambda", "tova"])
def test_rank_zero_is_the_baseline_and_full_rank_is_full_attention(policy):
    model = make_tiny_model("llama-gqa")
    policy, ids = make_policy(policy, 8), prompt(40, batch=2)
    baseline = method_logits(model, ids, "baseline", policy)
    full = method_logits(model, ids, "full", policy)
    assert torch.equal(oracle_logits(model, ids, policy, 0), baseline)
    assert oracle_logits(model, ids, policy, HEAD_DIM) == pytest.approx(full, abs=1e-4)
    middle = oracle_logits(model, ids, policy, 2)
    assert not torch.allclose(middle, baseline, atol=1e-4)
    assert not torch.allclose(middle, full, atol=1e-4)
    # one SVD per batch row: a row scores the same alone as beside another
    assert oracle_logits(model, ids[1:], policy, 2) == pytest.approx(middle[1:], abs=1e-4)


def test_padding_queries_stay_out_of_the_residual():
    model = make_tiny_model("qwen2")
    policy, ids = make_policy("h2o", 8), prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding, as teacher-forced scoring pads
    padded = oracle_logits(model, ids, policy, 2, attention_mask=mask)
    alone = oracle_logits(model, ids[1:, :30], policy, 2)
    assert padded[1, :30] == pytest.approx(alone[0], abs=1e-4)


def test_report_ends_at_the_baseline_and_at_full_attention(tmp_path):
    model = make_tiny_model("llama-gqa")
    policy, windows = make_policy("h2o", 8), prompt(40, batch=3)
    kernels = list(kernel_set(model).layers)
    report = oracle_perplexity(
        model, windows, policy, [0, 2, HEAD_DIM], kernels, batch_size=2, progress=False
    )
    assert list(report.reference) == ["full", "baseline", "baseline+", "less"]
    assert report.oracle[0] == report.reference["baseline"]
    assert report.oracle[-1] == pytest.approx(report.reference["full"], abs=1e-5)
    rows = {(r["method"], r["rank"]): r for r in report.rows()}
    assert rows["full", ""]["gap_closed"] == 1.0 and rows["baseline+", ""]["gap_closed"] == 0.0
    assert rows["oracle", HEAD_DIM]["gap_closed"] == pytest.approx(1.0, abs=1e-3)
    saved = json.loads(report.save(tmp_path).read_text())
    assert saved["ranks"] == [0, 2, HEAD_DIM] and len(saved["rows"]) == 7
    assert plot_oracle(report, tmp_path).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(LessKVError, match="head dimension 16, got 17"):
        oracle_perplexity(model, windows, policy, [1, 17], progress=False)
    with pytest.raises(LessKVError, match="nothing is evicted"):
        oracle_perplexity(model, windows, make_policy("h2o", 40), [1], progress=False)


@pytest.mark.parametrize("kind", SHAPES)
def test_every_layout_ends_at_the_baseline_and_at_full_attention(kind):
    model = make_tiny_model(kind)
    policy, windows = make_policy("h2o", 8), prompt(40, batch=2)
    head_dim = attention_modules(model)[0].head_dim
    kernels = list(kernel_set(model).layers)
    report = oracle_perplexity(model, windows, policy, [0, head_dim], kernels, progress=False)
    assert report.head_dim == head_dim
    assert report.oracle[0] == report.reference["baseline"] != report.reference["full"]
    assert report.oracle[1] == pytest.approx(report.reference["full"], abs=1e-5)


def test_cli_writes_the_figure_and_refuses_bad_ranks(tmp_path, capsys):
    save_tiny(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[2 + i % 8] for i in range(400)))
    out = tmp_path / "oracle"
    args = ["analyze", "oracle", "--model", str(tmp_path / "model"), "--data", str(text)]
    args += ["--budget", "8", "--seq-len", "32", "--windows", "2", "--out", str(out)]
    for bad, words in (
        (["--ranks", "0,17"], "between 0 and the head dimension 16, got 17"),
        (["--ranks", "-1"], ">= 0"),
        (["--ranks=2,-3"], ">= 0"),
        (["--ranks", "1,two"], "argument --ranks: not an integer: 'two'"),
    ):
        capsys.readouterr()
        assert main([*args, *bad]) == 2
        # one line of lesskv's own (transformers' loading bar may precede it)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln and "it/s]" not in ln]
        assert len(err) == 1 and err[0].startswith("lesskv: error:") and words in err[0]
    assert main([*args, "--ranks", "4,0,16"]) == 0
    captured = capsys.readouterr()
    assert "no LESS line" in captured.err  # a local model ships no kernels
    assert "| method" in captured.out and "gap_closed" in captured.out
    saved = json.loads((out / "oracle.json").read_text())
    assert saved["ranks"] == [0, 4, 16] and list(saved["reference"]) == [
        "full",
        "baseline",
        "baseline+",
    ]
    assert (out / "oracle.png").read_bytes().startswith(b"\x89PNG")
