"""End-to-end kernel fine-tuning on a tiny random model."""

import argparse
import json

import pytest
import torch

from helpers import SHAPES, kernel_set, make_tiny_model
from lesskv.core.policies import make_policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.modules import attention_modules, policy_layers
from lesskv.training import finetune
from lesskv.training.finetune import FinetuneConfig, finetune_kernels, validation_kl
from lesskv.training.per_layer import TrainConfig, train_kernels

T = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, data windows, and per-layer kernels trained for it (H2O, 8 pairs)."""
    model = make_tiny_model("llama-gqa")
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (12, T))
    config = TrainConfig(
        model="tiny",
        policy="h2o",
        budget="8",
        seq_lens=[T],
        sequences=8,
        epochs=2,
        rank=4,
        hidden=32,
    )
    out = tmp_path_factory.mktemp("per-layer")
    train_kernels(model, windows[:8], make_policy("h2o", 8), config, out, progress=False)
    return model, windows, out


def run(trained, out, checkpointing=True, **overrides):
    model, windows, base = trained
    kernels = LessKernels.from_pretrained(base, model)
    options = dict(sequences=8, val_sequences=4, epochs=2, lr=3e-3, val_every=4) | overrides
    config = FinetuneConfig(
        model="tiny", base_kernels=str(base), data="random", seq_lens=[T], **options
    )
    return finetune_kernels(
        model,
        kernels,
        windows[:8],
        windows[8:],
        config,
        out,
        progress=False,
        checkpointing=checkpointing,
    )


def test_finetuning_lowers_held_out_kl_and_round_trips(trained, tmp_path):
    model, windows, base = trained
    tuned = run(trained, tmp_path)
    info = tuned.meta.finetune
    assert info["val_kl_after"] < info["val_kl_before"]
    loaded = LessKernels.from_pretrained(tmp_path, model, policy="h2o")
    policy = make_policy("h2o", 8)
    assert validation_kl(model, windows[8:], policy, loaded) == pytest.approx(
        info["val_kl_after"], rel=1e-5
    )
    start = validation_kl(model, windows[8:], policy, LessKernels.from_pretrained(base, model))
    assert start == pytest.approx(info["val_kl_before"], rel=1e-5)
    assert "finetune" not in LessKernels.from_pretrained(base).meta.command
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", SHAPES)
def test_every_layout_finetunes_the_layers_that_have_kernels(kind, tmp_path):
    """Hidden size against heads x head_dim, and a model mixing local and global layers: the
    held-out KL falls and the tuned kernels cover the layers where the policy runs."""
    model = make_tiny_model(kind)
    kernel_set(model).save_pretrained(tmp_path / "base")
    kernels = LessKernels.from_pretrained(tmp_path / "base", model)
    windows = torch.randint(0, 97, (6, T), generator=torch.Generator().manual_seed(0))
    config = FinetuneConfig(
        model=kind, base_kernels="base", data="random", seq_lens=[T], epochs=2, lr=3e-3
    )
    tuned = finetune_kernels(
        model, kernels, windows[:4], windows[4:], config, tmp_path / "tuned", progress=False
    )
    assert tuned.meta.finetune["val_kl_after"] < tuned.meta.finetune["val_kl_before"]
    loaded = LessKernels.from_pretrained(tmp_path / "tuned", model)
    assert loaded.meta.kernel_layers == policy_layers(model)


def test_interrupted_finetuning_resumes_to_the_same_result(trained, tmp_path, monkeypatch):
    whole = run(trained, tmp_path / "a")
    real, calls = finetune.next_token_kl, {"n": 0}

    def dies_after_five_calls(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(finetune, "next_token_kl", dies_after_five_calls)
    with pytest.raises(KeyboardInterrupt):
        run(trained, tmp_path / "b")
    assert not (tmp_path / "b" / "kernels.safetensors").exists()
    monkeypatch.setattr(finetune, "next_token_kl", real)
    resumed = run(trained, tmp_path / "b")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.meta.finetune == whole.meta.finetune


def test_a_corrupt_state_file_is_named(trained, tmp_path):
    run(trained, tmp_path, epochs=1)
    (tmp_path / finetune.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(LessKVError, match="finetune_state.pt is corrupt"):
        run(trained, tmp_path, epochs=1)


def test_every_file_of_the_result_is_written_whole(trained, tmp_path, monkeypatch):
    """Through a temporary file and a rename: an interrupted run leaves no half a history."""
    written, write = [], finetune.atomic_write
    monkeypatch.setattr(
        finetune, "atomic_write", lambda p, w: (written.append(p.name), write(p, w))
    )
    run(trained, tmp_path, epochs=1)
    assert finetune.HISTORY_FILE in written
    assert len(json.loads((tmp_path / finetune.HISTORY_FILE).read_text())) == 8  # one per step


def test_a_corrupt_state_files_error_keeps_its_advice(trained, tmp_path):
    """torch's refusal of a pickled object runs to 1,000 characters, with terminal escapes:
    cut inside the message, so the line still ends with what to do, and no escape stays on."""
    run(trained, tmp_path, epochs=1)
    torch.save({"step": argparse.Namespace()}, tmp_path / finetune.STATE_FILE)
    with pytest.raises(LessKVError) as caught:
        run(trained, tmp_path, epochs=1)
    message = str(caught.value)
    assert "Weights only load failed" in message and "\x1b" not in message, message
    assert message.endswith("; delete it to restart fine-tuning") and len(message) < 250


def test_kernels_for_another_model_are_refused(trained, tmp_path):
    _, windows, base = trained
    other = make_tiny_model("llama-mha")
    kernels = LessKernels.from_pretrained(base)
    config = FinetuneConfig(model="tiny", base_kernels=str(base), data="random", seq_lens=[T])
    with pytest.raises(LessKVError, match="kernels were trained for"):
        finetune_kernels(other, kernels, windows[:8], windows[8:], config, tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_a_run_that_fails_before_its_first_step_leaves_nothing(trained, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(finetune, "validation_kl", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(trained, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_learning_rate_decays_from_lr_to_zero():
    rates = [finetune.cosine_lr(1e-3, step, 10) for step in range(11)]
    assert rates[0] == 1e-3 and rates[5] == pytest.approx(5e-4) and rates[10] == pytest.approx(0)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_windows_of_several_lengths_train_together(trained, tmp_path):
    model, windows, base = trained
    mixed = [*windows[:4], *windows[4:8].reshape(2, 2 * T)]
    kernels = LessKernels.from_pretrained(base, model)
    config = FinetuneConfig(
        model="tiny", base_kernels=str(base), data="random", seq_lens=[T, 2 * T], val_every=6
    )
    tuned = finetune_kernels(model, kernels, mixed, windows[8:], config, tmp_path, progress=False)
    assert tuned.meta.finetune["steps"] == 6


def _kernel_gradients(model, kernels, ids, layers):
    kernels.zero_grad(set_to_none=True)
    with finetune.checkpointed(layers):
        loss = finetune.next_token_kl(model, ids, make_policy("h2o", 8), kernels)
    loss.backward()
    return [p.grad.clone() for p in kernels.parameters()]


def test_checkpointed_layers_run_again_and_give_the_same_gradients(trained):
    model, windows, base = trained
    kernels = LessKernels.from_pretrained(base, model).requires_grad_(True)
    modes = [m.training for m in model.modules()]
    calls = []
    handles = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in attention_modules(model)
    ]
    try:
        plain = _kernel_gradients(model, kernels, windows[:1], [])
        runs_plain, calls[:] = len(calls), []
        layers = finetune.decoder_layers(model)
        checkpointed = _kernel_gradients(model, kernels, windows[:1], layers)
    finally:
        for handle in handles:
            handle.remove()
    layer_count = len(attention_modules(model))
    assert len(calls) == runs_plain + layer_count  # teacher, student, and the student again
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_finetuning_ends_with_the_same_kernels_with_or_without_checkpointing(trained, tmp_path):
    with_checkpoints = run(trained, tmp_path / "on", epochs=1)
    without = run(trained, tmp_path / "off", epochs=1, checkpointing=False)
    pairs = zip(with_checkpoints.parameters(), without.parameters(), strict=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)
    assert with_checkpoints.meta.finetune == without.meta.finetune


def test_a_model_without_decoder_layers_cannot_checkpoint():
    with pytest.raises(LessKVError, match="--no-checkpointing"):
        finetune.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
