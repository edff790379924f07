"""Why LESS works, as figures: the residual spectrum (paper Fig. 3) and attention maps (Fig. 1).

Both read the post-RoPE Q, K, V that a full-attention forward pass hands the attention function
(:func:`lesskv.hf.methods.observing`) and recompute attention with the same math as every other
path (:mod:`lesskv.core.math`), so what is plotted is what the model computes.

* Residual: per layer and query head, the share of squared singular values in the top-k of the
  attention output ``O`` (T x D) and of the residual ``O_full - O_sparse``, over the positions
  where the policy has evicted. A residual far more concentrated than ``O`` is what lets a
  rank-R state recover it.
* Attention maps: for one layer and head, the full softmax, the sparse policy's softmax over
  its kept keys, and LESS's effective weights (kept keys ``exp(q.k)``, evicted keys
  ``phi(q).psi(k)``, one shared normaliser), whose product with V is exactly LESS's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.colors import LogNorm
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.analysis.plots import plt, save_figure, save_json
from lesskv.core import math
from lesskv.core.budget import DEFAULT_RANK
from lesskv.core.policies import Policy, keep_mask_from_steps
from lesskv.errors import LessKVError
from lesskv.hf.methods import observing
from lesskv.hf.modules import attention_modules, attention_scale, policy_layers

DEFAULT_KS = (1, 2, 4, 8, 16)


@dataclass
class LayerAttention:
    """One layer's attention for one sequence, grouped by KV head (see lesskv.core.math)."""

    query: torch.Tensor  # (B, Hkv, G, T, D)
    key: torch.Tensor  # (B, Hkv, T, D)
    value: torch.Tensor
    logits: torch.Tensor  # scaled, causally masked (B, Hkv, G, T, T)
    scale: float

    @classmethod
    def observe(cls, module: nn.Module, query, key, value) -> LayerAttention:
        q = math.group_queries(query, key.shape[1])
        scale = attention_scale(module)
        return cls(q, key, value, math.causal_logits(q, key, scale), scale)

    def keep(self, policy: Policy) -> tuple[torch.Tensor, int]:
        """The policy's keep-mask ``(B, Hkv, 1, T, T)`` and its budget in tokens."""
        t = self.key.shape[2]
        slots = policy.slots(t)
        steps = policy.eviction_steps(self.logits, slots, t)
        return keep_mask_from_steps(steps).unsqueeze(2), min(slots.total, t)


def top_energy(x: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Share of ``||x||_F^2`` in the top-k singular values of each matrix ``(..., M, N)``,
    ``(..., len(ks))``; k beyond the rank counts every value."""
    s2 = torch.linalg.svdvals(x.float()).pow(2)  # float64 would be ~40x slower on CPU
    cumulative = s2.cumsum(-1) / s2.sum(-1, keepdim=True).clamp_min(torch.finfo(s2.dtype).tiny)
    idx = torch.tensor([min(k, s2.shape[-1]) - 1 for k in ks], device=s2.device)
    return cumulative.index_select(-1, idx)


@dataclass
class ResidualReport:
    """Mean top-k energies ``[layer][query head][k]`` of the output and the residual."""

    model: str
    policy: str
    budget: str
    budget_tokens: int
    seq_len: int
    windows: int
    ks: list[int]
    output: list[list[list[float]]]
    residual: list[list[list[float]]]

    def columns(self) -> list[str]:
        return [f"{part}_top{k}" for part in ("output", "residual") for k in self.ks]

    def layer_rows(self) -> list[dict]:
        """Per layer, every column averaged over heads."""
        rows = []
        for layer, (out, res) in enumerate(zip(self.output, self.residual, strict=True)):
            means = [sum(col) / len(col) for part in (out, res) for col in zip(*part, strict=True)]
            rows.append({"layer": layer, **dict(zip(self.columns(), means, strict=True))})
        return rows

    def save(self, out_dir: str | Path) -> Path:
        return save_json(
            {**asdict(self), "layers": self.layer_rows()}, Path(out_dir) / "residual.json"
        )


@torch.no_grad()
def residual_energy(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    ks: Sequence[int] = DEFAULT_KS,
    model_name: str = "",
    progress: bool = True,
) -> ResidualReport:
    """Top-k singular-value energy of full attention outputs and of full − sparse residuals,
    per layer and query head, averaged over ``windows`` ``(N, T)``, at positions >= budget;
    NaN in a layer where the policy does not run (a local layer of a mixed model)."""
    n, t = windows.shape
    budget_tokens = policy.slots(t).total
    if budget_tokens >= t:
        raise LessKVError(
            f"a budget of {budget_tokens} tokens keeps all of a {t}-token window: "
            "nothing is evicted, so there is no residual"
        )
    sums: dict[int, torch.Tensor] = {}

    def observe(module, query, key, value) -> None:
        layer = LayerAttention.observe(module, query, key, value)
        keep, budget = layer.keep(policy)
        causal = layer.logits > math.NEG_INF
        full = math.sparse_output(layer.query, layer.key, value, causal, layer.scale)
        sparse = math.sparse_output(layer.query, layer.key, value, keep, layer.scale)
        full, sparse = full[..., budget:, :].flatten(1, 2), sparse[..., budget:, :].flatten(1, 2)
        energies = torch.stack([top_energy(full, ks), top_energy(full - sparse, ks)])
        total = energies.sum(1)  # over the batch: (2, Hq, K)
        sums[module.layer_idx] = sums.get(module.layer_idx, 0) + total.cpu()

    runs = policy_layers(model)
    with observing(model, observe, runs):
        for window in tqdm(windows, desc="residual", unit="win", disable=not progress):
            model(input_ids=window[None].to(model.device))
    blank = torch.full_like(sums[runs[0]], float("nan"))
    means = [sums[i] / n if i in sums else blank for i in range(len(attention_modules(model)))]
    return ResidualReport(
        model=model_name or model.config.model_type,
        policy=policy.name,
        budget=str(policy.budget),
        budget_tokens=budget_tokens,
        seq_len=t,
        windows=n,
        ks=list(ks),
        output=[m[0].tolist() for m in means],
        residual=[m[1].tolist() for m in means],
    )


def plot_residual_energy(
    report: ResidualReport, out_dir: str | Path, rank: int = DEFAULT_RANK
) -> Path:
    """Energy vs layer for every k (output solid, residual dashed), and layer x head maps of
    the top-``rank`` energy (LESS's state has rank 8 by default)."""
    out = torch.tensor(report.output).numpy()  # (L, H, K)
    res = torch.tensor(report.residual).numpy()
    k_idx = report.ks.index(rank) if rank in report.ks else len(report.ks) - 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    layers = range(out.shape[0])
    colors = plt.cm.viridis(torch.linspace(0, 0.9, len(report.ks)).tolist())
    for i, (k, color) in enumerate(zip(report.ks, colors, strict=True)):
        axes[0].plot(layers, out[:, :, i].mean(1), "-", color=color, label=f"output top-{k}")
        axes[0].plot(layers, res[:, :, i].mean(1), "--", color=color, label=f"residual top-{k}")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("share of squared singular values (mean over heads)")
    axes[0].set_ylim(0, 1.02)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    k = report.ks[k_idx]
    for ax, data, name in ((axes[1], out, "attention output"), (axes[2], res, "residual")):
        image = ax.imshow(data[:, :, k_idx].T, vmin=0, vmax=1, aspect="auto", cmap="magma")
        ax.set_xlabel("layer")
        ax.set_ylabel("query head")
        ax.set_title(f"{name}: top-{k} energy")
    fig.colorbar(image, ax=axes[1:], fraction=0.03)
    fig.suptitle(
        f"{report.model}: {report.policy} budget {report.budget} ({report.budget_tokens} of "
        f"{report.seq_len} tokens), {report.windows} window(s); residual = full − sparse"
    )
    return save_figure(fig, Path(out_dir) / "residual.png", dpi=110)


@dataclass
class AttentionMaps:
    """Row-stochastic ``(T, T)`` maps of one query head; ``evicted``: causal but not kept."""

    layer: int
    head: int
    policy: str
    budget: str
    budget_tokens: int
    maps: dict[str, torch.Tensor]
    evicted: torch.Tensor
    tokens: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[dict]:
        """Per map, over rows past the budget: total-variation distance to full attention, and
        the attention mass the map puts on evicted keys."""
        rows = slice(self.budget_tokens, None)
        full = self.maps["full"][rows]
        evicted = self.evicted[rows]
        return [
            {
                "map": name,
                "tv_to_full": 0.5 * (m[rows] - full).abs().sum(-1).mean().item(),
                "mass_on_evicted": (m[rows] * evicted).sum(-1).mean().item(),
            }
            for name, m in self.maps.items()
        ]

    def save(self, out_dir: str | Path) -> Path:
        meta = {k: v for k, v in asdict(self).items() if k not in ("maps", "evicted")}
        meta["summary"] = self.summary_rows()
        return save_json(meta, Path(out_dir) / "attention.json")


@torch.no_grad()
def attention_maps(
    model: PreTrainedModel,
    ids: torch.Tensor,
    layer: int,
    head: int,
    policy: Policy,
    kernels: Sequence[nn.Module] | None = None,
) -> AttentionMaps:
    """Full, sparse and (with ``kernels``, one module per layer) LESS-effective attention of
    query head ``head`` in ``layer`` over the one sequence ``ids`` ``(1, T)``."""
    modules = attention_modules(model)
    if not 0 <= layer < len(modules):
        raise LessKVError(f"--layer {layer} is out of range: the model has {len(modules)} layers")
    runs = policy_layers(model)
    if layer not in runs:
        raise LessKVError(
            f"--layer {layer} is a local (sliding-window) layer, where lesskv's policy does not "
            f"run: choose among layers {runs}"
        )
    heads = model.config.num_attention_heads
    if not 0 <= head < heads:
        raise LessKVError(f"--head {head} is out of range: the model has {heads} query heads")
    if ids.shape[0] != 1 or ids.shape[1] < 2:
        raise LessKVError("attention maps need one text of at least 2 tokens")
    seen: dict[str, LayerAttention] = {}

    def observe(module, query, key, value) -> None:
        if module.layer_idx == layer:
            seen["layer"] = LayerAttention.observe(module, query, key, value)

    with observing(model, observe):
        model(input_ids=ids.to(model.device))
    att = seen["layer"]
    keep_all, budget = att.keep(policy)
    group = att.query.shape[2]
    kv_head, member = divmod(head, group)
    logits = att.logits[0, kv_head, member]
    causal = logits > math.NEG_INF
    keep = keep_all[0, kv_head, 0]
    maps = {
        "full": logits.softmax(-1),
        "sparse": logits.masked_fill(~keep, math.NEG_INF).softmax(-1),
    }
    if kernels is not None:
        phi = kernels[layer].phi(att.query)[0, kv_head, member]  # (T, R)
        psi = kernels[layer].psi(att.key)[0, kv_head]
        positions = torch.arange(phi.shape[0], device=phi.device)
        distance = (positions[:, None] - positions).clamp_min(0)
        # phi, psi >= 0: log 0 = -inf, weight 0; the state's decay fades distant pairs.
        lowrank = (phi @ psi.T).log() - kernels[layer].decay_rate()[kv_head] * distance
        weights = torch.where(keep, logits, torch.where(causal, lowrank, math.NEG_INF))
        maps["less"] = weights.softmax(-1)
    return AttentionMaps(
        layer=layer,
        head=head,
        policy=policy.name,
        budget=str(policy.budget),
        budget_tokens=budget,
        maps={k: v.float().cpu() for k, v in maps.items()},
        evicted=(causal & ~keep).cpu(),
    )


def plot_attention_maps(maps: AttentionMaps, out_dir: str | Path) -> Path:
    """Side-by-side maps on a shared log colour scale; evicted keys of the sparse map show as
    background, and the LESS map shows what the state gives back to them."""
    summary = {r["map"]: r for r in maps.summary_rows()}
    titles = {
        "full": "full attention",
        "sparse": f"{maps.policy} {maps.budget} (sparse, {maps.budget_tokens} kept)",
        "less": "LESS effective",
    }
    fig, axes = plt.subplots(1, len(maps.maps), figsize=(5 * len(maps.maps), 4.6), squeeze=False)
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    for ax, (name, m) in zip(axes[0], maps.maps.items(), strict=True):
        future = torch.ones_like(m, dtype=torch.bool).triu(1)  # blank, unlike evicted keys
        weights = m.clamp_min(1e-12).masked_fill(future, float("nan")).numpy()
        image = ax.imshow(weights, norm=norm, cmap="viridis", interpolation="nearest")
        tv = summary[name]["tv_to_full"]
        ax.set_title(titles[name] + ("" if name == "full" else f"\nTV to full {tv:.3f}"))
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle(f"layer {maps.layer}, query head {maps.head}, {len(maps.evicted)} tokens")
    return save_figure(fig, Path(out_dir) / "attention.png", dpi=110)
