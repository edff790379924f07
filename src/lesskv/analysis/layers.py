"""Where LESS loses, layer by layer: what each layer's learned state removes of the sparse
policy's error, beside what a rank-r correction could remove, and what LESS in one layer (or
from one layer on) does to the model's perplexity.

* **Shares removed** (the model's real inputs: every layer is read during a full-attention
  forward, :func:`lesskv.hf.methods.observing`): per layer where the policy runs (the local
  layers of a model mixing local and global ones keep their own window: NaN), the sparse error
  ``E = ||O_full - O_sparse||^2`` over the windows' outputs (per query head, ``T x D``), and
  the share ``1 - ||O_full - O_x||^2 / E`` that Baseline+, LESS and the rank-r oracle
  (``O_sparse + truncated_r(O_full - O_sparse)``) remove. A layer where LESS removes far less
  than the oracle is where the kernels, not the rank, are the limit.
* **End to end**: mean NLL with LESS in layer ``l`` only (the others the plain policy), and in
  layers ``>= l`` (the plain policy below): which layers' states the model's loss feels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lesskv.analysis.plots import evicting_budget, plt, save_figure, save_json
from lesskv.core import math as attention_math
from lesskv.core.budget import DEFAULT_RANK
from lesskv.core.policies import Policy
from lesskv.evaluation.perplexity import mean_nll
from lesskv.hf.attention import LayerSetup, layer_output, using_setups
from lesskv.hf.methods import get_method, layer_setups, observing
from lesskv.hf.modules import attention_modules, attention_scale, policy_layers

COMPARED = ("baseline+", "less", "oracle")


@dataclass
class LayerDiagnosis:
    """Per-layer shares of the sparse error removed, and end-to-end NLLs."""

    model: str
    policy: str
    budget: str
    budget_tokens: int
    seq_len: int
    windows: int
    oracle_rank: int
    sparse_error: list[float]  # per layer: sum over windows of ||O_full - O_sparse||^2
    removed: dict[str, list[float]]  # method -> per-layer share of that error removed
    reference: dict[str, float]  # mean NLL: full, baseline, baseline+, less
    layers_probed: list[int]
    only: list[float]  # mean NLL with LESS in that layer alone
    from_layer: list[float]  # mean NLL with LESS in that layer and every one after it

    def rows(self) -> list[dict]:
        """One row per layer: the shares, then the end-to-end change of mean NLL against the
        plain policy (negative: LESS there helps), where that layer was probed."""
        base = self.reference["baseline"]
        probed = dict(
            zip(self.layers_probed, zip(self.only, self.from_layer, strict=True), strict=True)
        )
        rows = []
        for layer, error in enumerate(self.sparse_error):
            row = {"layer": layer, "sparse_error": error}
            row.update({f"{m}_removed": self.removed[m][layer] for m in COMPARED})
            only, after = probed.get(layer, (math.nan, math.nan))
            row.update({"less_only_dnll": only - base, "less_from_dnll": after - base})
            rows.append(row)
        return rows

    def save(self, out_dir: str | Path) -> Path:
        return save_json({**asdict(self), "rows": self.rows()}, Path(out_dir) / "layers.json")


def _squared_errors(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    setups: dict[str, LayerSetup],
    rank: int,
) -> dict[str, float]:
    """``||O_full - O_x||^2`` for the plain policy and each method of ``setups``, and for the
    rank-``rank`` oracle, on one layer's inputs (grouped layout, fp32)."""
    q = attention_math.group_queries(query, key.shape[1])
    scale = attention_scale(module)
    b, hkv, g, t, d = q.shape
    full = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=g > 1
    )
    full = full.view(b, hkv, g, t, d).float()
    outputs = {name: layer_output(s, query, key, value, scale) for name, s in setups.items()}
    residual = full - outputs["baseline"].float()
    errors = {name: (full - out.float()).square().sum().item() for name, out in outputs.items()}
    per_head = residual.reshape(b, hkv * g, t, d)
    errors["oracle"] = (per_head - attention_math.truncated(per_head, rank)).square().sum().item()
    return errors


@torch.no_grad()
def sparse_error_shares(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernels: Sequence[nn.Module],
    rank: int = DEFAULT_RANK,
    oracle_rank: int = 8,
    progress: bool = True,
) -> tuple[list[float], dict[str, list[float]]]:
    """Per layer, the sparse error summed over ``windows`` and the share of it each of
    Baseline+, LESS and the oracle removes (see the module's docstring); NaN in a layer where
    the policy does not run."""
    modules = attention_modules(model)
    runs = policy_layers(model)
    totals = {i: dict.fromkeys(("baseline", *COMPARED), 0.0) for i in runs}
    index = {id(module): i for i, module in enumerate(modules)}

    def observe(module: nn.Module, query, key, value) -> None:
        i = index[id(module)]
        setups = {
            name: get_method(name).layer_setup(policy, module, kernels[i], rank)
            for name in ("baseline", "baseline+", "less")
        }
        for name, error in _squared_errors(module, query, key, value, setups, oracle_rank).items():
            totals[i][name] += error

    with observing(model, observe, runs):
        for window in tqdm(windows, desc="layer errors", unit="win", disable=not progress):
            model(window[None].to(model.device))
    layers = range(len(modules))
    sparse = [totals[i]["baseline"] if i in totals else math.nan for i in layers]
    removed = {name: [_removed(totals.get(i), name) for i in layers] for name in COMPARED}
    return sparse, removed


def _removed(total: dict[str, float] | None, name: str) -> float:
    """The share of a layer's sparse error that ``name`` removes (NaN where none was
    measured)."""
    if not total or not total["baseline"]:
        return math.nan
    return 1 - total[name] / total["baseline"]


@torch.no_grad()
def end_to_end(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernels: Sequence[nn.Module],
    layers: Sequence[int],
    progress: bool = True,
) -> tuple[list[float], list[float]]:
    """Mean NLL with LESS in each of ``layers`` alone, and from each of them on (the plain
    policy in every other layer where the policy runs)."""
    modules = attention_modules(model)
    index = {module: i for i, module in enumerate(modules)}
    plain = layer_setups(model, "baseline", policy)
    less = layer_setups(model, "less", policy, kernels)
    only, after = [], []
    total = 2 * len(layers) * len(windows)
    with tqdm(total=total, desc="LESS per layer", unit="win", disable=not progress) as bar:
        for layer in layers:
            for chosen, nlls in (({layer}, only), (set(range(layer, len(modules))), after)):
                setups = {m: less[m] if index[m] in chosen else s for m, s in plain.items()}
                with using_setups(model, setups):
                    nlls.append(mean_nll(model, windows, bar=bar))
    return only, after


def diagnose_layers(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy,
    kernels: Sequence[nn.Module],
    reference: dict[str, float],
    layer_step: int = 1,
    oracle_rank: int = 8,
    rank: int = DEFAULT_RANK,
    model_name: str = "",
    progress: bool = True,
) -> LayerDiagnosis:
    """The whole diagnosis over ``windows`` ``(N, T)``; ``reference`` holds the mean NLL of
    full, baseline, Baseline+ and LESS on the same windows; end-to-end rows every
    ``layer_step``-th layer where the policy runs."""
    n, t = windows.shape
    budget_tokens = evicting_budget(policy, t)
    sparse, removed = sparse_error_shares(
        model, windows, policy, kernels, rank, oracle_rank, progress
    )
    layers = policy_layers(model)[::layer_step]
    only, after = end_to_end(model, windows, policy, kernels, layers, progress)
    return LayerDiagnosis(
        model=model_name or model.config.model_type,
        policy=policy.name,
        budget=str(policy.budget),
        budget_tokens=budget_tokens,
        seq_len=t,
        windows=n,
        oracle_rank=oracle_rank,
        sparse_error=sparse,
        removed=removed,
        reference=reference,
        layers_probed=layers,
        only=only,
        from_layer=after,
    )


def plot_layers(report: LayerDiagnosis, out_dir: str | Path) -> Path:
    """Top: each layer's share of the sparse error removed (and the error itself, log scale).
    Bottom: the change of mean NLL against the plain policy with LESS in one layer / from one
    layer on, with LESS everywhere and Baseline+ as lines."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    layers = range(len(report.sparse_error))
    labels = {
        "baseline+": "Baseline+ (equal memory)",
        "less": "LESS",
        "oracle": f"rank-{report.oracle_rank} oracle",
    }
    for name, color in zip(COMPARED, ("C1", "C2", "C3"), strict=True):
        top.plot(layers, report.removed[name], "o-", color=color, label=labels[name], ms=4)
    top.set_ylabel("share of ||O_full - O_sparse||² removed")
    top.grid(alpha=0.3)
    error_axis = top.twinx()
    error_axis.semilogy(layers, report.sparse_error, color="C7", alpha=0.5, label="sparse error")
    error_axis.set_ylabel("sparse error (grey, log)")
    top.legend(fontsize=8, loc="upper left")
    base = report.reference["baseline"]
    bottom.bar(
        report.layers_probed,
        [x - base for x in report.only],
        color="C2",
        alpha=0.6,
        label="LESS in this layer only",
    )
    bottom.plot(
        report.layers_probed,
        [x - base for x in report.from_layer],
        "s-",
        color="C4",
        label="LESS in this layer and after",
    )
    for name, color in (("less", "C2"), ("baseline+", "C1"), ("full", "C0")):
        bottom.axhline(
            report.reference[name] - base, color=color, linestyle="--", label=f"{name}, every layer"
        )
    bottom.set_xlabel("layer")
    bottom.set_ylabel("mean NLL - plain policy's")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.suptitle(
        f"{report.model}: {report.policy} budget {report.budget} ({report.budget_tokens} of "
        f"{report.seq_len} tokens), {report.windows} window(s)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / "layers.png", dpi=110)
