"""Kernel training end to end on a tiny random model."""

import functools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import SHAPES, decode_steps
from helpers import TRAINING_T as T
from helpers import training_setup as setup
from lesskv.core.kernels import FORMS
from lesskv.core.policies import POLICIES
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import LessKernels, NoKernels
from lesskv.hf.methods import make_cache, set_method
from lesskv.hf.modules import attention_modules
from lesskv.training import per_layer
from lesskv.training.collection import collect_activations
from lesskv.training.per_layer import loaded, parse_layers, train_kernels
from lesskv.training.store import ActivationStore, layer_store_bytes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_training_beats_baseline_plus_on_validation(tmp_path, name):
    model, windows, policy, config = setup(policy=name)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer], f"layer {layer}"
    loaded = LessKernels.from_pretrained(tmp_path, model, policy=name)
    assert loaded.meta.val_loss == kernels.meta.val_loss
    assert not (tmp_path / "activations").exists()


@pytest.mark.parametrize("state", sorted(FORMS))
def test_every_state_form_trains_below_baseline_plus_and_loads_as_itself(tmp_path, state):
    """Each --kernel form learns what eviction loses better than Baseline+'s extra pairs, and
    its checkpoint records and rebuilds that form."""
    model, windows, policy, config = setup(state=state)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer], f"layer {layer}"
    loaded = LessKernels.from_pretrained(tmp_path, model, policy="h2o")
    assert loaded.meta.state == state
    assert all(isinstance(layer, FORMS[state]) for layer in loaded.layers)


def test_a_loss_the_form_cannot_give_is_refused_before_any_work(tmp_path):
    model, windows, policy, config = setup(state="slots", loss="kl")
    with pytest.raises(LessKVError, match="--loss kl needs each evicted pair's weight"):
        train_kernels(model, windows, policy, config, tmp_path, progress=False)
    assert not (tmp_path / "activations").exists()


@pytest.mark.parametrize("kind", SHAPES)
def test_every_layout_trains_kernels_that_load_and_run(tmp_path, kind):
    model, windows, policy, config = setup(epochs=2, kind=kind, sequences=8)
    kernels = train_kernels(model, windows[:8], policy, config, tmp_path, progress=False)
    losses = [*kernels.meta.val_loss.values(), *kernels.meta.baseline_plus_val_loss.values()]
    assert losses and all(np.isfinite(losses))
    loaded = LessKernels.from_pretrained(tmp_path, model, policy="h2o")
    ids = windows[8:10]
    with torch.no_grad():
        set_method(model, "baseline", policy=policy)
        baseline = model(input_ids=ids).logits
        set_method(model, "less", policy=policy, kernels=loaded)
        less = model(input_ids=ids).logits
    set_method(model, "full")
    assert torch.isfinite(less).all() and not torch.allclose(less, baseline, atol=1e-4)


def test_a_mixed_model_trains_kernels_for_its_global_layers_only(tmp_path, capsys):
    """Gemma 3's local layers (0 and 2 here) keep their own window and run no policy: they get
    no kernels, the checkpoint records which layers have them, and LESS decodes with the
    loaded kernels exactly as its teacher-forced form runs."""
    model, windows, policy, config = setup(epochs=1, kind="gemma3", sequences=8)
    train_kernels(model, windows[:8], policy, config, tmp_path, layers=[0, 1], progress=False)
    assert "skipping local (sliding-window) layers [0]" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["layer_001.safetensors"]
    assert json.loads((tmp_path / "lesskv_kernels.json").read_text())["kernel_layers"] == [1]
    kernels = LessKernels.from_pretrained(tmp_path, model, policy="h2o")
    assert [type(layer) for layer in kernels.layers] == [
        NoKernels,
        type(kernels.layers[1]),
        NoKernels,
    ]
    assert {name.split(".")[1] for name in kernels.state_dict()} == {"1"}
    ids = windows[8:9, :40]
    set_method(model, "less", policy=policy, kernels=kernels)
    with torch.no_grad():
        parallel = model(input_ids=ids).logits
    set_method(model, "full")
    cache = make_cache(model, "less", policy, kernels)
    assert torch.allclose(decode_steps(model, cache, ids), parallel, atol=1e-4)


def test_choosing_only_local_layers_is_refused_before_any_work(tmp_path):
    model, windows, policy, config = setup(kind="gemma3")
    with pytest.raises(LessKVError, match=r"layers \[0, 2\] are all local.*among layers \[1\]"):
        train_kernels(model, windows, policy, config, tmp_path, layers=[0, 2], progress=False)
    assert not tmp_path.joinpath("run.json").exists()


def test_a_mix_of_window_lengths_trains_one_set_for_both(tmp_path):
    model, windows, policy, config = setup(epochs=4, seq_lens=[T, 2 * T])
    mix = [windows[:12], windows[12:].reshape(6, 2 * T)]
    kernels = train_kernels(model, mix, policy, config, tmp_path, progress=False)
    assert kernels.meta.seq_len == 2 * T
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer]
    assert not (tmp_path / "activations").exists()


def test_gradients_reach_only_kernel_parameters(tmp_path):
    model, windows, policy, config = setup(epochs=1)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    set_method(model, "less", policy=policy, kernels=list(kernels.layers))
    model(input_ids=windows[:1]).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in kernels.parameters())


def test_another_runs_folder_is_refused_unless_overwritten(tmp_path):
    model, windows, policy, config = setup(epochs=1)
    train_kernels(model, windows, policy, config, tmp_path, progress=False)
    _, _, _, other = setup(epochs=2)
    with pytest.raises(LessKVError, match="another training run"):
        train_kernels(model, windows, policy, other, tmp_path, progress=False)
    train_kernels(model, windows, policy, other, tmp_path, overwrite=True, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["epochs"] == 2


def test_a_run_that_fails_before_its_first_layer_leaves_nothing(tmp_path, monkeypatch):
    """Its run file and activations go (a rerun would resume into them); a run that trained
    a layer keeps all, so a rerun resumes it."""
    model, windows, policy, config = setup(epochs=1)
    out = tmp_path / "runs" / "out"
    train_kernels(model, windows, policy, config, out, layers=[1], progress=False)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(per_layer, "train_layer", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_kernels(model, windows, policy, config, out, progress=False)
    assert (out / "run.json").exists() and (out / "layers" / "layer_001.safetensors").exists()
    shutil.rmtree(tmp_path / "runs")
    with pytest.raises(RuntimeError, match="out of memory"):
        train_kernels(model, windows, policy, config, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_kernels_too_large_for_memory_fail_before_anything_is_written(tmp_path, monkeypatch):
    model, windows, policy, config = setup(epochs=1, rank=2**62)
    calls = _spy_on_collection(monkeypatch, tmp_path / "activations")
    with pytest.raises(RuntimeError, match="overflow"):
        train_kernels(model, windows, policy, config, tmp_path / "out", progress=False)
    assert calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["5", "0:9", "3:1", "x"])
def test_layer_ranges_out_of_bounds_are_refused(spec):
    with pytest.raises(LessKVError, match="--layers"):
        parse_layers(spec, 4)


def test_layer_ranges():
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("1:", 3) == [1, 2]
    assert parse_layers("2", 3) == [2]


def _spy_on_collection(monkeypatch, activations):
    """Each collection's layers, and the layer folders in ``activations`` when it starts."""
    real, calls = per_layer.collect_activations, []

    def spy(model, windows, layers, *args, **kwargs):
        calls.append((layers, sorted(p.name for p in activations.glob("len_*/layer_*"))))
        return real(model, windows, layers, *args, **kwargs)

    monkeypatch.setattr(per_layer, "collect_activations", spy)
    return calls


def test_layers_are_collected_in_groups_that_fit_the_store_budget(tmp_path, monkeypatch):
    """A budget of one layer: one collection per layer, each after the last one's activations
    are gone; a rerun with another budget is the same run, and every budget trains the same
    kernels."""
    model, windows, policy, config = setup(epochs=1)
    one_layer = layer_store_bytes(model, 0, [windows])
    train = functools.partial(train_kernels, model, windows, policy, config, progress=False)
    calls = _spy_on_collection(monkeypatch, tmp_path / "grouped" / "activations")
    grouped = train(tmp_path / "grouped", store_budget=2 * one_layer - 1)
    assert calls == [([0], []), ([1], [])]
    calls.clear()
    train(tmp_path / "together", layers=[0], store_budget=one_layer)
    together = train(tmp_path / "together", store_budget=2 * one_layer)
    assert [layers for layers, _ in calls] == [[0], [1]]  # only the missing layer, then
    for a, b in zip(grouped.state_dict().values(), together.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_budget_below_one_layer_is_refused_before_any_work(tmp_path, monkeypatch):
    model, windows, policy, config = setup(epochs=1)
    mix = [windows[:12], windows[12:].reshape(6, 2 * T)]
    need = layer_store_bytes(model, 0, mix)
    calls = _spy_on_collection(monkeypatch, tmp_path / "activations")
    with pytest.raises(LessKVError, match=f"one layer's activations need {need} bytes"):
        train_kernels(model, mix, policy, config, tmp_path / "out", store_budget=need - 1)
    assert calls == [] and not (tmp_path / "out").exists()


def _store_with_windows(tmp_path, n=5):
    store = ActivationStore(tmp_path, 0, n=n, hq=2, hkv=1, t=4, d=3, hidden=6, kept=1)
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        store.write(
            i,
            query=torch.randn(2, 4, 3, generator=generator),
            target=torch.randn(4, 6, generator=generator),
            steps=torch.randint(0, 5, (1, 4), generator=generator),
        )
    return store


def test_batches_are_read_ahead_in_order_one_at_a_time(tmp_path, monkeypatch):
    store = _store_with_windows(tmp_path)
    chunks = [[3, 1], [0], [4, 2], [1]]
    expected = [store.read(chunk) for chunk in chunks]
    real, started = store.gather, []

    def counted(indices, pin=False):
        started.append(indices)
        return real(indices, pin)

    monkeypatch.setattr(store, "gather", counted)
    batches = loaded([(store, chunk) for chunk in chunks], torch.device("cpu"))
    for k, (batch_store, batch) in enumerate(batches):
        assert len(started) <= k + 2  # this batch and the next, never more in memory
        assert batch_store is store and batch.keys() == expected[k].keys()
        for name, tensor in batch.items():
            assert tensor.dtype == expected[k][name].dtype, name
            assert torch.equal(tensor, expected[k][name]), name
    assert started == chunks
    assert list(loaded([], torch.device("cpu"))) == []


def test_prefetched_training_is_bit_identical_to_reading_in_the_loop(tmp_path, monkeypatch):
    model, windows, policy, config = setup(epochs=2)
    stores = collect_activations(model, windows[:8], [1], policy, tmp_path, 4, progress=False)
    o_proj = attention_modules(model)[1].o_proj
    shape = per_layer.KernelShape(6, 2, 16, rank=4, hidden=32)
    train = functools.partial(per_layer.train_layer, [stores[1]], o_proj, shape, config, 1)
    prefetched = train(log=lambda _: None)
    monkeypatch.setattr(  # how batches were read before: synchronously, in the loop
        per_layer, "loaded", lambda batches, device: ((s, s.read(c, device)) for s, c in batches)
    )
    in_the_loop = train(log=lambda _: None)
    assert prefetched[1] == in_the_loop[1]
    kernels = zip(prefetched[0].parameters(), in_the_loop[0].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in kernels)


@pytest.mark.parametrize(("select", "kept"), [("best", 1.0), ("last", 2.0)])
def test_select_keeps_the_best_validation_epoch_or_the_last(tmp_path, monkeypatch, select, kept):
    """Validation losses 1.0 then 2.0: the best epoch is the first, the last the second; the
    kernels kept are that epoch's (they differ, as training moved them on)."""
    model, windows, policy, config = setup(epochs=2)
    stores = collect_activations(model, windows[:8], [1], policy, tmp_path, 4, progress=False)
    o_proj = attention_modules(model)[1].o_proj
    shape = per_layer.KernelShape(6, 2, 16, rank=4, hidden=32)
    runs = {}
    for choice in ("best", "last"):
        losses = iter([5.0, 1.0, 2.0])  # Baseline+, then each epoch's validation
        monkeypatch.setattr(per_layer, "_mean_loss", lambda *_, it=losses: next(it))
        chosen = replace(config, select=choice)
        runs[choice] = per_layer.train_layer([stores[1]], o_proj, shape, chosen, 1, lambda _: 0)
    assert runs[select][1]["val_loss"] == kept
    pairs = zip(runs["best"][0].parameters(), runs["last"][0].parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_no_validation_share_fits_every_window_and_scores_the_fit(tmp_path):
    _, _, _, config = setup()
    assert per_layer.split_windows(10, config) == per_layer.split_windows(10, config)
    held, trained = per_layer.split_windows(10, config)
    assert len(held) == 1 and sorted(held + trained) == list(range(10))
    held, trained = per_layer.split_windows(10, replace(config, val_fraction=0.0))
    assert sorted(held) == sorted(trained) == list(range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_batches_for_a_gpu_come_from_pinned_memory(tmp_path):
    store = _store_with_windows(tmp_path)
    assert all(t.is_pinned() for t in store.gather([0, 1], pin=True).values())
    chunks = [[0, 1], [2]]
    batches = [batch for _, batch in loaded([(store, c) for c in chunks], torch.device("cuda"))]
    for batch, chunk in zip(batches, chunks, strict=True):
        for name, tensor in store.read(chunk).items():
            assert batch[name].is_cuda and torch.equal(batch[name].cpu(), tensor), name


def test_kept_activations_let_another_form_train_without_recording(tmp_path):
    """``keep_activations`` leaves the recording in place; a run of another form whose folder
    links it trains without one forward pass, to the kernels a run that records gets."""
    model, windows, policy, config = setup(epochs=1)
    train_kernels(
        model, windows, policy, config, tmp_path / "a", progress=False, keep_activations=True
    )
    assert (tmp_path / "a" / "activations").is_dir()
    shutil.copytree(tmp_path / "a" / "activations", tmp_path / "b" / "activations")
    slots = replace(config, state="slots")
    passes = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        linked = train_kernels(model, windows, policy, slots, tmp_path / "b", progress=False)
    finally:
        hook.remove()
    recorded = train_kernels(model, windows, policy, slots, tmp_path / "c", progress=False)
    assert passes == [] and not (tmp_path / "b" / "activations").exists()
    for a, b in zip(linked.state_dict().values(), recorded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
