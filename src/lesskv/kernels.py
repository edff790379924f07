"""LESS's learned feature maps φ (per query head) and ψ (per KV head), one set per layer.

Both are two-layer GELU MLPs whose outputs are made non-negative, so φ(q)·ψ(k) behaves like an
(unnormalised) attention weight. ψ starts scaled by 1e-4, so an untrained layer is the plain
sparse policy and training only ever adds what eviction lost. Heads are batched as a leading
weight dimension (einsum), never as a Python loop.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from lesskv.config import DEFAULT_RANK
from lesskv.errors import LessKVError
from lesskv.integration import attention_modules
from lesskv.models import model_fingerprint

DEFAULT_HIDDEN = 128
SCALE_INIT = 1e-4


@dataclass(frozen=True)
class KernelShape:
    """Everything that fixes the parameter shapes of one layer's kernels."""

    query_heads: int
    kv_heads: int
    head_dim: int
    rank: int = DEFAULT_RANK
    hidden: int = DEFAULT_HIDDEN
    dropout: float = 0.3


def _per_head_weight(heads: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """nn.Linear's default initialisation, one independent matrix per head."""
    bound = 1.0 / fan_in**0.5
    return nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound))


class HeadMLP(nn.Module):
    """``gelu(dropout(gelu(x W1)) W2)`` with separate weights per head; x: (..., heads, T, D)."""

    def __init__(self, heads: int, dim: int, hidden: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.w1 = _per_head_weight(heads, dim, hidden)
        self.w2 = _per_head_weight(heads, hidden, rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Broadcast matmul, not einsum: 3x less overhead on the one-token decoding path.
        return F.gelu(self.dropout(F.gelu(x @ self.w1)) @ self.w2)


class LayerKernels(nn.Module):
    """φ and ψ of one attention layer, in the grouped layout of :mod:`lesskv.attention`."""

    def __init__(self, shape: KernelShape) -> None:
        super().__init__()
        self.shape = shape
        d, k, r = shape.head_dim, shape.hidden, shape.rank
        self.phi_mlp = HeadMLP(shape.query_heads, d, k, r, shape.dropout)
        self.psi_mlp = HeadMLP(shape.kv_heads, d, k, r, shape.dropout)
        self.psi_mix = _per_head_weight(shape.kv_heads, r, r)
        self.psi_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))
        self.psi_mix_scale = nn.Parameter(torch.full((shape.kv_heads, r), SCALE_INIT))

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, T, D)`` queries → ``(B, Hkv, G, T, R)`` non-negative features."""
        b, hkv, g, t, d = q.shape
        return self.phi_mlp(q.reshape(b, hkv * g, t, d)).abs().view(b, hkv, g, t, -1)

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, T, D)`` keys → ``(B, Hkv, T, R)`` non-negative features."""
        u = self.psi_scale.abs().unsqueeze(-2) * self.psi_mlp(k)
        mixed = u @ self.psi_mix
        return (u + mixed * self.psi_mix_scale.unsqueeze(-2)).abs()


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

    @property
    def layer_shape(self) -> KernelShape:
        return KernelShape(self.query_heads, self.kv_heads, self.head_dim, self.rank, self.hidden)

    @classmethod
    def for_model(cls, model: PreTrainedModel, model_name: str, **fields) -> KernelMeta:
        module = attention_modules(model)[0]
        kv_heads = model.config.num_key_value_heads
        return cls(
            model=model_name,
            model_fingerprint=model_fingerprint(model),
            num_layers=len(attention_modules(model)),
            query_heads=kv_heads * module.num_key_value_groups,
            kv_heads=kv_heads,
            head_dim=module.head_dim,
            **fields,
        )


class LessKernels(nn.Module):
    """All layers' kernels plus their metadata, saved like a Hugging Face checkpoint."""

    def __init__(self, meta: KernelMeta, layers: list[LayerKernels] | None = None) -> None:
        super().__init__()
        self.meta = meta
        self.layers = nn.ModuleList(
            layers
            if layers is not None
            else [LayerKernels(meta.layer_shape) for _ in range(meta.num_layers)]
        )

    def check_compatible(self, model: PreTrainedModel, policy: str | None = None) -> None:
        """Raise a LessKVError naming the first thing that does not match."""
        other = KernelMeta.for_model(model, self.meta.model, policy="", budget="")
        for name in ("model_fingerprint", "num_layers", "query_heads", "kv_heads", "head_dim"):
            mine, theirs = getattr(self.meta, name), getattr(other, name)
            if mine != theirs:
                raise LessKVError(
                    f"kernels were trained for {self.meta.model} ({name}={mine}) but this model "
                    f"has {name}={theirs}: train kernels for this model with `lesskv train`"
                )
        if policy is not None and policy != self.meta.policy:
            raise LessKVError(
                f"kernels were trained for policy {self.meta.policy!r}, not {policy!r}: "
                "pass the matching --policy or train kernels for it"
            )

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
        """Load kernels, checking them against ``model`` and ``policy`` when given."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise LessKVError(f"{path} is missing: {directory} is not a lesskv kernel folder")
        try:
            meta = KernelMeta(**json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise LessKVError(f"{config_path} is corrupt ({err})") from None
        kernels = cls(meta)
        try:
            state = load_file(weights_path)
            kernels.load_state_dict({k: v.float() for k, v in state.items()})
        except Exception as err:  # safetensors raises several types for damaged files
            raise LessKVError(f"{weights_path} is corrupt or partial ({err})") from None
        if model is not None:
            kernels.check_compatible(model, policy)
        return kernels.eval()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
