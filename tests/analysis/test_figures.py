"""Residual spectrum and attention maps: right numbers, non-empty figures, CLI on a tiny model."""

import json

import pytest
import torch

from helpers import SHAPES, WORDS, kernel_set, make_tiny_model, prompt, save_tiny
from lesskv.analysis.figures import (
    attention_maps,
    plot_attention_maps,
    plot_residual_energy,
    residual_energy,
    top_energy,
)
from lesskv.cli import main
from lesskv.core import math
from lesskv.core.policies import keep_mask_from_steps, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.methods import observing
from lesskv.hf.modules import attention_modules, policy_layers

PNG = b"\x89PNG"


def test_top_energy_of_a_rank_one_matrix_is_all_in_the_first_value():
    x = torch.outer(torch.arange(1.0, 6.0), torch.ones(4))
    assert top_energy(x, [1, 2, 8]).tolist() == pytest.approx([1.0, 1.0, 1.0])
    shares = top_energy(torch.randn(3, 20, 8), [1, 4, 8])
    assert (shares[:, :-1] <= shares[:, 1:]).all() and shares[:, -1] == pytest.approx(1.0)


def test_residual_report_and_figure(tmp_path):
    model = make_tiny_model("llama-gqa")  # 2 layers, 6 query heads of dim 16
    report = residual_energy(model, prompt(48, batch=2), make_policy("h2o", 12), progress=False)
    out, res = torch.tensor(report.output), torch.tensor(report.residual)
    assert out.shape == res.shape == (2, 6, 5)
    assert (out >= 0).all() and (res <= 1 + 1e-5).all()
    assert res[..., -1] == pytest.approx(torch.ones(2, 6))  # top-16 of a 16-dim head: all
    assert [r["layer"] for r in report.layer_rows()] == [0, 1]
    saved = json.loads(report.save(tmp_path).read_text())
    assert saved["budget_tokens"] == 12 and len(saved["layers"]) == 2
    png = plot_residual_energy(report, tmp_path)
    assert png.stat().st_size > 10_000 and png.read_bytes().startswith(PNG)
    with pytest.raises(LessKVError, match="nothing is evicted"):
        residual_energy(model, prompt(16), make_policy("h2o", 16), progress=False)


@pytest.mark.parametrize("kind", SHAPES)
def test_every_layout_has_residual_spectra_where_the_policy_runs(kind, tmp_path):
    model = make_tiny_model(kind)
    report = residual_energy(model, prompt(48, batch=2), make_policy("h2o", 12), progress=False)
    heads = model.config.num_attention_heads
    output = torch.tensor(report.output)
    assert output.shape == (len(attention_modules(model)), heads, 5)
    measured = [i for i in range(len(output)) if not output[i].isnan().any()]
    assert measured == policy_layers(model) and output[measured].le(1 + 1e-5).all()
    assert plot_residual_energy(report, tmp_path).read_bytes().startswith(PNG)


def test_a_local_layer_has_no_maps_to_draw():
    model = make_tiny_model("gemma3")
    with pytest.raises(LessKVError, match=r"layer 0 is a local .* among layers \[1\]"):
        attention_maps(model, prompt(20), 0, 0, make_policy("h2o", 4))
    maps = attention_maps(model, prompt(20), 1, 3, make_policy("h2o", 4))
    assert maps.evicted.any()


@pytest.mark.parametrize("head", [0, 5])
def test_less_effective_map_reproduces_the_less_output(head, tmp_path):
    model = make_tiny_model("llama-gqa")
    policy, kernels = make_policy("h2o", 8), list(kernel_set(model).layers)
    ids = prompt(40)
    maps = attention_maps(model, ids, layer=1, head=head, policy=policy, kernels=kernels)
    full, sparse, less = maps.maps["full"], maps.maps["sparse"], maps.maps["less"]
    for m in (full, sparse, less):
        assert m.sum(-1) == pytest.approx(torch.ones(40), abs=1e-5)
        assert (m.triu(1) == 0).all()
    assert (sparse[maps.evicted] == 0).all() and (less[maps.evicted] > 0).all()
    assert maps.evicted.sum() > 0 and not maps.evicted[:8].any()

    captured = {}

    def observe(module, query, key, value):
        if module.layer_idx == 1:
            captured.update(q=query, k=key, v=value, scale=module.scaling)

    with observing(model, observe), torch.no_grad():
        model(input_ids=ids)
    q = math.group_queries(captured["q"], captured["k"].shape[1])
    key, value = captured["k"], captured["v"]
    logits = math.attention_logits(q, key, captured["scale"])
    logits = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), math.NEG_INF)
    steps = policy.eviction_steps(logits, policy.slots(40), 40)
    with torch.no_grad():
        keep = keep_mask_from_steps(steps)[:, :, None]
        out, lse = math.sparse_attention(q, key, value, keep, captured["scale"])
        expected = math.join_summary(out, lse, kernels[1].parallel(q, key, value, steps))
    kv_head, member = divmod(head, q.shape[2])
    assert less @ value[0, kv_head] == pytest.approx(expected[0, kv_head, member], abs=1e-5)

    rows = {r["map"]: r for r in maps.summary_rows()}
    assert rows["full"]["tv_to_full"] == 0 and rows["sparse"]["mass_on_evicted"] == 0
    assert rows["full"]["mass_on_evicted"] > 0
    assert plot_attention_maps(maps, tmp_path).read_bytes().startswith(PNG)


def test_bad_layer_or_head():
    model = make_tiny_model("qwen2")
    with pytest.raises(LessKVError, match="layer"):
        attention_maps(model, prompt(10), 5, 0, make_policy("h2o", 4))
    with pytest.raises(LessKVError, match="head"):
        attention_maps(model, prompt(10), 0, 4, make_policy("h2o", 4))


def test_cli_writes_both_figures(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[2 + i % 8] for i in range(400)))
    kernels = kernel_set(model)
    kernels.save_pretrained(tmp_path / "kernels")
    common = ["--model", str(tmp_path / "model"), "--data", str(text), "--budget", "8"]

    out = tmp_path / "residual"
    args = ["analyze", "residual", *common, "--seq-len", "32", "--windows", "2", "--out", str(out)]
    assert main(args) == 0
    assert (out / "residual.png").stat().st_size > 0
    assert len(json.loads((out / "residual.json").read_text())["output"]) == 2

    out = tmp_path / "attention"
    base = ["analyze", "attention", *common, "--seq-len", "24", "--layer", "1", "--head", "3"]
    assert main([*base, "--out", str(out)]) == 0  # a local model ships no kernels: no LESS map
    assert "no LESS map" in capsys.readouterr().err
    summary = json.loads((out / "attention.json").read_text())["summary"]
    assert [r["map"] for r in summary] == ["full", "sparse"]
    assert main([*base, "--kernels", str(tmp_path / "kernels"), "--out", str(out)]) == 0
    summary = json.loads((out / "attention.json").read_text())["summary"]
    assert [r["map"] for r in summary] == ["full", "sparse", "less"]
    assert (out / "attention.png").read_bytes().startswith(PNG)
    assert main([*base, "--head", "99", "--out", str(out)]) == 2
    assert "head" in capsys.readouterr().err
