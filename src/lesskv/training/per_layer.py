"""Per-layer training of LESS kernels on a frozen model.

1. One pass of the full-attention model over the training windows records, for every layer
   trained, the post-RoPE Q/K/V, the true attention output after ``o_proj``, and everything
   that does not depend on the kernels: the policy's eviction steps (its whole keep-mask in
   O(T)) and the sparse attention output with its log-sum-exp. Arrays stream to disk
   (fp16 memmaps), so the sequence count is not limited by RAM.
2. Each layer then trains on its own: MSE between ``o_proj(LESS output)`` and the true output
   at the positions where something is evicted, Adam with the learning rate halved every 10
   epochs, best validation checkpoint kept and written atomically. A rerun skips finished
   layers, so an interrupted run resumes, and ``layers`` lets processes share the work
   (:mod:`lesskv.distributed` splits them across torchrun's ranks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Sequence
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
from lesskv.core.kernels import KernelShape, LayerKernels
from lesskv.core.policies import Policy, Slots, keep_mask_from_steps
from lesskv.errors import LessKVError
from lesskv.hf import attention
from lesskv.hf.checkpoint import KernelMeta, LessKernels, atomic_write
from lesskv.hf.methods import extra_tokens, layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale, kv_heads
from lesskv.training.distributed import Worker, decided_by_rank0, shard
from lesskv.training.run import claim_output_dir, freeze, snapshot


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


class ActivationStore:
    """Per-layer memmaps (fp16, or bf16 for a bf16 model) of everything one layer's training
    needs."""

    def __init__(
        self,
        root: Path,
        layer: int,
        n: int,
        hq: int,
        hkv: int,
        t: int,
        d: int,
        budget: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dir = root / f"len_{t}" / f"layer_{layer:03d}"
        self.budget = budget  # the loss counts positions from here on: something is evicted
        self.dir.mkdir(parents=True, exist_ok=True)
        self.suffix, self.numpy_dtype, self.torch_dtype = STORED.get(dtype, DEFAULT_STORED)
        other = [p.name for p in self.dir.glob("query.*") if p.suffix != f".{self.suffix}"]
        if other:  # never read one dtype's bits as another's
            raise LessKVError(
                f"{self.dir} holds activations stored as {other[0].split('.')[1]} (another "
                f"model dtype); this run stores {self.suffix}: use another --out or --overwrite"
            )
        shapes = {
            "query": (n, hq, t, d),
            "key": (n, hkv, t, d),
            "value": (n, hkv, t, d),
            "target": (n, t, hq * d),
            "sparse_out": (n, hq, t, d),
            "lse": (n, hq, t),
            "plus_out": (n, hq, t, d),
        }
        mode = "r+" if (self.dir / f"query.{self.suffix}").exists() else "w+"
        self.arrays = {
            name: np.memmap(self.dir / f"{name}.{self.suffix}", self.numpy_dtype, mode, shape=shape)
            for name, shape in shapes.items()
        }
        steps_path = self.dir / "steps.i32"
        self.steps = np.memmap(steps_path, np.int32, mode, shape=(n, hkv, t))

    def __len__(self) -> int:
        return self.steps.shape[0]

    def write(self, index: int, **tensors: torch.Tensor) -> None:
        """Store window ``index``'s tensors; torch converts them (vectorised, and bf16 has no
        numpy dtype), numpy only copies."""
        for name, tensor in tensors.items():
            if name == "steps":
                self.steps[index] = tensor.detach().to("cpu", torch.int32).numpy()
                continue
            stored = tensor.detach().to("cpu", self.torch_dtype)
            if self.torch_dtype == torch.bfloat16:
                stored = stored.view(torch.int16)
            self.arrays[name][index] = stored.numpy()

    def read(
        self, indices: list[int], device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        batch = {k: self._tensor(np.stack([a[i] for i in indices])) for k, a in self.arrays.items()}
        batch["steps"] = torch.from_numpy(np.stack([self.steps[i] for i in indices])).long()
        return {k: v.to(device) for k, v in batch.items()}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        stored = torch.from_numpy(array)
        return stored.view(self.torch_dtype).float()

    def flush(self) -> None:
        for array in (*self.arrays.values(), self.steps):
            array.flush()


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
    loss is measured on.

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
    extra = extra_tokens("baseline+", rank, modules[0].head_dim)
    bar = tqdm(range(n), desc="collecting activations", unit="seq", disable=not progress)
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
    finally:
        for handle in handles:
            handle.remove()
    for store in stores.values():
        store.flush()
    return stores


def _store(
    model: PreTrainedModel, layer: int, root: Path, n: int, t: int, policy: Policy
) -> ActivationStore:
    module, hkv = attention_modules(model)[layer], kv_heads(model)
    hq = hkv * module.num_key_value_groups
    budget = policy.slots(t).total
    return ActivationStore(root, layer, n, hq, hkv, t, module.head_dim, budget, model.dtype)


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


Batch = tuple[ActivationStore, list[int]]  # windows of one store (one length) read together


def _mean_loss(
    kernels: LayerKernels | None,
    o_proj: nn.Module,
    batches: list[Batch],
    kv_heads: int,
    sparse: str = "sparse_out",
) -> float:
    """Mean over windows of :func:`layer_loss`."""
    total, windows = 0.0, 0
    with torch.no_grad():
        for store, chunk in batches:
            batch = store.read(chunk, o_proj.weight.device)
            loss = layer_loss(kernels, o_proj, batch, store.budget, kv_heads, sparse)
            total, windows = total + loss.item() * len(chunk), windows + len(chunk)
    return total / windows


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
) -> tuple[LayerKernels, dict[str, float]]:
    """Train one layer's kernels on ``o_proj``'s device from its activations at every window
    length (one store each; a batch never mixes lengths); returns the best-validation kernels
    and their losses. Every random draw comes from seeds derived from ``config.seed`` and
    ``layer`` alone, so a layer trains the same whichever process or run trains it."""
    splits = [split_windows(len(store), config) for store in stores]
    val = _batches(stores, [v for v, _ in splits], config.batch_size)
    generator = torch.Generator().manual_seed(config.seed + layer)
    torch.manual_seed(config.seed + layer)
    kernels = LayerKernels(shape).to(o_proj.weight.device)
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halving_epochs, gamma=0.5)
    kv = shape.kv_heads
    baseline_plus = _mean_loss(None, o_proj, val, kv, "plus_out")
    best, best_state = math.inf, None
    for _epoch in range(config.epochs):
        kernels.train()
        shuffled = [[t[j] for j in torch.randperm(len(t), generator=generator)] for _, t in splits]
        train = _batches(stores, shuffled, config.batch_size)
        for k in torch.randperm(len(train), generator=generator).tolist():
            store, chunk = train[k]
            batch = store.read(chunk, o_proj.weight.device)
            loss = layer_loss(kernels, o_proj, batch, store.budget, kv)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        kernels.eval()
        val_loss = _mean_loss(kernels, o_proj, val, kv)
        if val_loss < best:
            best, best_state = val_loss, snapshot(kernels)
    kernels.load_state_dict(best_state)
    log(f"layer {layer:3d}: val MSE  LESS {best:.4g} | Baseline+ {baseline_plus:.4g}")
    return kernels.eval(), {"val_loss": best, "baseline_plus_val_loss": baseline_plus}


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
) -> LessKernels | None:
    """Train (or finish training) kernels into ``out_dir``; returns them once all layers exist.
    ``windows``: ``(N, T)`` token windows, or one such tensor per window length; with
    ``upstream`` kernels every layer trains on the inputs it sees when all run LESS.

    Under torchrun (``worker``), the missing layers are split across the ranks: rank 0 alone
    claims ``out_dir`` (which every rank must share), lists what is missing and, after all
    ranks are done, assembles the checkpoint; the other ranks return ``None``.
    """
    out = Path(out_dir)
    windows = [windows] if isinstance(windows, torch.Tensor) else list(windows)
    modules = attention_modules(attention.enable(model))
    requested = range(len(modules)) if layers is None else layers

    def plan() -> list[int]:
        claim_output_dir(out, config, overwrite, shared=True)
        return missing_layers(out, requested)

    todo = plan() if worker is None else decided_by_rank0(worker, plan)
    mine = todo if worker is None else shard(todo, worker.rank, worker.world_size)
    lead = worker is None or worker.rank == 0
    meta = _kernel_meta(model, policy, config, command)
    _train_layers(model, windows, policy, config, out, mine, meta, progress and lead, upstream)
    if worker is not None:
        dist.barrier()
        lost = missing_layers(out, todo) if lead else []
        if lost:
            raise LessKVError(
                f"layers {lost} are not in {out} although every rank finished: "
                "--out must be a folder that all nodes share"
            )
    return _assemble(out, meta) if lead else None


def _train_layers(
    model: PreTrainedModel,
    windows: list[torch.Tensor],
    policy: Policy,
    config: TrainConfig,
    out: Path,
    todo: list[int],
    meta: KernelMeta,
    progress: bool,
    upstream: Sequence[nn.Module] | None,
) -> None:
    """Collect activations for ``todo`` in one pass per window length, then train and save
    each layer."""
    if not todo:
        return
    freeze(model)
    modules = attention_modules(model)
    shape = replace(meta.layer_shape, dropout=config.dropout)
    started = time.time()
    by_length = [
        collect_activations(
            model,
            group,
            todo,
            policy,
            out / "activations",
            config.rank,
            progress,
            set(split_windows(len(group), config)[0]),
            upstream,
        )
        for group in windows
    ]
    bar = tqdm(todo, desc="training layers", unit="layer", disable=not progress)
    for layer in bar:
        stores = [stores[layer] for stores in by_length]
        kernels, losses = train_layer(
            stores, modules[layer].o_proj, shape, config, layer, bar.write
        )
        _save_layer(out, layer, kernels, losses)
        for store in stores:
            shutil.rmtree(store.dir, ignore_errors=True)
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
    )


def _layer_path(out: Path, layer: int) -> Path:
    return out / "layers" / f"layer_{layer:03d}.safetensors"


def _save_layer(out: Path, layer: int, kernels: LayerKernels, losses: dict[str, float]) -> None:
    path = _layer_path(out, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in kernels.state_dict().items()}
    metadata = {k: repr(v) for k, v in losses.items()}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))


def _assemble(out: Path, meta: KernelMeta) -> LessKernels | None:
    """Once every layer exists, write the single from_pretrained-able checkpoint."""
    if missing_layers(out, range(meta.num_layers)):
        return None
    layers = []
    for i in range(meta.num_layers):
        path = _layer_path(out, i)
        layer = LayerKernels(meta.layer_shape)
        try:
            layer.load_state_dict(load_file(path))
            with open(path, "rb") as f:  # losses live in the safetensors header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except Exception as err:
            raise LessKVError(f"{path} is corrupt ({err}); delete it and rerun") from None
        losses = header.get("__metadata__", {})
        meta.val_loss[str(i)] = float(losses.get("val_loss", "nan"))
        meta.baseline_plus_val_loss[str(i)] = float(losses.get("baseline_plus_val_loss", "nan"))
        layers.append(layer)
    kernels = LessKernels(meta, layers).eval()
    kernels.save_pretrained(out)
    shutil.rmtree(out / "activations", ignore_errors=True)
    return kernels
