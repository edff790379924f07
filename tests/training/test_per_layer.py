"""Kernel training end to end on a tiny random model."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import SHAPES, decode_steps, make_tiny_model, tiny_kernels
from lesskv.core import math
from lesskv.core.distribution import attention_kl
from lesskv.core.policies import POLICIES, make_policy
from lesskv.errors import LessKVError
from lesskv.hf.checkpoint import LessKernels, NoKernels
from lesskv.hf.methods import make_cache, set_method
from lesskv.hf.modules import attention_modules
from lesskv.training import per_layer
from lesskv.training.per_layer import (
    ActivationStore,
    TrainConfig,
    collect_activations,
    layer_store_bytes,
    loaded,
    parse_layers,
    store_groups,
    train_kernels,
)

T = 64


def setup(epochs=12, policy="h2o", kind="llama-gqa", **overrides):
    model = make_tiny_model(kind)
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (24, T))
    config = TrainConfig(
        model="tiny",
        policy=policy,
        budget="8",
        **{
            "seq_lens": [T],
            "sequences": 24,
            "epochs": epochs,
            "rank": 4,
            "hidden": 32,
            "lr": 1e-2,
            **overrides,
        },
    )
    return model, windows, make_policy(policy, 8), config


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_training_beats_baseline_plus_on_validation(tmp_path, name):
    model, windows, policy, config = setup(policy=name)
    kernels = train_kernels(model, windows, policy, config, tmp_path, progress=False)
    for layer, loss in kernels.meta.val_loss.items():
        assert loss < kernels.meta.baseline_plus_val_loss[layer], f"layer {layer}"
    loaded = LessKernels.from_pretrained(tmp_path, model, policy=name)
    assert loaded.meta.val_loss == kernels.meta.val_loss
    assert not (tmp_path / "activations").exists()


@pytest.mark.parametrize("kind", SHAPES)
def test_the_target_is_o_projs_output_at_the_models_hidden_size(tmp_path, kind):
    """o_proj maps the heads back to the hidden size, which need not be heads x head_dim
    (Gemma 3, Qwen3): the stored target is what o_proj outputs in the model's own forward,
    and o_proj of full attention over the stored Q/K/V."""
    model, windows, policy, _ = setup(kind=kind)
    module = attention_modules(model)[1]  # a global layer in every layout
    seen = []
    handle = module.o_proj.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        for window in windows[:2]:
            model(input_ids=window[None])
    handle.remove()
    stores = collect_activations(model, windows[:2], [1], policy, tmp_path, 4, progress=False)
    batch = stores[1].read([0, 1])
    assert batch["target"].shape == (2, T, model.config.hidden_size)
    assert torch.allclose(batch["target"], torch.cat(seen), rtol=1e-3, atol=1e-3)
    hq, d = batch["query"].shape[1], module.head_dim
    q = batch["query"].view(2, batch["key"].shape[1], -1, T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = math.sparse_output(q, batch["key"], batch["value"], causal, module.scaling)
    expected = module.o_proj(out.reshape(2, hq, T, d).transpose(1, 2).flatten(2))
    assert torch.allclose(expected, batch["target"], rtol=1e-2, atol=2e-3)


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


@pytest.mark.parametrize("loss", ["kl", "mse+kl"])
def test_a_distribution_loss_lowers_the_kl_and_is_recorded(tmp_path, loss):
    """Kernels trained for the KL (alone or with the MSE) imply attention weights closer to
    the true ones than untrained kernels (the plain policy's, in effect); the checkpoint says
    which loss and schedule."""
    model, windows, policy, config = setup(epochs=6, loss=loss)
    kernels = train_kernels(model, windows, policy, config, tmp_path / loss, progress=False)
    assert kernels.meta.training["loss"] == loss and kernels.meta.training["epochs"] == 6
    assert kernels.meta.training["windows"] == 24
    untrained = tiny_kernels(model)
    kl = {
        name: _training_kl(model, windows, policy, k)
        for name, k in (
            ("trained", list(kernels.layers)),
            ("untrained", untrained),
        )
    }
    assert kl["trained"] < kl["untrained"], kl


def _training_kl(model, windows, policy, kernels):
    """Mean over layers and windows of the KL the distribution loss measures."""
    seen = []
    with per_layer.observing(model, lambda m, q, k, v: seen.append((m, q, k))), torch.no_grad():
        model(windows[:8])
    index = {id(m): i for i, m in enumerate(attention_modules(model))}
    total = 0.0
    for module, query, key in seen:
        q = math.group_queries(query, key.shape[1])
        scale = module.scaling
        steps = policy.eviction_steps(math.causal_logits(q, key, scale), policy.slots(T), T)
        steps = steps.expand(*key.shape[:2], T)
        k = kernels[index[id(module)]]
        with torch.no_grad():
            total += attention_kl(
                q, key, steps, k.phi(q), k.psi(key), k.decay_rate(), scale, start=8
            ).item()
    return total / len(seen)


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


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    model, windows, policy, config = setup(epochs=2)
    whole = train_kernels(model, windows, policy, config, tmp_path / "a", progress=False)
    first = train_kernels(
        model, windows, policy, config, tmp_path / "b", layers=[1], progress=False
    )
    assert first is None  # layer 0 still missing: nothing assembled yet
    assert not (tmp_path / "b" / "kernels.safetensors").exists()
    resumed = train_kernels(model, windows, policy, config, tmp_path / "b", progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


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


def test_a_corrupt_layer_files_error_keeps_its_advice(tmp_path):
    """torch lists every unexpected key of a state dict: the line is cut inside that
    message, so it still ends with what to do."""
    model, windows, policy, config = setup(epochs=1)
    train_kernels(model, windows, policy, config, tmp_path, progress=False)
    layer = tmp_path / "layers" / "layer_001.safetensors"
    save_file({f"junk_{i}": torch.zeros(1) for i in range(100)}, layer)
    with pytest.raises(LessKVError) as caught:
        train_kernels(model, windows, policy, config, tmp_path, progress=False)
    message = str(caught.value)
    assert "layer_001.safetensors is corrupt (Error(s) in loading state_dict" in message
    assert message.endswith("...); delete it and rerun") and len(message) < 260, message


@pytest.mark.parametrize("spec", ["5", "0:9", "3:1", "x"])
def test_layer_ranges_out_of_bounds_are_refused(spec):
    with pytest.raises(LessKVError, match="--layers"):
        parse_layers(spec, 4)


def test_layer_ranges():
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("1:", 3) == [1, 2]
    assert parse_layers("2", 3) == [2]


def test_upstream_kernels_record_each_layer_on_its_inference_inputs(tmp_path):
    model, windows, policy, _ = setup()
    kernels = tiny_kernels(model)
    record = functools.partial(collect_activations, model, windows[:2], [0, 1], policy)
    full = record(tmp_path / "full", 4, progress=False)
    sparse = record(tmp_path / "sparse", 4, progress=False, upstream=kernels)
    for name in ("query", "key", "value", "target", "sparse_out"):  # layer 0: nothing upstream
        assert np.allclose(full[0].arrays[name], sparse[0].arrays[name], atol=1e-3)
    assert not np.allclose(full[1].arrays["query"], sparse[1].arrays["query"], atol=1e-2)
    # The target stays full attention, over the inputs LESS upstream gave this layer.
    batch = sparse[1].read([0, 1])
    module = attention_modules(model)[1]
    q = batch["query"].view(2, 2, 3, T, -1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = math.sparse_output(q, batch["key"], batch["value"], causal, module.scaling)
    expected = module.o_proj(out.flatten(1, 2).transpose(1, 2).flatten(2))
    assert torch.allclose(expected, batch["target"], atol=2e-3)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fused_collection_records_what_the_reference_does(name):
    """Collection's compiled, blocked simulation against the stacked T x T one it replaces on
    the CPU: the same steps, and the same outputs at the budget and at Baseline+'s."""
    generator = torch.Generator().manual_seed(4)
    seen = {
        layer: (
            torch.randn(1, 2, 3, T, 16, generator=generator),
            torch.randn(1, 2, T, 16, generator=generator),
            torch.randn(1, 2, T, 16, generator=generator),
            0.25,
        )
        for layer in (0, 1)
    }
    policy = make_policy(name, 12)
    budgets = [policy.slots(T), policy.slots(T, 4)]
    reference = per_layer._reference_records([0, 1], seen, policy, budgets, {})
    for layer in (0, 1):
        steps, recorded = per_layer._fused_records(policy, budgets, *seen[layer])
        ref_steps, ref_recorded = reference[layer]
        assert torch.equal(steps, ref_steps)
        assert recorded.keys() == ref_recorded.keys() == {"sparse_out", "lse", "plus_out"}
        for key, tensor in recorded.items():
            assert torch.allclose(tensor, ref_recorded[key], atol=1e-5), key


def test_a_bf16_models_activations_keep_their_range_and_dtype(tmp_path):
    """fp16 would turn 70000 into inf; a store is never read back as another dtype."""
    shape = dict(n=1, hq=1, hkv=1, t=3, d=1, hidden=1, kept=1)
    store = ActivationStore(tmp_path, 0, **shape, dtype=torch.bfloat16)
    query = torch.tensor([70000.0, -3.5, 1e-3]).view(1, 3, 1).bfloat16()
    store.write(0, query=query, steps=torch.tensor([[3, 3, 3]]))
    batch = store.read([0])
    assert torch.equal(batch["query"][0], query.float())
    assert batch["steps"].tolist() == [[[3, 3, 3]]]
    with pytest.raises(LessKVError, match="stored as bf16.*this run stores f16"):
        ActivationStore(tmp_path, 0, **shape, dtype=torch.float32)


def test_a_stores_size_is_known_before_it_exists(tmp_path):
    dims = dict(n=3, hq=6, hkv=2, t=10, d=4, hidden=20)
    for dtype in (torch.float32, torch.bfloat16):
        store = ActivationStore(tmp_path / str(dtype), 0, **dims, kept=2, dtype=dtype)
        on_disk = sum(p.stat().st_size for p in store.dir.iterdir())
        assert on_disk == ActivationStore.nbytes(**dims)


def test_layers_go_in_consecutive_groups_that_fit_the_budget():
    assert store_groups({0: 3, 1: 3, 2: 3, 3: 5, 4: 1}, 6) == [[0, 1], [2], [3, 4]]
    assert store_groups({2: 4, 5: 4}, 100) == [[2, 5]]
    assert store_groups({}, 1) == [[]]


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


def test_the_default_store_budget_is_half_the_free_disk_where_out_will_be(tmp_path, monkeypatch):
    asked = []

    def disk_usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(1000, 200, 801)

    monkeypatch.setattr(per_layer.shutil, "disk_usage", disk_usage)
    assert per_layer.default_store_budget(tmp_path / "not" / "yet") == 400
    assert asked == [tmp_path]


def test_an_interrupted_collection_runs_only_the_missing_windows(tmp_path):
    model, windows, policy, _ = setup()
    record = functools.partial(collect_activations, model, windows[:6], [0, 1], policy, rank=4)
    whole = record(tmp_path / "whole", progress=False)
    seen, allowed = [], {"windows": 3}

    def interrupt_when_allowed_runs_out(module, args, kwargs):
        seen.append(kwargs["input_ids"])
        if len(seen) > allowed["windows"]:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_when_allowed_runs_out, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            record(tmp_path / "resumed", progress=False)
        seen.clear()
        allowed["windows"] = len(windows)
        resumed = record(tmp_path / "resumed", progress=False)
        assert torch.equal(torch.cat(seen), windows[3:6])
        seen.clear()
        record(tmp_path / "resumed", progress=False)
        assert seen == []  # complete: not one forward pass
    finally:
        handle.remove()
    for layer in (0, 1):
        assert resumed[layer].complete == 6
        for name, array in whole[layer].arrays.items():
            assert np.array_equal(array, resumed[layer].arrays[name], equal_nan=True), name
        assert np.array_equal(whole[layer].steps, resumed[layer].steps)


def test_a_damaged_completion_marker_is_one_line_not_a_resume(tmp_path):
    """The marker counts the windows on disk: one that is not a count of them (a torn disk,
    an edit) is named with what to do, rather than a ValueError or a resume past them."""
    dims = dict(n=5, hq=2, hkv=1, t=4, d=3, hidden=6, kept=1)
    ActivationStore(tmp_path, 0, **dims).mark_complete(2)
    marker = tmp_path / "len_4" / "layer_000" / per_layer.COMPLETE_FILE
    assert ActivationStore(tmp_path, 0, **dims).complete == 2
    for text in ("garbage", "99", "-1", "\xb2", "\x00\xff"):
        marker.write_bytes(text.encode("latin-1"))
        with pytest.raises(LessKVError, match="complete is corrupt .*; delete it and rerun"):
            ActivationStore(tmp_path, 0, **dims)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_batches_for_a_gpu_come_from_pinned_memory(tmp_path):
    store = _store_with_windows(tmp_path)
    assert all(t.is_pinned() for t in store.gather([0, 1], pin=True).values())
    chunks = [[0, 1], [2]]
    batches = [batch for _, batch in loaded([(store, c) for c in chunks], torch.device("cuda"))]
    for batch, chunk in zip(batches, chunks, strict=True):
        for name, tensor in store.read(chunk).items():
            assert batch[name].is_cuda and torch.equal(batch[name].cpu(), tensor), name
