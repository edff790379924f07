"""Where LESS loses, per layer: the shares of the sparse error removed (against errors
computed by hand from the layer's inputs) and the end-to-end rows (against whole-model runs
of the same methods)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from helpers import SHAPES, WORDS, kernel_set, make_tiny_model, prompt, save_tiny
from lesskv.analysis.layers import diagnose_layers, end_to_end, plot_layers, sparse_error_shares
from lesskv.cli import main
from lesskv.core import math as attention_math
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation.perplexity import mean_nll
from lesskv.hf.attention import using_setups
from lesskv.hf.methods import layer_setups, observing, using_method
from lesskv.hf.modules import attention_modules, attention_scale, policy_layers


@pytest.fixture
def setting():
    model = make_tiny_model("llama-gqa")
    policy = make_policy("h2o", 8)
    kernels = list(kernel_set(model).layers)
    return model, policy, kernels, prompt(32, batch=2)


def test_shares_are_what_the_layer_outputs_say(setting):
    """Layer 0's inputs are the same under every method: its shares, recomputed by hand."""
    model, policy, kernels, windows = setting
    sparse, removed, _ = sparse_error_shares(
        model, windows, policy, {"less": kernels}, progress=False
    )
    seen = []
    with observing(model, lambda m, q, k, v: seen.append((m, q, k, v)), layers=[0]):
        for window in windows:
            model(window[None])
    errors = {"baseline": 0.0, "less": 0.0, "oracle": 0.0}
    for module, query, key, value in seen:
        q = attention_math.group_queries(query, key.shape[1])
        scale = attention_scale(module)
        full = attention_math.sparse_output(q, key, value, torch.ones(32, 32).tril().bool(), scale)
        steps = policy.eviction_steps(
            attention_math.causal_logits(q, key, scale), policy.slots(32), 32
        )
        keep = (torch.arange(32)[None, :] <= torch.arange(32)[:, None]) & (
            torch.arange(32)[:, None] < steps[..., None, :]
        )
        out, lse = attention_math.sparse_attention(q, key, value, keep[:, :, None], scale)
        k = kernels[0]
        less = attention_math.join_summary(out, lse, k.parallel(q, key, value, steps))
        residual = (full - out).reshape(1, -1, 32, full.shape[-1])
        errors["baseline"] += residual.square().sum().item()
        errors["less"] += (full - less).square().sum().item()
        rest = residual - attention_math.truncated(residual, 8)
        errors["oracle"] += rest.square().sum().item()
    assert sparse[0] == pytest.approx(errors["baseline"], rel=1e-4)
    for name in ("less", "oracle"):
        assert removed[name][0] == pytest.approx(1 - errors[name] / errors["baseline"], abs=1e-4)
    assert all(0 <= share <= 1 for share in removed["oracle"])  # the best rank-8 term
    assert len(sparse) == len(attention_modules(model))


def test_end_to_end_rows_are_whole_model_runs(setting):
    """LESS from layer 0 on is LESS everywhere; from the last layer on is LESS in it alone;
    a layer changed to full attention, the oracle or a kernel set is that whole-model run; a
    set lacking the layer gives NaN."""
    model, policy, kernels, windows = setting
    last = len(kernels) - 1
    partial = [None] * last + [kernels[last]]
    sets = {"less": kernels, "partial": partial}
    only, after = end_to_end(model, windows, policy, sets, [0, last], progress=False)
    with using_method(model, "less", policy=policy, kernels=kernels), torch.no_grad():
        everywhere = mean_nll(model, windows)
    assert after[0] == pytest.approx(everywhere, abs=1e-6)
    assert only["less"][1] == pytest.approx(after[1], abs=1e-6)
    assert math.isnan(only["partial"][0]) and only["partial"][1] == only["less"][1]
    plain = layer_setups(model, "baseline", policy)
    modules = attention_modules(model)
    for name, setup in (("full", None), ("oracle", replace(plain[modules[0]], oracle_rank=8))):
        setups = {m: s for m, s in plain.items() if m is not modules[0]}
        setups.update({modules[0]: setup} if setup else {})
        with using_setups(model, setups), torch.no_grad():
            assert only[name][0] == pytest.approx(mean_nll(model, windows), abs=1e-6)


def plain_error(module, query, key, value, policy) -> float:
    """``||O_full - O_sparse||^2`` of one layer's call, by hand."""
    t = key.shape[2]
    q = attention_math.group_queries(query, key.shape[1])
    scale = attention_scale(module)
    full = attention_math.sparse_output(q, key, value, torch.ones(t, t).tril().bool(), scale)
    steps = policy.eviction_steps(attention_math.causal_logits(q, key, scale), policy.slots(t), t)
    keep = torch.ones(t, t).tril().bool() & (torch.arange(t)[:, None] < steps[..., None, :])
    out, _ = attention_math.sparse_attention(q, key, value, keep[:, :, None], scale)
    return (full - out).square().sum().item()


def test_inputs_read_each_layer_where_the_method_runs(setting):
    """Layer 0 sees the embeddings whatever runs; the last layer, read with the plain policy
    running, has the error its inputs under that policy's forward give (by hand)."""
    model, policy, kernels, windows = setting
    sets = {"less": kernels}
    plain = layer_setups(model, "baseline", policy)
    clean = sparse_error_shares(model, windows, policy, sets, progress=False)[0]
    sparse = sparse_error_shares(model, windows, policy, sets, progress=False, inputs=plain)[0]
    assert sparse[0] == pytest.approx(clean[0], rel=1e-5)
    last = attention_modules(model)[-1]
    seen = []
    observer = lambda *call: seen.append(call)  # noqa: E731
    setups = {**plain, last: replace(plain[last], observer=observer)}
    with using_setups(model, setups), torch.no_grad():
        for window in windows:
            model(window[None])
    assert sparse[-1] == pytest.approx(sum(plain_error(*c, policy) for c in seen), rel=1e-4)
    assert sparse[-1] != pytest.approx(clean[-1], rel=1e-3)


@pytest.mark.parametrize("kind", SHAPES)
def test_every_layout_is_diagnosed_where_the_policy_runs(kind, tmp_path):
    """Whatever the hidden size against heads x head_dim, and in a model mixing local and
    global layers, every layer where the policy runs is measured and probed (the local ones
    are NaN), and LESS from the first such layer on is LESS everywhere."""
    model, policy = make_tiny_model(kind), make_policy("h2o", 8)
    kernels, windows = list(kernel_set(model).layers), prompt(32, batch=2)
    reference = {"full": 1.0, "baseline": 1.5, "baseline+": 1.4, "less": 1.3}
    report = diagnose_layers(model, windows, policy, kernels, reference, progress=False)
    runs = policy_layers(model)
    assert [i for i, error in enumerate(report.sparse_error) if not math.isnan(error)] == runs
    assert report.layers_probed == runs and len(report.sparse_error) == len(kernels)
    assert all(0 <= report.removed["oracle"][i] <= 1 for i in runs)
    with using_method(model, "less", policy=policy, kernels=kernels), torch.no_grad():
        everywhere = mean_nll(model, windows)
    assert report.from_layer[0] == pytest.approx(everywhere, abs=1e-6)
    assert plot_layers(report, tmp_path).stat().st_size > 0


def test_report_rows_figure_and_refusal(setting, tmp_path):
    model, policy, kernels, windows = setting
    reference = {"full": 1.0, "baseline": 1.5, "baseline+": 1.4, "less": 1.3}
    report = diagnose_layers(
        model, windows, policy, kernels, reference, layer_step=2, progress=False
    )
    rows = report.rows()
    assert [row["layer"] for row in rows] == list(range(len(kernels)))
    assert math.isnan(rows[1]["less_only_dnll"]) and not math.isnan(rows[0]["less_only_dnll"])
    full, less = rows[0]["full_only_dnll"], rows[0]["less_only_dnll"]
    assert rows[0]["less_only_gap"] == pytest.approx(less / full)
    assert plot_layers(report, tmp_path).stat().st_size > 0
    assert report.save(tmp_path).exists()
    with pytest.raises(LessKVError, match="nothing is evicted"):
        diagnose_layers(model, windows, make_policy("h2o", 64), kernels, reference, progress=False)


def test_cli_writes_the_diagnosis_and_refuses_bad_numbers(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[2 + i % 8] for i in range(400)))
    out = tmp_path / "layers"
    args = ["analyze", "layers", "--model", str(tmp_path / "model"), "--data", str(text)]
    args += ["--budget", "8", "--seq-len", "32", "--windows", "2", "--out", str(out)]
    args += ["--kernels", str(tmp_path / "kernels")]
    for bad, words in (
        (["--oracle-rank", "17"], "between 0 and the head dimension 16, got 17"),
        (["--layer-step", "0"], "must be >= 1"),
    ):
        capsys.readouterr()
        assert main([*args, *bad]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln and "it/s]" not in ln]
        assert len(err) == 1 and err[0].startswith("lesskv: error:") and words in err[0]
    assert main([*args, "--oracle-rank", "4"]) == 0
    printed = capsys.readouterr().out
    assert "less_removed" in printed and "matching_removed" not in printed
    assert "less_only_gap" in printed and "oracle_only_dnll" in printed
    assert main([*args, "--oracle-rank", "4", "--matching", "--inputs", "baseline"]) == 0
    assert "matching_removed" in capsys.readouterr().out
    saved = json.loads((out / "layers.json").read_text())
    assert saved["oracle_rank"] == 4 and len(saved["rows"]) == 2
    assert saved["inputs"] == "baseline"
    assert (out / "layers.png").read_bytes().startswith(b"\x89PNG")
