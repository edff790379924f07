"""docs/gpu_bench.py, the 8B-shape decode benchmark, as a CPU smoke run on its tiny model (the
GPU run's table is in docs/RESULTS.md when one was made)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from lesskv.core.policies import make_policy
from lesskv.hf.compat import cache_argument

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "gpu_bench.py"


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_bench"]


def table(text: str, header: str) -> list[dict[str, str]]:
    """The Markdown table whose header row starts with ``header``, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny run takes the GPU there")
def test_the_tiny_run_prints_a_row_per_point_and_writes_the_json(bench_script, capsys, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--contexts", "64", "--batch-sizes", "1,2", "--steps", "2"]
    assert bench_script.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = table(text, "| method | mode |")
    points = {(r["method"], r["mode"], r["batch"]) for r in rows}
    assert points == {
        (m, mode, b)
        for m in ("full", "baseline", "less")
        for mode in ("eager", "graphs")
        for b in ("1", "2")
    }
    for row in rows:
        if row["mode"] == "graphs":  # CUDA graphs: GPU only
            assert row["status"] == "skipped: CUDA graphs need a GPU" and row["ms/step"] == "-"
            continue
        assert row["status"] == "ok", row
        numbers = [float(row[c]) for c in ("prefill s", "ms/step", "tokens/s", "x bound")]
        assert all(n > 0 for n in numbers)
        assert float(row["tokens/s"]) == pytest.approx(
            int(row["batch"]) * 1e3 / float(row["ms/step"]), rel=0.01
        )
        assert int(row["kept"]) == (64 if row["method"] == "full" else 6)  # H2O at 10%
    teacher_forced = table(text, "| method | context | status |")
    assert [(r["method"], r["status"]) for r in teacher_forced] == [("full", "ok"), ("less", "ok")]
    assert float(teacher_forced[1]["seconds"]) > 0
    saved = json.loads(out.read_text())
    assert len(saved["decode"]) == len(rows) == 12 and saved["weight_read_bytes"] > 0
    assert saved["copy_bandwidth_bytes_per_s"] > 0 and saved["elapsed_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the 8B model")
def test_without_a_gpu_the_8b_run_is_one_line(bench_script, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_script.main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "--tiny" in err and "\n" not in err


def test_bad_options_are_argparse_errors(bench_script, capsys):
    for argv in (["--tiny", "--methods", "full,fast"], ["--tiny", "--budget", "0"]):
        with pytest.raises(SystemExit) as exit_:
            bench_script.main(argv)
        assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bench(bench_script):
    policy = make_policy("h2o", "0.1")
    clock = bench_script.Clock(60.0)
    config = bench_script.tiny_config()
    bench, _ = bench_script.build_bench(config, torch.device("cpu"), policy, 2, clock, 0.0)
    return bench


def test_the_static_cache_decodes_like_the_prefilled_dynamic_one(bench_script, tiny_bench):
    """What the compiled full rows decode from: the one prefilled sequence in every row."""
    model = tiny_bench.model
    model.set_attn_implementation("sdpa")
    prefilled = DynamicCache(config=model.config)
    token, _, _ = bench_script.prefill(tiny_bench, prefilled, 40)
    static = bench_script.static_copy(model, prefilled, 3, 48)
    assert static.layers[0].keys.shape[:3] == (3, 2, 48)
    with torch.no_grad():
        expected = model(input_ids=token, **cache_argument(model, prefilled)).logits
        got = model(input_ids=token.repeat(3, 1), **cache_argument(model, static)).logits
    assert torch.allclose(got, expected.expand_as(got), atol=1e-2)  # bf16


def test_a_point_past_the_time_limit_stops_at_the_next_layer(bench_script, tiny_bench):
    row = bench_script.DecodeRow("full", "eager", 64, 1)
    clock = tiny_bench.clock
    try:
        clock.limit_s = clock.elapsed()  # the time is up: the prefill's first layer stops it
        assert not bench_script.attempt(tiny_bench, [row], bench_script.full_point, tiny_bench, row)
    finally:
        clock.limit_s = float("inf")
    assert row.status == "skipped: time limit" and row.ms_per_step is None


def test_a_group_estimated_past_the_time_left_is_skipped(bench_script, tiny_bench):
    """Prefill grows with the square of the context, timed steps linearly, warm-up stays."""
    clock, measured = tiny_bench.clock, tiny_bench.measured
    try:
        clock.limit_s = clock.elapsed() + 100
        measured["less", "eager"] = (1000, 10.0, 1.0, 5.0)  # context, prefill, steps, warm-up
        assert bench_script.too_slow(tiny_bench, "less", "eager", 1000) is None  # ~16 s
        skipped = bench_script.too_slow(tiny_bench, "less", "eager", 4000)  # 160 + 4 + 5 s
        assert skipped == "skipped: time limit (needs ~169 s)"
        assert bench_script.too_slow(tiny_bench, "less", "graphs", 4000) == skipped
        assert bench_script.too_slow(tiny_bench, "baseline", "eager", 4000) is None  # unknown
    finally:
        clock.limit_s = float("inf")
        measured.clear()
