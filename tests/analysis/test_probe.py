"""The per-layer probe (`lesskv analyze layers`): attention split exactly at the policy's
eviction, a kernel set's error taken apart into its state's mass and mean, candidate kernel
sets (assembled, or an unfinished run's layers), --layers and --no-end-to-end."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import SHAPES, WORDS, kernel_set, make_tiny_model, prompt, save_tiny
from lesskv.analysis import layers as probe
from lesskv.analysis.candidates import load_candidate
from lesskv.analysis.layers import (
    _squared_errors,
    diagnose_layers,
    less_outputs,
    plot_layers,
    split_attention,
)
from lesskv.cli import main
from lesskv.core import math as attention_math
from lesskv.core.forms.lowrank import LowRankForm
from lesskv.core.kernels import LayerKernels, make_kernels
from lesskv.core.policies import keep_mask_from_steps, make_policy
from lesskv.errors import LessKVError
from lesskv.evaluation import perplexity
from lesskv.hf.attention import layer_output
from lesskv.hf.methods import get_method, observing
from lesskv.hf.modules import attention_scale, policy_layers
from lesskv.training.checkpoints import save_layer


class ExactState(LowRankForm):
    """A state whose ``(num, den)`` are the truth: one feature per position, so that
    ``φ(q)·ψ(k_j) = exp(q·k_j·scale)`` exactly for the keys it was built on."""

    def __init__(self, key: torch.Tensor, scale: float) -> None:
        _, hkv, t, d = key.shape
        super().__init__(hkv, d, t)
        self.key, self.scale = key, scale

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        return attention_math.attention_logits(q, self.key, self.scale).exp()

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        b, hkv, t, _ = k.shape
        return torch.eye(t).expand(b, hkv, t, t)

    def decay_rate(self) -> torch.Tensor:
        return torch.zeros(self.key.shape[1])


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: int) -> tuple:
    """``(module, query, key, value)`` of ``layer`` on a 32-token prompt."""
    seen = []
    with observing(model, lambda *inputs: seen.append(inputs), layers=[layer]):
        model(prompt(32))
    return seen[0]


@pytest.mark.parametrize("kind", SHAPES)
@torch.no_grad()
def test_the_split_is_full_attention_and_a_true_state_removes_all_the_error(kind):
    """Kept and evicted parts join to full attention; the kept part alone is the plain policy;
    a state claiming the true mass and mean reproduces full attention whichever half is
    swapped for the truth (share 1); the shipped kernels give what the model runs."""
    model, policy = make_tiny_model(kind), make_policy("h2o", 8)
    layer = policy_layers(model)[-1]
    module, query, key, value = layer_inputs(model, layer)
    scale = attention_scale(module)
    q = attention_math.group_queries(query, key.shape[1])
    split = split_attention(policy, q, key, value, scale)
    full = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=True
    ).view(q.shape)
    assert split.full() == pytest.approx(full, abs=1e-5)
    baseline = get_method("baseline").layer_setup(policy, module, None, 4)
    assert split.kept[0] == pytest.approx(
        layer_output(baseline, query, key, value, scale), abs=1e-5
    )
    exact = ExactState(key, scale)
    for out in less_outputs(split, exact, q, key, value).values():
        assert out == pytest.approx(full, abs=1e-5)
    errors = _squared_errors(module, query, key, value, policy, {"exact": exact}, 4, 8)
    for name in ("exact", "exact/mass_exact", "exact/mean_exact"):
        assert 1 - errors[name] / errors["baseline"] == pytest.approx(1.0, abs=1e-5)
    kernels = kernel_set(model).layers[layer]
    less = get_method("less").layer_setup(policy, module, kernels, 4)
    ours = less_outputs(split, kernels, q, key, value)[""]
    assert ours == pytest.approx(layer_output(less, query, key, value, scale), abs=1e-5)


@torch.no_grad()
def test_the_mean_key_mass_counts_the_evicted_pairs_at_their_mean_key():
    model, policy = make_tiny_model(), make_policy("h2o", 8)
    module, query, key, value = layer_inputs(model, 1)
    scale = attention_scale(module)
    q = attention_math.group_queries(query, key.shape[1])
    split = split_attention(policy, q, key, value, scale)
    evicted = ~keep_mask_from_steps(split.steps)[0, 0, -1, :]  # the last query sees all keys
    mean_key = key[0, 0, evicted].mean(0)
    expected = math.log(int(evicted.sum())) + float(q[0, 0, 0, -1] @ mean_key) * scale
    assert split.mean_key_lse[0, 0, 0, -1, 0].item() == pytest.approx(expected, abs=1e-4)
    assert split.mean_key_lse[0, 0, 0, 0, 0].item() == -math.inf  # nothing evicted yet


@pytest.fixture
def setting():
    model = make_tiny_model("llama-gqa")
    return model, make_policy("h2o", 8), list(kernel_set(model).layers), prompt(32, batch=2)


def test_a_candidate_equal_to_the_shipped_set_gives_identical_shares(setting):
    model, policy, kernels, windows = setting
    report = diagnose_layers(
        model, windows, policy, kernels, {}, candidates={"same": kernels}, progress=False
    )
    assert report.removed["same"] == report.removed["less"]
    assert report.decomposed["same"] == report.decomposed["less"]
    rows, columns = report.table()
    assert columns == [
        "layer",
        "sparse_error",
        "baseline+_removed",
        "less_removed",
        "less_mass_exact",
        "less_mean_exact",
        "same_removed",
        "same_mass_exact",
        "same_mean_exact",
        "mean_key_mass_removed",
        "oracle_removed",
    ]
    assert all(math.isfinite(row[c]) for row in rows for c in columns)


def test_layers_restricts_the_probe_and_the_end_to_end_rows(setting, tmp_path):
    model, policy, kernels, windows = setting
    reference = {"full": 1.0, "baseline": 1.5, "baseline+": 1.4, "less": 1.3}
    report = diagnose_layers(model, windows, policy, kernels, reference, layers=[1], progress=False)
    assert math.isnan(report.sparse_error[0]) and not math.isnan(report.sparse_error[1])
    assert all(math.isnan(shares[0]) for shares in report.removed.values())
    assert report.layers_probed == [1] and len(report.only["full"]) == 1
    assert [row["layer"] for row in report.table()[0]] == [1]
    assert plot_layers(report, tmp_path).stat().st_size > 0
    with pytest.raises(LessKVError, match="runs in none of layers"):
        diagnose_layers(model, windows, policy, kernels, reference, layers=[5], progress=False)


def unfinished_run(folder, model, layer=1, policy="h2o"):
    """A `lesskv train --layers` run folder that has written only ``layer``'s kernels."""
    save_layer(folder, layer, kernel_set(model).layers[layer], {"val_loss": 0.5})
    (folder / "run.json").write_text(json.dumps({"policy": policy, "state": "decay"}))


def test_an_unfinished_run_loads_as_a_candidate_lacking_its_untrained_layers(setting, tmp_path):
    model, policy, kernels, windows = setting
    unfinished_run(tmp_path / "run", model)
    layers = load_candidate(tmp_path / "run", model, policy)
    assert layers[0] is None and isinstance(layers[1], LayerKernels)
    assert (layers[1].shape.rank, layers[1].shape.hidden) == (4, 16)  # from the weights
    report = diagnose_layers(
        model, windows, policy, kernels, {}, candidates={"run": layers}, progress=False
    )
    assert math.isnan(report.removed["run"][0]) and math.isnan(
        report.decomposed["run"]["mass_exact"][0]
    )
    assert report.removed["run"][1] == report.removed["less"][1]
    with pytest.raises(LessKVError, match="policy 'h2o', not 'lambda'"):
        load_candidate(tmp_path / "run", model, make_policy("lambda", 8))
    with pytest.raises(LessKVError, match="holds neither kernels"):
        load_candidate(tmp_path, model, policy)


def test_a_run_of_another_state_form_is_probed_through_its_own_read(setting, tmp_path):
    """A `--kernel slots` run loads as slots (no φ/ψ) and the probe reads it through the form's
    teacher-forced `parallel`: its shares are measured, and differ from the low-rank set's."""
    model, policy, kernels, windows = setting
    shape = replace(kernels[1].shape, state="slots")
    torch.manual_seed(0)
    save_layer(tmp_path / "run", 1, make_kernels(shape).eval(), {"val_loss": 0.5})
    config = {"policy": "h2o", "state": "slots", "rank": 4, "hidden": 16}
    (tmp_path / "run" / "run.json").write_text(json.dumps(config))
    layers = load_candidate(tmp_path / "run", model, policy)
    assert layers[0] is None and type(layers[1]) is type(make_kernels(shape))
    report = diagnose_layers(
        model, windows, policy, kernels, {}, candidates={"slots": layers}, progress=False
    )
    share = report.removed["slots"][1]
    assert math.isfinite(share) and share != report.removed["less"][1]


@pytest.fixture
def cli_args(tmp_path):
    """`analyze layers` on a saved tiny model, its kernels and a text."""
    model = save_tiny(tmp_path / "model")
    kernel_set(model).save_pretrained(tmp_path / "kernels")
    unfinished_run(tmp_path / "run", model)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[2 + i % 8] for i in range(400)))
    args = ["analyze", "layers", "--model", str(tmp_path / "model"), "--data", str(text)]
    args += ["--budget", "8", "--seq-len", "32", "--windows", "2", "--out", str(tmp_path / "out")]
    return [*args, "--kernels", str(tmp_path / "kernels")]


def test_cli_probes_candidates_without_any_nll_pass(cli_args, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--no-end-to-end ran an NLL pass")

    monkeypatch.setattr(perplexity, "evaluate_perplexity", refuse)
    monkeypatch.setattr(probe, "mean_nll", refuse)
    candidates = ["--candidates", f"same={tmp_path / 'kernels'}", f"run={tmp_path / 'run'}"]
    assert main([*cli_args, "--layers", "1:2", "--no-end-to-end", *candidates]) == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(table) == 2 and "run_mean_exact" in table[0] and "dnll" not in table[0]
    saved = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert saved["candidates"] == {"same": str(tmp_path / "kernels"), "run": str(tmp_path / "run")}
    row = saved["rows"][1]
    assert row["same_removed"] == row["less_removed"] == row["run_removed"]
    assert math.isnan(saved["rows"][0]["run_removed"])
    assert (tmp_path / "out" / "layers.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (["--candidates", "foo"], "'foo' is not NAME=FOLDER"),
        (["--candidates", "a=/no/such/folder"], "a=/no/such/folder: no such folder"),
        (["--candidates", "less=/tmp"], "names must be distinct and none of"),
        (["--layers", "1:9"], "--layers '1:9' is out of range"),
    ],
)
def test_cli_bad_candidates_and_layers_are_one_line(cli_args, capsys, bad, words):
    capsys.readouterr()
    assert main([*cli_args, "--no-end-to-end", *bad]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln and "it/s]" not in ln]
    assert len(err) == 1 and err[0].startswith("lesskv: error:") and words in err[0], err
