"""Per-layer training of LESS kernels on a frozen model.

1. One pass of the full-attention model over the training windows records, for every layer
   of a group, the post-RoPE Q/K/V, the true attention output after ``o_proj``, and everything
   that does not depend on the kernels: the policy's eviction steps (its whole keep-mask in
   O(T)) and the sparse attention output with its log-sum-exp. Arrays stream to disk
   (fp16 memmaps), so the sequence count is not limited by RAM. Each store marks how many
   windows it holds, so an interrupted collection resumes where it stopped.
2. Each layer of the group then trains on its own: MSE between ``o_proj(LESS output)`` and the
   true output at the positions where something is evicted, Adam with the learning rate
   halved every 10 epochs, best validation checkpoint kept and written atomically; the next
   batch is read from disk while one trains. A rerun skips finished layers, so an interrupted
   run resumes, and ``layers`` lets processes share the work (:mod:`lesskv.distributed` splits
   them across torchrun's ranks).

Why groups: every layer's activations at once outgrow any disk at real sizes (an 8B model at
the paper's 512 windows of 4096 tokens records ~1.8 TiB). Layers are therefore collected in
consecutive groups whose stores fit a byte budget; a group's stores are deleted as soon as its
layers are trained. Each group runs the model over the windows again, up to its last layer
(the per-layer work, simulating the policy and storing, is done once per layer whatever the
groups); the budget never changes the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.core import eviction
from lesskv.core import math as math_ops
from lesskv.core.budget import DEFAULT_HIDDEN, DEFAULT_RANK, STATES
from lesskv.core.distribution import attention_kl
from lesskv.core.kernels import KernelShape, LayerKernels
from lesskv.core.policies import Policy, Slots, keep_mask_from_steps
from lesskv.errors import LessKVError, one_line, short_path
from lesskv.hf import attention
from lesskv.hf.checkpoint import KernelMeta, LessKernels, atomic_write
from lesskv.hf.methods import get_method, layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale, kv_heads, policy_layers
from lesskv.training.distributed import Worker, decided_by_rank0, shard
from lesskv.training.run import Claim, claim_output_dir, freeze, snapshot


@dataclass
class TrainConfig:
    """The knobs of one training run; a rerun with a different config is refused."""

    model: str
    policy: str
    budget: str
    seq_lens: list[int] = field(default_factory=lambda: [1024])
    sequences: int = 64  # windows of the shortest length (data.length_mix)
    epochs: int = 20
    batch_size: int = 2
    lr: float = 1e-3
    lr_halving_epochs: int = 10
    val_fraction: float = 0.1
    rank: int = DEFAULT_RANK
    hidden: int = DEFAULT_HIDDEN
    dropout: float = 0.3
    seed: int = 0
    data: str = ""
    state: str = STATES[0]  # the kernels' state form: learned decay, or the paper's
    upstream: str = ""  # kernels the layers run while recording (collect_activations)
    loss: str = "mse"  # what each layer's kernels minimise: one of LOSSES


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """``None`` → all layers; ``"a:b"`` → a..b-1; ``"3"`` → [3]; out of range → error."""
    if spec is None or spec.strip() in ("", ":"):
        return list(range(num_layers))
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            start, stop = int(lo or 0), int(hi or num_layers)
        else:
            start = int(spec)
            stop = start + 1
    except ValueError:
        raise LessKVError(f"--layers {spec!r} is not 'a:b' or a layer number") from None
    if not 0 <= start < stop <= num_layers:
        raise LessKVError(f"--layers {spec!r} is out of range for a model with {num_layers} layers")
    return list(range(start, stop))


# How activations are stored, by the model's dtype: fp16 keeps fp32 and fp16 models' values at
# half the disk; bf16 models' values exceed fp16's range, so they keep their own bits (numpy has
# no bfloat16: int16 files of the same bits).
STORED = {torch.bfloat16: ("bf16", np.int16, torch.bfloat16)}
DEFAULT_STORED = ("f16", np.float16, torch.float16)
COMPLETE_FILE = "complete"  # in a store's folder: how many windows, from the first, it holds
LAYERS_DIR = "layers"  # in the run folder: each trained layer's kernels, one file each


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
        shapes = self.shapes(n, hq, hkv, t, d, hidden)
        self.steps = self._memmap(self.dir / "steps.i32", np.int32, shapes.pop("steps"))
        self.arrays = {
            name: self._memmap(self.dir / f"{name}.{self.suffix}", self.numpy_dtype, shape)
            for name, shape in shapes.items()
        }
        self.complete = _complete_count(self.dir / COMPLETE_FILE, n)

    @staticmethod
    def shapes(
        n: int, hq: int, hkv: int, t: int, d: int, hidden: int
    ) -> dict[str, tuple[int, ...]]:
        """Each array's shape for ``n`` windows (``steps`` int32, the others 2-byte values);
        the target is ``o_proj``'s output, of the model's ``hidden`` size, which need not be
        ``hq * d`` (Gemma 3, Qwen3)."""
        return {
            "query": (n, hq, t, d),
            "key": (n, hkv, t, d),
            "value": (n, hkv, t, d),
            "target": (n, t, hidden),
            "sparse_out": (n, hq, t, d),
            "lse": (n, hq, t),
            "plus_out": (n, hq, t, d),
            "steps": (n, hkv, t),
        }

    @classmethod
    def nbytes(cls, n: int, hq: int, hkv: int, t: int, d: int, hidden: int) -> int:
        """Bytes on disk of a store of these dimensions: what it costs before it exists."""
        shapes = cls.shapes(n, hq, hkv, t, d, hidden)
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


class _StopForward(Exception):
    """Raised after the last recorded layer to skip the rest of the forward pass."""


# Layers whose eviction is simulated together hold at most this many logits (fp32: 4 GiB):
# the H2O simulation is a loop over decoding steps of tiny ops, so running every layer's in
# one batch divides its Python overhead by the number of layers.
SIMULATION_ELEMENTS = 2**30


@torch.no_grad()
def collect_activations(
    model: PreTrainedModel,
    windows: torch.Tensor,
    layers: list[int],
    policy: Policy,
    root: Path,
    rank: int,
    progress: bool = True,
    validation: Collection[int] | None = None,
    upstream: Sequence[nn.Module] | None = None,
) -> dict[int, ActivationStore]:
    """Run the model once over ``windows`` and record each layer in ``layers``: its post-RoPE
    Q/K/V, its full-attention output after ``o_proj`` (the target), and the policy's sparse
    output; Baseline+'s too for the ``validation`` windows (all by default), the only ones its
    loss is measured on. Windows that every store already holds (an interrupted collection)
    are not run again.

    The model runs full attention (the paper's recipe), or with ``upstream`` kernels LESS in
    every layer, so that each layer is recorded on the inputs it gets at inference, when the
    layers before it are sparse too; its target stays full attention over those inputs."""
    modules = attention_modules(model)
    n, t = windows.shape
    stores = {layer: _store(model, layer, root, n, t, policy) for layer in layers}
    seen: dict[int, tuple[torch.Tensor, ...]] = {}
    scratch: dict[tuple[int, ...], torch.Tensor] = {}  # logits buffers, reused across windows
    current = {"index": 0}
    last_layer = max(layers)

    def record_target(layer: int, output: torch.Tensor) -> None:
        stores[layer].write(current["index"], target=output[0])
        if layer == last_layer:
            raise _StopForward  # later layers and the LM head are not needed

    def observe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        q, scale = math_ops.group_queries(query, key.shape[1]), attention_scale(module)
        seen[module.layer_idx] = (q, key, value, scale)
        stores[module.layer_idx].write(current["index"], query=query[0], key=key[0], value=value[0])
        if upstream is not None:  # the model runs LESS here: full attention is ours to compute
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            full = math_ops.sparse_output(q, key, value, causal, scale)
            record_target(
                module.layer_idx, module.o_proj(full.flatten(1, 2).transpose(1, 2).flatten(2))
            )

    handles = []
    if upstream is None:  # full attention runs in the model: its o_proj outputs are the targets
        for i in layers:
            hook = functools.partial(lambda i, module, args, out: record_target(i, out), i)
            handles.append(modules[i].o_proj.register_forward_hook(hook))
    extra = get_method("baseline+").extra_tokens(rank, modules[0].head_dim)
    start = min(store.complete for store in stores.values())  # windows already collected
    bar = tqdm(
        range(start, n),
        initial=start,
        total=n,
        desc="collecting activations",
        unit="seq",
        disable=not progress,
    )
    try:
        with _recording(model, observe, layers, policy, upstream, rank):
            for i in bar:
                current["index"] = i
                with contextlib.suppress(_StopForward):
                    model(input_ids=windows[i : i + 1].to(model.device))
                budgets = [policy.slots(t)]
                if validation is None or i in validation:
                    budgets.append(policy.slots(t, extra))
                for group in _simulation_groups(seen, t):
                    _record_sparse(group, seen, stores, i, policy, budgets, scratch)
                seen.clear()
                for store in stores.values():
                    store.mark_complete(i + 1)
    finally:
        for handle in handles:
            handle.remove()
    return stores


def _store(
    model: PreTrainedModel, layer: int, root: Path, n: int, t: int, policy: Policy
) -> ActivationStore:
    kept = policy.slots(t).total
    return ActivationStore(
        root, layer, **_dimensions(model, layer, n, t), kept=kept, dtype=model.dtype
    )


def _dimensions(model: PreTrainedModel, layer: int, n: int, t: int) -> dict[str, int]:
    """The store dimensions of ``layer`` for ``n`` windows of ``t`` tokens."""
    module, hkv = attention_modules(model)[layer], kv_heads(model)
    hq = hkv * module.num_key_value_groups
    hidden = module.o_proj.out_features
    return {"n": n, "hq": hq, "hkv": hkv, "t": t, "d": module.head_dim, "hidden": hidden}


def layer_store_bytes(model: PreTrainedModel, layer: int, windows: Sequence[torch.Tensor]) -> int:
    """Disk bytes of ``layer``'s stores for ``windows`` (one ``(N, T)`` tensor per length)."""
    return sum(ActivationStore.nbytes(**_dimensions(model, layer, *w.shape)) for w in windows)


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


def _recording(
    model: PreTrainedModel,
    observe: Callable[..., None],
    layers: list[int],
    policy: Policy,
    upstream: Sequence[nn.Module] | None,
    rank: int,
) -> contextlib.AbstractContextManager:
    """Full attention with ``observe`` on ``layers``, or LESS with ``upstream`` everywhere."""
    if upstream is None:
        return observing(model, observe, layers)
    setups = layer_setups(model, "less", policy, upstream, rank)
    modules = attention_modules(model)
    for i in layers:
        setups[modules[i]] = replace(setups[modules[i]], observer=observe)
    return attention.using_setups(model, setups)


def _simulation_groups(seen: dict[int, tuple], t: int) -> list[list[int]]:
    """Layers on one device, in groups whose stacked logits stay under SIMULATION_ELEMENTS."""
    groups: dict[torch.device, list[list[int]]] = {}
    for layer, (q, *_rest) in sorted(seen.items()):
        per_layer = q[0].numel() // q.shape[-1] * t
        chunks = groups.setdefault(q.device, [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * per_layer > SIMULATION_ELEMENTS:
            chunks.append([])
        chunks[-1].append(layer)
    return [chunk for chunks in groups.values() for chunk in chunks]


def _record_sparse(
    group: list[int],
    seen: dict[int, tuple],
    stores: dict[int, ActivationStore],
    index: int,
    policy: Policy,
    budgets: list[Slots],
    scratch: dict[tuple[int, ...], torch.Tensor],
) -> None:
    """Simulate the policy at its budget (and at Baseline+'s, when ``budgets`` has both) for
    every layer of ``group``, then store each layer's sparse outputs and eviction steps."""
    first = seen[group[0]]
    if eviction.fused_applies(policy, *first[:3]):  # layer by layer, no T x T tensor
        simulated = {layer: _fused_records(policy, budgets, *seen[layer]) for layer in group}
    else:
        simulated = _reference_records(group, seen, policy, budgets, scratch)
    for layer, (steps, recorded) in simulated.items():
        flat = {name: tensor[0].flatten(0, 1) for name, tensor in recorded.items()}
        stores[layer].write(index, steps=steps, **flat)


def _fused_records(
    policy: Policy,
    budgets: list[Slots],
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out, lse, steps = eviction.policy_attention(policy, budgets[0], q, key, value, scale)
    recorded = {"sparse_out": out, "lse": lse.squeeze(-1)}
    for plus in budgets[1:]:
        recorded["plus_out"] = eviction.policy_attention(policy, plus, q, key, value, scale)[0]
    return steps[0], recorded


def _reference_records(
    group: list[int],
    seen: dict[int, tuple],
    policy: Policy,
    budgets: list[Slots],
    scratch: dict[tuple[int, ...], torch.Tensor],
) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The reference simulation, every layer of ``group`` at once (stacked on the batch axis,
    which amortises its Python loop over the layers)."""
    first = seen[group[0]][0]
    _, hkv, _, t, _ = first.shape
    logits = _stacked_logits(group, seen, scratch) if policy.uses_attention else None
    steps, *plus_steps = (
        policy.eviction_steps(logits, slots, t, device=first.device).expand(len(group), hkv, t)
        for slots in budgets
    )
    simulated = {}
    for row, layer in enumerate(group):
        q, key, value, scale = seen[layer]
        keep = keep_mask_from_steps(steps[row : row + 1])[:, :, None]
        out, lse = math_ops.sparse_attention(q, key, value, keep, scale)
        recorded = {"sparse_out": out, "lse": lse.squeeze(-1)}
        for plus in plus_steps:
            plus_keep = keep_mask_from_steps(plus[row : row + 1])[:, :, None]
            recorded["plus_out"] = math_ops.sparse_output(q, key, value, plus_keep, scale)
        simulated[layer] = (steps[row], recorded)
    return simulated


def _stacked_logits(
    group: list[int], seen: dict[int, tuple], scratch: dict[tuple[int, ...], torch.Tensor]
) -> torch.Tensor:
    """The causal logits of every layer in ``group``, written into one buffer that is reused
    for every window: stacking fresh tensors would copy, and first touching a new GiB-sized
    allocation costs more page faults than the products themselves."""
    q = seen[group[0]][0]
    shape = (len(group), *q.shape[1:4], q.shape[3])
    if shape not in scratch:
        scratch[shape] = q.new_empty(shape)
    logits = scratch[shape]
    for row, layer in enumerate(group):
        q, key, _, scale = seen[layer]
        math_ops.causal_logits(q, key, scale, out=logits[row : row + 1])
    return logits


def layer_loss(
    kernels: LayerKernels | None,
    o_proj: nn.Module,
    batch: dict[str, torch.Tensor],
    budget: int,
    kv_heads: int,
    sparse: str = "sparse_out",
) -> torch.Tensor:
    """MSE of ``o_proj(LESS output)`` against the true output, at positions >= budget.

    ``kernels=None`` scores a sparse output alone: ``sparse="plus_out"`` is Baseline+.
    """
    query, key, value = batch["query"], batch["key"], batch["value"]
    b, hq, t, d = query.shape
    out = batch[sparse].view(b, kv_heads, hq // kv_heads, t, d)
    if kernels is not None:
        q = math_ops.group_queries(query, kv_heads)
        lse = batch["lse"].view(b, kv_heads, hq // kv_heads, t, 1)
        phi_q, psi_k, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
        out = math_ops.less_parallel(out, lse, phi_q, psi_k, value, batch["steps"], decay)
    # in fp32 whatever the model's dtype (the kernels and the stored activations are fp32)
    weight, bias = o_proj.weight.float(), None if o_proj.bias is None else o_proj.bias.float()
    projected = F.linear(
        out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d), weight, bias
    )
    return F.mse_loss(projected[:, budget:], batch["target"][:, budget:])


def layer_kl(
    kernels: LayerKernels,
    batch: dict[str, torch.Tensor],
    budget: int,
    kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """KL between each query's true attention weights and LESS's implied ones
    (:func:`lesskv.core.distribution.attention_kl`), at positions >= budget."""
    q = math_ops.group_queries(batch["query"], kv_heads)
    key = batch["key"]
    phi_q, psi_k, decay = kernels.phi(q), kernels.psi(key), kernels.decay_rate()
    return attention_kl(q, key, batch["steps"], phi_q, psi_k, decay, scale, start=budget)


def _mse_and_kl(kernels, o_proj, batch, budget, kv_heads, scale) -> torch.Tensor:
    """The share of the plain policy's output error left, plus the KL: both scale-free, where
    a layer's MSE alone spans 10^4 across layers."""
    with torch.no_grad():
        sparse = layer_loss(None, o_proj, batch, budget, kv_heads)
    mse = layer_loss(kernels, o_proj, batch, budget, kv_heads)
    return mse / sparse.clamp_min(torch.finfo(sparse.dtype).tiny) + layer_kl(
        kernels, batch, budget, kv_heads, scale
    )


# What a layer's kernels can minimise, each called (kernels, o_proj, batch, budget, kv_heads,
# scale): the output MSE (the paper's), the attention distribution's KL (Hedgehog-style), or
# both. Checkpoints record which.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": lambda kernels, o_proj, batch, budget, kv, scale: layer_loss(
        kernels, o_proj, batch, budget, kv
    ),
    "kl": lambda kernels, o_proj, batch, budget, kv, scale: layer_kl(
        kernels, batch, budget, kv, scale
    ),
    "mse+kl": _mse_and_kl,
}


Batch = tuple[ActivationStore, list[int]]  # windows of one store (one length) read together


def _mean_loss(loss: Callable[..., torch.Tensor], o_proj: nn.Module, batches: list[Batch]) -> float:
    """Mean over windows of ``loss(o_proj, batch, budget)``."""
    total, windows = 0.0, 0
    with torch.no_grad():
        for store, batch in loaded(batches, o_proj.weight.device):
            value = loss(o_proj, batch, store.kept)
            size = len(batch["steps"])
            total, windows = total + value.item() * size, windows + size
    return total / windows


def loaded(
    batches: Sequence[Batch], device: torch.device
) -> Iterator[tuple[ActivationStore, dict[str, torch.Tensor]]]:
    """``batches`` in order, each on ``device``; a background thread reads the next one from
    disk (into page-locked memory for a GPU, whose copy then overlaps too) while the caller
    trains on this one. A thread, not DataLoader workers: those would pickle the memmaps
    (numpy pickles their whole contents) or copy the process, for one sequential read."""
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lesskv-read") as reader:

        def read(k: int) -> Future:
            store, chunk = batches[k]
            return reader.submit(store.gather, chunk, pin)

        pending = read(0) if batches else None
        for k, (store, _) in enumerate(batches):
            host = pending.result()
            if k + 1 < len(batches):
                pending = read(k + 1)
            yield store, on_device(host, device, non_blocking=pin)


def split_windows(n: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """Validation and training windows of one length, the same for every layer (Baseline+'s
    outputs are collected for the validation windows only)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = max(1, round(n * config.val_fraction)) if n > 1 else 0
    return order[:n_val] or order, order[n_val:] or order


def _batches(stores: list[ActivationStore], windows: list[list[int]], size: int) -> list[Batch]:
    return [
        (store, chunk[i : i + size])
        for store, chunk in zip(stores, windows, strict=True)
        for i in range(0, len(chunk), size)
    ]


def train_layer(
    stores: list[ActivationStore],
    o_proj: nn.Module,
    shape: KernelShape,
    config: TrainConfig,
    layer: int,
    log: Callable[[str], None] = print,
    scale: float | None = None,
) -> tuple[LayerKernels, dict[str, float]]:
    """Train one layer's kernels on ``o_proj``'s device from its activations at every window
    length (one store each; a batch never mixes lengths); returns the best-validation kernels
    and their losses. Every random draw comes from seeds derived from ``config.seed`` and
    ``layer`` alone, so a layer trains the same whichever process or run trains it."""
    scale = shape.head_dim**-0.5 if scale is None else scale  # the layer's attention scale
    splits = [split_windows(len(store), config) for store in stores]
    val = _batches(stores, [v for v, _ in splits], config.batch_size)
    generator = torch.Generator().manual_seed(config.seed + layer)
    torch.manual_seed(config.seed + layer)
    kernels = LayerKernels(shape).to(o_proj.weight.device)
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halving_epochs, gamma=0.5)
    kv = shape.kv_heads
    objective = LOSSES[config.loss]

    def plus_mse(o_proj, batch, budget):
        return layer_loss(None, o_proj, batch, budget, kv, "plus_out")

    def val_objective(o_proj, batch, budget):
        return objective(kernels, o_proj, batch, budget, kv, scale)

    def val_mse(o_proj, batch, budget):
        return layer_loss(kernels, o_proj, batch, budget, kv)

    baseline_plus = _mean_loss(plus_mse, o_proj, val)
    best, best_state = math.inf, None
    for _epoch in range(config.epochs):
        kernels.train()
        shuffled = [[t[j] for j in torch.randperm(len(t), generator=generator)] for _, t in splits]
        train = _batches(stores, shuffled, config.batch_size)
        order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
        for store, batch in loaded(order, o_proj.weight.device):
            loss = objective(kernels, o_proj, batch, store.kept, kv, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        kernels.eval()
        val_loss = _mean_loss(val_objective, o_proj, val)
        if val_loss < best:
            best, best_state = val_loss, snapshot(kernels)
    kernels.load_state_dict(best_state)
    mse = best if config.loss == "mse" else _mean_loss(val_mse, o_proj, val)
    log(f"layer {layer:3d}: val MSE  LESS {mse:.4g} | Baseline+ {baseline_plus:.4g}")
    return kernels.eval(), {"val_loss": mse, "baseline_plus_val_loss": baseline_plus}


def train_kernels(
    model: PreTrainedModel,
    windows: torch.Tensor | Sequence[torch.Tensor],
    policy: Policy,
    config: TrainConfig,
    out_dir: str | Path,
    layers: list[int] | None = None,
    overwrite: bool = False,
    command: str = "",
    progress: bool = True,
    worker: Worker | None = None,
    upstream: Sequence[nn.Module] | None = None,
    store_budget: int | None = None,
) -> LessKernels | None:
    """Train (or finish training) kernels into ``out_dir``; returns them once all layers exist.
    ``layers``: those to train now (all by default), less the local layers of a mixed model
    (:func:`trainable_layers`). ``windows``: ``(N, T)`` token windows, or one such tensor per
    window length; with
    ``upstream`` kernels every layer trains on the inputs it sees when all run LESS.
    ``store_budget``: bytes of activations on disk at once (default: half the free space
    there), which sizes the groups of layers collected together; it never changes the result.

    Under torchrun (``worker``), the missing layers are split across the ranks: rank 0 alone
    claims ``out_dir`` (which every rank must share), lists what is missing and, after all
    ranks are done, assembles the checkpoint; the other ranks return ``None``. Each rank gets
    an equal share of the store budget (their activations share ``out_dir``).
    """
    out = Path(out_dir)
    windows = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    modules = attention_modules(attention.enable(model))
    if not hasattr(modules[0], "o_proj"):  # the targets and the loss are o_proj's outputs
        raise LessKVError(
            f"per-layer training reads each attention layer's o_proj, which "
            f"{type(modules[0]).__name__} does not have (Falcon, GPT-NeoX, OPT and GPT-2 name "
            "theirs otherwise): training for this family is not supported yet"
        )
    lead = worker is None or worker.rank == 0
    requested = trainable_layers(model, layers, announce=lead)
    processes = 1 if worker is None else worker.world_size
    budget = (default_store_budget(out) if store_budget is None else store_budget) // processes
    sizes = {layer: layer_store_bytes(model, layer, windows) for layer in requested}
    check_store_budget(sizes, budget, processes)
    meta = _kernel_meta(model, policy, config, command)
    # a rank or width too large for memory fails now, not once the activations are recorded
    with torch.device(modules[requested[0]].o_proj.weight.device):
        LayerKernels(meta.layer_shape)

    def plan() -> tuple[list[int], Claim]:
        claim = claim_output_dir(out, config, overwrite, shared=True)
        return missing_layers(out, requested), claim

    todo, claim = plan() if worker is None else decided_by_rank0(worker, plan)
    mine = todo if worker is None else shard(todo, worker.rank, worker.world_size)
    groups = store_groups({layer: sizes[layer] for layer in mine}, budget)
    # under torchrun every rank writes in the folder: one that fails leaves it to the others
    undone = (
        claim.undone_on_error(f"{LAYERS_DIR}/*") if worker is None else contextlib.nullcontext()
    )
    with undone:
        _train_layers(
            model, windows, policy, config, out, groups, meta, progress and lead, upstream
        )
    if worker is not None:
        dist.barrier()
        lost = missing_layers(out, todo) if lead else []
        if lost:
            raise LessKVError(
                f"layers {lost} are not in {out} although every rank finished: "
                "--out must be a folder that all nodes share"
            )
    return _assemble(out, meta) if lead else None


def trainable_layers(
    model: PreTrainedModel, layers: list[int] | None, announce: bool = True
) -> list[int]:
    """The layers among ``layers`` (all by default) that get kernels: those where the policy
    runs. The local (sliding-window) layers of a model mixing local and global ones keep
    their own window and have no kernels: a range holding some trains the others (and says
    so, with ``announce``); one holding nothing else is refused."""
    runs = policy_layers(model)
    chosen = [i for i in runs if layers is None or i in layers]
    local = sorted(set(layers or []) - set(runs))
    if not chosen:
        raise LessKVError(
            f"layers {local} are all local (sliding-window) layers, where lesskv's policy does "
            f"not run and LESS has no kernels: choose among layers {runs}"
        )
    if local and announce:
        tqdm.write(f"skipping local (sliding-window) layers {local}: they keep their own window")
    return chosen


def _train_layers(
    model: PreTrainedModel,
    windows: list[torch.Tensor],
    policy: Policy,
    config: TrainConfig,
    out: Path,
    groups: list[list[int]],
    meta: KernelMeta,
    progress: bool,
    upstream: Sequence[nn.Module] | None,
) -> None:
    """Group by group: collect the group's activations (one pass per window length), then
    train and save each of its layers, deleting its activations once it is saved."""
    todo = [layer for group in groups for layer in group]
    if not todo:
        return
    freeze(model)
    modules = attention_modules(model)
    shape = replace(meta.layer_shape, dropout=config.dropout)
    started = time.time()
    bar = tqdm(total=len(todo), desc="training layers", unit="layer", disable=not progress)
    for group in groups:
        by_length = [
            collect_activations(
                model,
                length,
                group,
                policy,
                out / "activations",
                config.rank,
                progress,
                set(split_windows(len(length), config)[0]),
                upstream,
            )
            for length in windows
        ]
        for layer in group:
            stores = [stores[layer] for stores in by_length]
            module = modules[layer]
            kernels, losses = train_layer(
                stores, module.o_proj, shape, config, layer, bar.write, attention_scale(module)
            )
            _save_layer(out, layer, kernels, losses)
            for store in stores:
                shutil.rmtree(store.dir, ignore_errors=True)
            bar.update()
    bar.write(f"trained {len(todo)} layer(s) in {time.time() - started:.0f} s")


def missing_layers(out_dir: str | Path, layers: Iterable[int]) -> list[int]:
    """The layers among ``layers`` without a finished checkpoint in ``out_dir``."""
    return [i for i in layers if not _layer_path(Path(out_dir), i).exists()]


def _kernel_meta(
    model: PreTrainedModel, policy: Policy, config: TrainConfig, command: str
) -> KernelMeta:
    return KernelMeta.for_model(
        model,
        config.model,
        policy=policy.name,
        budget=str(policy.budget),
        rank=config.rank,
        hidden=config.hidden,
        seq_len=max(config.seq_lens),
        state=config.state,
        training_data=config.data,
        command=command,
        training={
            "loss": config.loss,
            "windows": config.sequences,
            "seq_lens": list(config.seq_lens),
            "epochs": config.epochs,
            "lr": config.lr,
            "lr_halving_epochs": config.lr_halving_epochs,
            "batch_size": config.batch_size,
            "dropout": config.dropout,
            "upstream": config.upstream,
        },
    )


def _layer_path(out: Path, layer: int) -> Path:
    return out / LAYERS_DIR / f"layer_{layer:03d}.safetensors"


def _save_layer(out: Path, layer: int, kernels: LayerKernels, losses: dict[str, float]) -> None:
    path = _layer_path(out, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in kernels.state_dict().items()}
    metadata = {k: repr(v) for k, v in losses.items()}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))


def _assemble(out: Path, meta: KernelMeta) -> LessKernels | None:
    """Once every kernel layer exists, write the single from_pretrained-able checkpoint."""
    if missing_layers(out, meta.kernel_layers):
        return None
    layers: list[LayerKernels | None] = [None] * meta.num_layers
    for i in meta.kernel_layers:
        path = _layer_path(out, i)
        layer = LayerKernels(meta.layer_shape)
        try:
            layer.load_state_dict(load_file(path))
            with open(path, "rb") as f:  # losses live in the safetensors header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except Exception as err:
            raise LessKVError(
                f"{short_path(path)} is corrupt ({one_line(err, 120)}); delete it and rerun"
            ) from None
        losses = header.get("__metadata__", {})
        meta.val_loss[str(i)] = float(losses.get("val_loss", "nan"))
        meta.baseline_plus_val_loss[str(i)] = float(losses.get("baseline_plus_val_loss", "nan"))
        layers[i] = layer
    kernels = LessKernels(meta, layers).eval()
    kernels.save_pretrained(out)
    shutil.rmtree(out / "activations", ignore_errors=True)
    return kernels
