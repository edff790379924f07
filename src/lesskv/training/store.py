"""Where one layer's activations live between collection and training: an
:class:`ActivationStore` of memmaps on disk per layer and window length, and what stores
cost (their bytes, the groups of layers whose stores fit a budget, the default budget)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from lesskv.core.policies import Policy
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf.checkpoint import atomic_write
from lesskv.hf.modules import attention_modules, kv_heads

# How activations are stored, by the model's dtype: fp16 keeps fp32 and fp16 models' values at
# half the disk; bf16 models' values exceed fp16's range, so they keep their own bits (numpy has
# no bfloat16: int16 files of the same bits).
STORED = {torch.bfloat16: ("bf16", np.int16, torch.bfloat16)}
DEFAULT_STORED = ("f16", np.float16, torch.float16)
COMPLETE_FILE = "complete"  # in a store's folder: how many windows, from the first, it holds


class ActivationStore:
    """Per-layer memmaps (fp16, or bf16 for a bf16 model) of everything one layer's training
    needs, and how many of its windows are complete."""

    def __init__(
        self,
        root: Path,
        layer: int,
        n: int,
        hq: int,
        hkv: int,
        t: int,
        d: int,
        hidden: int,
        kept: int,
        dtype: torch.dtype = torch.float32,
        grads: bool = False,
    ) -> None:
        self.dir = root / f"len_{t}" / f"layer_{layer:03d}"
        self.kept = kept  # pairs the policy keeps: the loss counts positions from here on
        self.dir.mkdir(parents=True, exist_ok=True)
        self.suffix, self.numpy_dtype, self.torch_dtype = STORED.get(dtype, DEFAULT_STORED)
        other = [p.name for p in self.dir.glob("query.*") if p.suffix != f".{self.suffix}"]
        if other:  # never read one dtype's bits as another's
            raise LessKVError(
                f"{self.dir} holds activations stored as {other[0].split('.')[1]} (another "
                f"model dtype); this run stores {self.suffix}: use another --out or --overwrite"
            )
        shapes = self.shapes(n, hq, hkv, t, d, hidden, grads)
        started = (self.dir / COMPLETE_FILE).exists()
        if grads and started and not (self.dir / f"grad.{self.suffix}").exists():
            raise LessKVError(
                f"{short_path(self.dir)} holds activations recorded without the NLL's gradients, "
                "which --loss weighted needs: use another --out or --overwrite"
            )
        self.steps = self._memmap(self.dir / "steps.i32", np.int32, shapes.pop("steps"))
        self.arrays = {
            name: self._memmap(self.dir / f"{name}.{self.suffix}", self.numpy_dtype, shape)
            for name, shape in shapes.items()
        }
        self.complete = _complete_count(self.dir / COMPLETE_FILE, n)

    @staticmethod
    def shapes(
        n: int, hq: int, hkv: int, t: int, d: int, hidden: int, grads: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """Each array's shape for ``n`` windows (``steps`` int32, the others 2-byte values);
        the target is ``o_proj``'s output, of the model's ``hidden`` size, which need not be
        ``hq * d`` (Gemma 3, Qwen3); with ``grads``, ``grad`` is the window's summed NLL's
        gradient at that output with the plain policy running (``--loss weighted``)."""
        return {
            "query": (n, hq, t, d),
            "key": (n, hkv, t, d),
            "value": (n, hkv, t, d),
            "target": (n, t, hidden),
            "sparse_out": (n, hq, t, d),
            "lse": (n, hq, t),
            "plus_out": (n, hq, t, d),
            "steps": (n, hkv, t),
            **({"grad": (n, t, hidden)} if grads else {}),
        }

    @classmethod
    def nbytes(
        cls, n: int, hq: int, hkv: int, t: int, d: int, hidden: int, grads: bool = False
    ) -> int:
        """Bytes on disk of a store of these dimensions: what it costs before it exists."""
        shapes = cls.shapes(n, hq, hkv, t, d, hidden, grads)
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        steps = sizes.pop("steps") * np.dtype(np.int32).itemsize
        return steps + sum(sizes.values()) * np.dtype(DEFAULT_STORED[1]).itemsize

    @staticmethod
    def _memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap:
        return np.memmap(path, dtype, "r+" if path.exists() else "w+", shape=shape)

    def __len__(self) -> int:
        return self.steps.shape[0]

    def write(self, index: int, **tensors: torch.Tensor) -> None:
        """Store window ``index``'s tensors (a complete window is kept as it is: a resumed
        collection never rewrites one); torch converts them (vectorised, and bf16 has no
        numpy dtype), numpy only copies."""
        if index < self.complete:
            return
        for name, tensor in tensors.items():
            if name == "steps":
                self.steps[index] = tensor.detach().to("cpu", torch.int32).numpy()
                continue
            stored = tensor.detach().to("cpu", self.torch_dtype)
            if self.torch_dtype == torch.bfloat16:
                stored = stored.view(torch.int16)
            self.arrays[name][index] = stored.numpy()

    def mark_complete(self, count: int) -> None:
        """Record that windows ``0..count-1`` are on disk (flushed first, so the mark never
        runs ahead of the data)."""
        if count <= self.complete:
            return
        self.flush()
        atomic_write(self.dir / COMPLETE_FILE, lambda p: Path(p).write_text(f"{count}\n"))
        self.complete = count

    def gather(self, indices: list[int], pin: bool = False) -> dict[str, torch.Tensor]:
        """Windows ``indices`` as host tensors in the stored dtypes (half the bytes of fp32
        to move), in page-locked memory with ``pin`` so a GPU copies them asynchronously."""
        batch = {
            name: torch.from_numpy(np.stack([array[i] for i in indices])).view(self.torch_dtype)
            for name, array in self.arrays.items()
        }
        batch["steps"] = torch.from_numpy(np.stack([self.steps[i] for i in indices]))
        return {name: t.pin_memory() if pin else t for name, t in batch.items()}

    def read(
        self, indices: list[int], device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Windows ``indices`` on ``device``: fp32 values and int64 steps."""
        return on_device(self.gather(indices), device)

    def flush(self) -> None:
        for array in (*self.arrays.values(), self.steps):
            array.flush()


def _complete_count(marker: Path, n: int) -> int:
    """How many windows a store's ``marker`` says it holds (none without one); a marker
    that is not a count of 0 to ``n`` is damage, and resuming from it would train on
    windows never written."""
    if not marker.exists():
        return 0
    text = marker.read_text(errors="replace").strip()
    if not text.isdecimal() or int(text) > n:
        raise LessKVError(
            f"{short_path(marker)} is corrupt (it should count the windows stored, 0 to {n}, "
            f"not {one_line(text, 20)!r}); delete it and rerun"
        )
    return int(text)


def on_device(
    host: dict[str, torch.Tensor], device: torch.device | None, non_blocking: bool = False
) -> dict[str, torch.Tensor]:
    """:meth:`ActivationStore.gather`'s tensors moved, then widened there (fp32 values, int64
    steps: exact conversions, so where they run changes no bit)."""
    moved = {name: t.to(device, non_blocking=non_blocking) for name, t in host.items()}
    return {name: t.long() if name == "steps" else t.float() for name, t in moved.items()}


def layer_store(
    model: PreTrainedModel,
    layer: int,
    root: Path,
    n: int,
    t: int,
    policy: Policy,
    grads: bool = False,
) -> ActivationStore:
    kept = policy.slots(t).total
    dims = _dimensions(model, layer, n, t)
    return ActivationStore(root, layer, **dims, kept=kept, dtype=model.dtype, grads=grads)


def _dimensions(model: PreTrainedModel, layer: int, n: int, t: int) -> dict[str, int]:
    """The store dimensions of ``layer`` for ``n`` windows of ``t`` tokens."""
    module, hkv = attention_modules(model)[layer], kv_heads(model)
    hq = hkv * module.num_key_value_groups
    hidden = module.o_proj.out_features
    return {"n": n, "hq": hq, "hkv": hkv, "t": t, "d": module.head_dim, "hidden": hidden}


def layer_store_bytes(
    model: PreTrainedModel, layer: int, windows: Sequence[torch.Tensor], grads: bool = False
) -> int:
    """Disk bytes of ``layer``'s stores for ``windows`` (one ``(N, T)`` tensor per length)."""
    return sum(
        ActivationStore.nbytes(**_dimensions(model, layer, *w.shape), grads=grads) for w in windows
    )


def store_groups(sizes: dict[int, int], budget: int) -> list[list[int]]:
    """The layers of ``sizes`` (layer → store bytes), in order, in consecutive groups whose
    stores together fit ``budget`` bytes (each layer alone must: :func:`check_store_budget`)."""
    groups: list[list[int]] = [[]]
    used = 0
    for layer, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    return groups


def check_store_budget(sizes: dict[int, int], budget: int, processes: int = 1) -> None:
    """Refuse, before any work, a budget that cannot hold even one layer's stores."""
    need = max(sizes.values(), default=0)
    if need > budget:
        each = f" for each of {processes} processes" if processes > 1 else ""
        raise LessKVError(
            f"one layer's activations need {need} bytes ({_readable(need)}) on disk, more "
            f"than the store budget of {budget} bytes ({_readable(budget)}){each}: raise "
            "--store-budget, or train on fewer or shorter windows"
        )


def _readable(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it at least 1."""
    power = min(max((size.bit_length() - 1) // 10, 0), 4)
    return f"{size / 1024**power:.4g} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[power]}"


def default_store_budget(out: Path) -> int:
    """Half the free disk space where ``out`` is (or will be): room for the activations,
    with as much again left for everything else on that disk."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    return shutil.disk_usage(existing).free // 2
