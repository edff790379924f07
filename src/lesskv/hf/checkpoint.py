"""Kernel checkpoints: all layers' learned state forms plus what they were trained for, saved
and loaded like a Hugging Face checkpoint (``save_pretrained`` / ``from_pretrained``), and the
sets that ship with lesskv for the built-in default model."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_origin, get_type_hints

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, STATES, Budget, builtin_model
from lesskv.core.forms import KernelShape
from lesskv.core.kernels import make_kernels
from lesskv.core.policies import Policy
from lesskv.errors import LessKVError, one_line
from lesskv.hf.modules import attention_modules, kv_heads, model_fingerprint, policy_layers

CONFIG_FILE = "lesskv_kernels.json"
WEIGHTS_FILE = "kernels.safetensors"


@dataclass
class KernelMeta:
    """What kernels were trained for; checked on load so they are never silently misused."""

    model: str
    model_fingerprint: str
    num_layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    policy: str
    budget: str
    rank: int = DEFAULT_RANK
    hidden: int = DEFAULT_HIDDEN
    seq_len: int = 0
    training_data: str = ""
    command: str = ""
    val_loss: dict[str, float] = field(default_factory=dict)
    baseline_plus_val_loss: dict[str, float] = field(default_factory=dict)
    finetune: dict[str, object] = field(default_factory=dict)  # set by `lesskv finetune`
    # How `lesskv train` trained them: the loss, the data's size and the schedule.
    training: dict[str, object] = field(default_factory=dict)
    # The state's form (lesskv.core.budget.STATES, built by lesskv.core.kernels). Configs
    # saved before the field existed hold the paper's form and load as such (from_pretrained).
    state: str = STATES[0]
    # The layers that have kernels: those where the policy runs (hf.modules.policy_layers),
    # not the local layers of a model mixing local and global ones. Empty (configs saved
    # before the field existed): every layer.
    kernel_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        layers = self.kernel_layers or list(range(self.num_layers))
        if layers != sorted(set(layers)) or not all(
            isinstance(i, int) and 0 <= i < self.num_layers for i in layers
        ):
            raise LessKVError(
                f"kernel_layers {layers} are not distinct, ordered layers of a "
                f"{self.num_layers}-layer model"
            )
        self.kernel_layers = layers

    @property
    def layer_shape(self) -> KernelShape:
        return KernelShape(
            self.query_heads, self.kv_heads, self.head_dim, self.rank, self.hidden, state=self.state
        )

    def check_compatible(self, model: PreTrainedModel, policy: str | None = None) -> None:
        """Raise a LessKVError naming the first thing that does not match ``model`` (and
        ``policy``, when given)."""
        other = KernelMeta.for_model(model, self.model, policy="", budget="")
        for name in ("model_fingerprint", "num_layers", "query_heads", "kv_heads", "head_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise LessKVError(
                    f"kernels were trained for {self.model} ({name}={mine}) but this model "
                    f"has {name}={theirs}: train kernels for this model with `lesskv train`"
                )
        missing = sorted(set(other.kernel_layers) - set(self.kernel_layers))
        if missing:
            raise LessKVError(
                f"kernels for {self.model} have none for layers {missing}, where this model "
                "runs the policy: train kernels for this model with `lesskv train`"
            )
        if policy is not None and policy != self.policy:
            raise LessKVError(
                f"kernels were trained for policy {self.policy!r}, not {policy!r}: "
                "pass the matching --policy or train kernels for it"
            )

    @classmethod
    def for_model(cls, model: PreTrainedModel, model_name: str, **fields) -> KernelMeta:
        module = attention_modules(model)[0]
        heads = kv_heads(model)
        return cls(
            model=model_name,
            model_fingerprint=model_fingerprint(model),
            num_layers=len(attention_modules(model)),
            query_heads=heads * module.num_key_value_groups,
            kv_heads=heads,
            head_dim=module.head_dim,
            **{"kernel_layers": policy_layers(model), **fields},
        )


class NoKernels(nn.Module):
    """The place of a layer without kernels in :attr:`LessKernels.layers` (a local layer of a
    model mixing local and global layers: the policy never runs there), so kernels stay
    indexed by layer; it holds no tensors, so it is neither saved nor loaded."""


class LessKernels(nn.Module):
    """All layers' kernels plus their metadata, saved like a Hugging Face checkpoint."""

    def __init__(self, meta: KernelMeta, layers: Sequence[nn.Module | None] | None = None) -> None:
        """``layers``: one module per attention layer (default: new kernels of ``meta``'s
        shape); a layer without kernels (not in ``meta.kernel_layers``) holds
        :class:`NoKernels` whatever it is given, so exactly the kernel layers are saved."""
        super().__init__()
        if layers is not None and len(layers) != meta.num_layers:
            raise LessKVError(f"{len(layers)} layers given for {meta.num_layers} attention layers")
        self.meta = meta
        self.layers = nn.ModuleList(
            (make_kernels(meta.layer_shape) if layers is None else layers[i])
            if i in meta.kernel_layers
            else NoKernels()
            for i in range(meta.num_layers)
        )

    def check_compatible(self, model: PreTrainedModel, policy: str | None = None) -> None:
        """Raise a LessKVError naming the first thing that does not match."""
        self.meta.check_compatible(model, policy)

    def warn_if_far_beyond_training_length(self, seq_len: int) -> None:
        """At several times the training window the state absorbs far more pairs than the
        kernels ever saw; LESS then measured worse than the plain policy (RESULTS.md §8)."""
        trained = self.meta.seq_len
        if trained and seq_len > 2 * trained:
            warnings.warn(
                f"these kernels were trained on {trained}-token windows; at {seq_len} tokens LESS "
                f"can do worse than the baseline: train kernels with --seq-len {seq_len}",
                stacklevel=2,
            )

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """safetensors + JSON config, each written atomically (fp16 halves shipped size)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p))
        text = json.dumps(asdict(self.meta), indent=2) + "\n"
        atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(text))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, model: PreTrainedModel | None = None, policy: str | None = None
    ) -> LessKernels:
        """Load kernels from a folder, or a shipped set by name (:func:`available`, e.g.
        ``"smollm2-135m-h2o-0.1"``), checking them against ``model`` and ``policy`` when given."""
        directory = Path(directory)
        if not directory.exists() and str(directory) in available():
            directory = PRETRAINED / str(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise LessKVError(
                    f"{path} is missing: {directory} is not a lesskv kernel folder (shipped "
                    f"sets, by name: {', '.join(available())})"
                )
        meta = _read_meta(config_path)
        if model is not None:  # before any tensor is built of the sizes a config names
            meta.check_compatible(model, policy)
        try:
            kernels = cls(meta)
            loaded = load_file(weights_path)
        except LessKVError as err:
            raise LessKVError(f"{config_path}: {err}") from None
        except Exception as err:  # safetensors raises several types for damaged files
            raise LessKVError(f"{weights_path} is corrupt or partial ({err})") from None
        for name, tensor in loaded.items():
            if tensor.dtype not in WEIGHT_DTYPES:
                raise LessKVError(f"{weights_path}: {name} is {tensor.dtype}, not a float dtype")
            if not torch.isfinite(tensor).all():
                raise LessKVError(f"{weights_path}: {name} holds NaN or infinite values")
        state = {k: v.float() for k, v in loaded.items()}
        if meta.state == "paper":  # saved before the decay existed: the paper's form is 0
            for name, value in kernels.state_dict().items():
                if name.endswith(".decay"):
                    state.setdefault(name, torch.zeros_like(value))
        try:
            kernels.load_state_dict(state)
        except RuntimeError as err:  # torch's message names every tensor of every layer
            wrong = _mismatches(kernels.state_dict(), state) or [one_line(err, 120)]
            raise LessKVError(
                f"{weights_path} does not hold {meta.state!r}-form kernels of the shape its "
                f"config names: {wrong[0]} ({len(wrong)} mismatched tensor(s) in all)"
            ) from None
        return kernels.eval()


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Each tensor the file lacks, holds in excess or in another shape than the config names,
    in the kernels' order: the first names the problem, the count how widespread it is."""
    wrong = []
    for name, tensor in expected.items():
        if name not in found:
            wrong.append(f"{name} is missing")
        elif found[name].shape != tensor.shape:
            wrong.append(
                f"{name} is {list(found[name].shape)} in the file, {list(tensor.shape)} "
                "by the config"
            )
    return wrong + [f"{name} is not a kernel tensor" for name in found if name not in expected]


def _read_meta(path: Path) -> KernelMeta:
    """The config, every field checked for its type: a hand-edited or foreign file is named
    with what is wrong, before any tensor is built from it. Configs written before the
    ``state`` field existed hold the paper's form."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LessKVError(f"{path} is corrupt ({err})") from None
    if not isinstance(raw, dict):
        raise LessKVError(f"{path} is corrupt: a JSON object was expected")
    hints = get_type_hints(KernelMeta)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise LessKVError(f"{path} is corrupt: unknown field(s) {', '.join(unknown)}")
    for name, value in raw.items():
        expected = get_origin(hints[name]) or hints[name]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise LessKVError(
                f"{path} is corrupt: {name} should be {expected.__name__}, got {value!r}"
            )
    try:
        return KernelMeta(**{"state": "paper", **raw})
    except (TypeError, LessKVError) as err:  # a required field is missing, or a bad layer
        raise LessKVError(f"{path} is corrupt ({err})") from None


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


PRETRAINED = Path(__file__).parents[1] / "pretrained"


def available() -> list[str]:
    """Folder names ``MODEL-POLICY-BUDGET`` of the shipped kernel sets."""
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / CONFIG_FILE).is_file())


def shipped_kernels(model_name: str, policy: Policy) -> Path:
    """The shipped set for the model and policy: the one trained at the requested budget if
    there is one, else the policy's other set (kernels transfer across budgets, RESULTS.md §6)."""
    builtin = builtin_model(model_name)
    trained = {name: kernel_meta(PRETRAINED / name) for name in available()}
    if builtin is None or all(meta.model != builtin for meta in trained.values()):
        raise LessKVError(f"no kernels ship for {model_name}: pass --kernels DIR (lesskv train)")
    sets = [n for n, meta in trained.items() if (meta.model, meta.policy) == (builtin, policy.name)]
    if not sets:
        raise LessKVError(
            f"no shipped kernels for {builtin} with policy {policy.name} "
            f"(shipped: {', '.join(available()) or 'none'}); pass --kernels DIR"
        )
    exact = [name for name in sets if Budget.parse(trained[name].budget) == policy.budget]
    return PRETRAINED / (exact or sets)[0]


def kernel_meta(directory: str | Path) -> KernelMeta:
    """What the kernels in ``directory`` were trained for (the config alone, checked)."""
    return _read_meta(Path(directory) / CONFIG_FILE)


def resolve_kernels(
    path: str | Path | None,
    model_name: str,
    model: PreTrainedModel,
    policy: Policy,
    seq_len: int,
    transfer: bool = False,
) -> LessKernels:
    """Kernels from ``path``, or else the shipped set for the model and policy (say so with
    :func:`shipped_kernels` first when that matters); ``transfer`` skips the policy check,
    the model is always checked."""
    if path is None:
        path = shipped_kernels(model_name, policy)
    kernels = LessKernels.from_pretrained(path, model, policy=None if transfer else policy.name)
    kernels.warn_if_far_beyond_training_length(seq_len)
    return kernels
