"""The benchmark's code path on a tiny model: shapes, memory accounting and the plot.

Timings are only checked to be positive: a benchmark prints numbers, it never asserts speed.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import BUDGET, kernel_set, make_tiny_model, save_tiny, tiny_tokenizer
from lesskv.analysis.plots import plot_benchmark
from lesskv.cli import main
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.bench import (
    max_batch_for_memory,
    prompt_batch,
    run_benchmark,
)
from lesskv.hf.methods import PLAIN_STEPS, StepOptions

TEXT = ["the cat sat on a mat the dog ran on the mat " * 4]  # 48 words: forces repetition
METHODS = ("full", "baseline", "less")


@pytest.fixture(scope="module")
def setup():
    # One thread: on a busy machine thread hand-offs cost far more than the tiny model's math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_tiny_model("llama-gqa", max_position_embeddings=512)
    yield model, tiny_tokenizer(), make_policy("h2o", BUDGET), kernel_set(model)
    torch.set_num_threads(threads)


def test_grid_rows_memory_and_plot(setup, tmp_path):
    model, tokenizer, policy, kernels = setup
    rows = run_benchmark(
        model,
        tokenizer,
        contexts=(32, 64),
        batch_sizes=(1, 2),
        methods=METHODS,
        policy=policy,
        kernels=kernels,
        new_tokens=4,
        prompt_texts=TEXT,
        progress=False,
    )
    assert len(rows) == 2 * 2 * 3
    assert model.config._attn_implementation == "sdpa"  # left as it was found
    for row in rows:
        assert row.prefill_s > 0 and row.decode_ms_per_token > 0 and row.decode_tokens_per_s > 0
        assert row.decode_ms_p90 >= row.decode_ms_per_token
        assert row.cache_bytes == row.kv_bytes + row.state_bytes > 0
        assert row.peak_rss_bytes > 0 and row.as_dict()["method"] == row.method
    by = {(r.method, r.context, r.batch): r for r in rows}
    for batch in (1, 2):
        for context in (32, 64):
            full, base, less = (by[m, context, batch] for m in METHODS)
            assert full.budget_tokens == context and base.budget_tokens == BUDGET
            assert full.state_bytes == base.state_bytes == 0 < less.state_bytes
            assert base.cache_bytes < less.cache_bytes < full.cache_bytes
            assert less.kv_bytes == base.kv_bytes
            for row in (full, base, less):  # the arithmetic agrees with the real tensors
                fit = max_batch_for_memory(
                    model, context, 2**20, row.method, policy, 4, new_tokens=4
                )
                assert fit["bytes_per_sequence"] * batch == row.cache_bytes
                assert fit["max_batch"] == 2**20 // fit["bytes_per_sequence"]
        for method in ("baseline", "less"):  # eviction: constant whatever the context
            assert by[method, 32, batch].cache_bytes == by[method, 64, batch].cache_bytes
        assert by["full", 64, batch].cache_bytes > by["full", 32, batch].cache_bytes
    assert by["full", 64, 2].cache_bytes == 2 * by["full", 64, 1].cache_bytes

    png = plot_benchmark(rows, tmp_path / "plots" / "bench.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_shared_prefill_repeats_one_cache_across_the_batch(setup):
    model, tokenizer, policy, kernels = setup
    options = dict(
        contexts=(32,),
        batch_sizes=(3,),
        methods=METHODS,
        policy=policy,
        kernels=kernels,
        new_tokens=2,
        prompt_texts=TEXT,
        progress=False,
        warmup=False,
    )
    separate = run_benchmark(model, tokenizer, **options)
    shared = run_benchmark(model, tokenizer, shared_prefill=True, **options)
    for own, repeated in zip(separate, shared, strict=True):
        assert repeated.shared_prefill and not own.shared_prefill
        assert repeated.batch == 3 and repeated.cache_bytes == own.cache_bytes


def test_prompts_are_exact_real_text_windows(setup):
    _, tokenizer, _, _ = setup
    ids = prompt_batch(tokenizer, TEXT, 40, 3)
    assert ids.shape == (3, 40) and (ids >= 2).all()  # real words, no unk/eos


def test_context_beyond_the_model_is_refused(setup):
    model, tokenizer, policy, kernels = setup
    options = dict(batch_sizes=(1,), policy=policy, kernels=kernels, prompt_texts=TEXT)
    with pytest.raises(LessKVError, match="by 2 tokens"):
        run_benchmark(model, tokenizer, contexts=(510,), methods=["full"], new_tokens=4, **options)
    with pytest.raises(LessKVError, match="unknown"):
        run_benchmark(model, tokenizer, contexts=(32,), methods=["baseline+"], **options)
    with pytest.raises(LessKVError, match="kernels"):
        run_benchmark(
            model, tokenizer, contexts=(32,), methods=["less"], **{**options, "kernels": None}
        )


def test_cli_prints_table_json_plot_and_memory_fit(setup, tmp_path, capsys):
    save_tiny(tmp_path / "model")  # max_position_embeddings=256
    (tmp_path / "t.txt").write_text(TEXT[0])
    common = ["bench", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt")]
    common += ["--budget", "8", "--methods", "full,baseline", "--batch-sizes", "1,2"]
    out_json, out_png = tmp_path / "rows.json", tmp_path / "bench.png"
    args = [*common, "--contexts", "24,32", "--new-tokens", "2", "--json", str(out_json)]
    assert main([*args, "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "| method" in out and "max_batch" in out and "decode_tokens_per_s" in out
    assert out.count("baseline/full") == 4  # a paired ratio per grid point
    rows = json.loads(out_json.read_text())
    assert len(rows) == 8 and {r["method"] for r in rows} == {"full", "baseline"}
    assert out_png.read_bytes().startswith(b"\x89PNG")
    assert main([*common, "--contexts", "250", "--new-tokens", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar
    assert err.startswith("lesskv: error:") and "by 4 tokens" in err
    assert main([*common, "--contexts", "32,x"]) == 2
    assert "--contexts" in capsys.readouterr().err


def test_interleaved_methods_keep_their_caches_apart(setup):
    """Decoding methods round robin gives each the tokens and cache it gets alone."""
    from lesskv.evaluation import bench

    model, tokenizer, policy, kernels = setup
    ids = bench.prompt_batch(tokenizer, TEXT, 40, 2)
    together = bench._interleaved(model, ids, METHODS, policy, kernels, 6, "sdpa", 2, PLAIN_STEPS)
    for run in together:
        alone = bench._interleaved(
            model, ids, [run.method], policy, kernels, 6, "sdpa", 2, PLAIN_STEPS
        )[0]
        assert torch.equal(run.token, alone.token), run.method
        for mine, theirs in zip(run.cache.layers, alone.cache.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys)
    base, less = (r for r in together if r.method != "full")
    ratio, low, high = bench.paired_ratio(
        bench._row(less, policy, 40, 2, False, ids.device),
        bench._row(base, policy, 40, 2, False, ids.device),
    )
    assert 0 < low <= ratio <= high


@pytest.mark.slow
def test_compilation_is_timed_apart_from_the_steps(setup):
    """A compiled LESS run decodes the eager run's tokens; the compile time is counted once,
    in ``compile_s``, and no step carries it."""
    from lesskv.evaluation import bench

    model, tokenizer, policy, kernels = setup
    ids = bench.prompt_batch(tokenizer, TEXT, 40, 2)
    compiled, eager = (
        bench._interleaved(model, ids, ["less"], policy, kernels, 4, "sdpa", 2, step)[0]
        for step in (StepOptions(compile=True), StepOptions(compile=False))
    )
    assert torch.equal(compiled.token, eager.token)
    assert eager.compile_s == 0
    assert compiled.compile_s > 0.05 and max(compiled.steps) < compiled.compile_s


def test_the_memory_arithmetic_counts_a_mixed_models_local_windows():
    """Gemma 3's local layers keep their window whatever the method: the arithmetic must agree
    with the real cache there too, not charge every layer the full context."""
    model = make_tiny_model("gemma3", max_position_embeddings=512)
    policy, kernels = make_policy("h2o", BUDGET), kernel_set(model)
    rows = run_benchmark(
        model,
        tiny_tokenizer(),
        contexts=(48,),
        batch_sizes=(1,),
        methods=METHODS,
        policy=policy,
        kernels=kernels,
        new_tokens=4,
        prompt_texts=TEXT,
        progress=False,
    )
    for row in rows:
        fit = max_batch_for_memory(model, 48, 2**20, row.method, policy, 4, new_tokens=4)
        assert fit["bytes_per_sequence"] == row.cache_bytes
