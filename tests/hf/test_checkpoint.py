"""Kernel shapes, non-negativity, and checkpoints that refuse to be misused."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_tiny_model
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import CONFIG_FILE, WEIGHTS_FILE, KernelMeta, LessKernels


def kernels_for(model, policy="h2o", **fields):
    meta = KernelMeta.for_model(
        model, "tiny", policy=policy, budget="8", rank=4, hidden=16, **fields
    )
    torch.manual_seed(0)
    return LessKernels(meta)


def test_feature_maps_are_non_negative_with_grouped_shapes():
    model = make_tiny_model("llama-gqa")
    layer = kernels_for(model).layers[0].eval()
    q, k = torch.randn(2, 2, 3, 5, 16), torch.randn(2, 2, 5, 16)
    phi, psi = layer.phi(q), layer.psi(k)
    assert phi.shape == (2, 2, 3, 5, 4) and psi.shape == (2, 2, 5, 4)
    assert (phi >= 0).all() and (psi >= 0).all()


def test_round_trip(tmp_path):
    model = make_tiny_model("llama-gqa")
    kernels = kernels_for(model)
    kernels.save_pretrained(tmp_path)
    loaded = LessKernels.from_pretrained(tmp_path, model, policy="h2o")
    for a, b in zip(kernels.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.meta == kernels.meta


def test_other_model_or_policy_is_refused(tmp_path):
    kernels_for(make_tiny_model("llama-gqa")).save_pretrained(tmp_path)
    with pytest.raises(LessKVError, match="trained for"):
        LessKernels.from_pretrained(tmp_path, make_tiny_model("llama-mha"))
    with pytest.raises(LessKVError, match="policy 'h2o', not 'lambda'"):
        LessKernels.from_pretrained(tmp_path, make_tiny_model("llama-gqa"), policy="lambda")


def test_corrupt_or_partial_checkpoints_name_the_file(tmp_path):
    kernels_for(make_tiny_model("llama-gqa")).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LessKVError, match=WEIGHTS_FILE):
        LessKernels.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(LessKVError, match=CONFIG_FILE):
        LessKernels.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(LessKVError, match="missing"):
        LessKernels.from_pretrained(tmp_path)


def test_use_far_beyond_the_training_window_warns():
    kernels = kernels_for(make_tiny_model("llama-gqa"), seq_len=1024)
    with pytest.warns(UserWarning, match="trained on 1024-token windows"):
        kernels.warn_if_far_beyond_training_length(4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.warn_if_far_beyond_training_length(2048)


def test_a_checkpoint_from_before_the_decay_loads_as_the_papers_form(tmp_path):
    model = make_tiny_model("llama-gqa")
    kernels = kernels_for(model, state="paper")
    kernels.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["state"]  # as written before the field existed, without decay tensors
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(tmp_path / WEIGHTS_FILE).items() if "decay" not in k}
    save_file(weights, tmp_path / WEIGHTS_FILE)
    loaded = LessKernels.from_pretrained(tmp_path, model)
    assert loaded.meta.state == "paper"
    for a, b in zip(kernels.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(layer.decay_rate().eq(0).all() for layer in loaded.layers)


def test_kernels_of_one_form_saved_as_another_are_refused(tmp_path):
    model = make_tiny_model("llama-gqa")
    kernels_for(model, state="paper").save_pretrained(tmp_path)
    weights = {k: v for k, v in load_file(tmp_path / WEIGHTS_FILE).items() if "decay" not in k}
    save_file(weights, tmp_path / WEIGHTS_FILE)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "state": "decay"}))
    with pytest.raises(LessKVError, match="does not hold 'decay'-form kernels"):
        LessKernels.from_pretrained(tmp_path, model)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "state": "gated"}))
    with pytest.raises(LessKVError, match="unknown kernel state 'gated'"):
        LessKernels.from_pretrained(tmp_path, model)


def test_the_papers_form_has_no_decay_and_keeps_none_under_training():
    layer = LessKernels(
        KernelMeta.for_model(
            make_tiny_model("llama-gqa"), "tiny", policy="h2o", budget="8", state="paper"
        )
    ).layers[0]
    layer.decay_rate().sum().backward()
    assert layer.decay_rate().eq(0).all() and layer.decay.grad.eq(0).all()


def _edit_config(change):
    def mutate(folder):
        config = json.loads((folder / CONFIG_FILE).read_text())
        change(config)
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return mutate


def _edit_tensors(change):
    def mutate(folder):
        tensors = load_file(folder / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, folder / WEIGHTS_FILE)

    return mutate


def _first(tensors):
    return next(iter(sorted(tensors)))


def _symlink_loop(folder):
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to(folder / WEIGHTS_FILE)


HOSTILE = {
    "config missing a field": (_edit_config(lambda c: c.pop("kv_heads")), "kv_heads"),
    "config with an extra field": (_edit_config(lambda c: c.update(x=1)), "unknown field"),
    "config field of the wrong type": (
        _edit_config(lambda c: c.update(rank="eight")),
        "rank should be int",
    ),
    "config that is a list": (
        lambda f: (f / CONFIG_FILE).write_text("[1]"),
        "JSON object was expected",
    ),
    "config that is binary": (
        lambda f: (f / CONFIG_FILE).write_bytes(b"\xff\xfe\x00"),
        CONFIG_FILE,
    ),
    "weights with NaN": (
        _edit_tensors(lambda t: t[_first(t)].fill_(float("nan"))),
        "NaN or infinite",
    ),
    "weights of another dtype": (
        _edit_tensors(lambda t: t.update({k: v.long() for k, v in t.items()})),
        "not a float dtype",
    ),
    "weights of another shape": (
        _edit_tensors(lambda t: t.update({_first(t): t[_first(t)][..., :1].contiguous()})),
        "of the shape its config names",
    ),
    "weights that are a symlink loop": (_symlink_loop, "is missing"),
    "config naming a layer the model lacks": (
        _edit_config(lambda c: c.update(kernel_layers=[0, 5])),
        r"kernel_layers \[0, 5\] are not .* of a 2-layer model",
    ),
    "config naming layers by text": (
        _edit_config(lambda c: c.update(kernel_layers=["0"])),
        "kernel_layers",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_kernel_folders_are_one_line_errors_naming_the_file(tmp_path, case):
    mutate, message = HOSTILE[case]
    kernels_for(make_tiny_model("llama-gqa")).save_pretrained(tmp_path)
    mutate(tmp_path)
    with pytest.raises(LessKVError, match=message) as error:
        LessKernels.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_a_config_for_another_model_is_refused_before_any_kernel_is_built(tmp_path, monkeypatch):
    """A config may name any size (2**63 - 1 layers: building them never ends); checked
    against the model first, it is refused before it sizes anything."""
    model = make_tiny_model("llama-gqa")
    kernels_for(model).save_pretrained(tmp_path)
    _edit_config(lambda c: c.update(num_layers=1000))(tmp_path)
    built = []
    monkeypatch.setattr(LessKernels, "__init__", lambda *args: built.append(args))
    with pytest.raises(LessKVError, match=r"\(num_layers=1000\) but this model has num_layers=2"):
        LessKernels.from_pretrained(tmp_path, model)
    assert built == []


def test_a_config_written_before_kernel_layers_existed_has_kernels_for_every_layer(tmp_path):
    model = make_tiny_model("llama-gqa")
    kernels = kernels_for(model)
    kernels.save_pretrained(tmp_path)
    _edit_config(lambda c: c.pop("kernel_layers"))(tmp_path)
    loaded = LessKernels.from_pretrained(tmp_path, model)
    assert loaded.meta.kernel_layers == [0, 1]
    for a, b in zip(kernels.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_kernels_missing_a_layer_where_the_policy_runs_are_refused(tmp_path):
    """Kernels for a model whose layer 0 was local (a sliding window) cannot serve one where
    the policy runs in layer 0 too: the fingerprint alone would not tell them apart."""
    model = make_tiny_model("llama-gqa")
    kernels_for(model, kernel_layers=[1]).save_pretrained(tmp_path)
    with pytest.raises(LessKVError, match=r"none for layers \[0\]"):
        LessKernels.from_pretrained(tmp_path, model)


def test_shipped_sets_are_chosen_per_builtin_model(tmp_path, monkeypatch):
    """Each built-in model gets its own sets (by the model its config records), at the budget
    asked if one was trained there; a model without sets, or a policy without one, is refused."""
    from lesskv.core.policies import make_policy
    from lesskv.hf import checkpoint

    model = make_tiny_model("llama-gqa")
    for name, policy, budget in [
        ("smollm2-135m", "h2o", "0.1"),
        ("smollm2-135m", "h2o", "0.2"),
        ("gemma3-270m", "h2o", "0.1"),
        ("gemma3-270m", "lambda", "0.1"),
    ]:
        meta = KernelMeta.for_model(model, name, policy=policy, budget=budget, rank=4, hidden=16)
        LessKernels(meta).save_pretrained(tmp_path / f"{name}-{policy}-{budget}")
    monkeypatch.setattr(checkpoint, "PRETRAINED", tmp_path)
    pick = checkpoint.shipped_kernels
    assert pick("Gemma-3-270M", make_policy("h2o", 0.2)).name == "gemma3-270m-h2o-0.1"
    assert pick("gemma3-270m", make_policy("lambda", 8)).name == "gemma3-270m-lambda-0.1"
    assert pick("smollm2-135m", make_policy("h2o", 0.2)).name == "smollm2-135m-h2o-0.2"
    with pytest.raises(LessKVError, match="no shipped kernels for smollm2-135m with policy lambda"):
        pick("smollm2-135m", make_policy("lambda", 0.1))
    with pytest.raises(LessKVError, match="no kernels ship for some/model"):
        pick("some/model", make_policy("h2o", 0.1))
